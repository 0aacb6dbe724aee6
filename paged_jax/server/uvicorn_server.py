"""Running the app under uvicorn: graceful shutdown, a header-read timeout, the exit code.

    code = serve(app, host="127.0.0.1", port=8000)   # 0 after SIGTERM / SIGINT, 1 if the
    sys.exit(code)                                     # engine died

Shutdown (SIGTERM or SIGINT): uvicorn stops accepting connections and closes idle ones at
once; running requests get ServerLimits.shutdown_timeout seconds to finish, new ones on
open connections a 503; then every request still open is ended by OpenAIServing.drain (a
stream with an error event naming the shutdown and data: [DONE], a whole response with a
503), the engine thread stops, and the process exits 0. A second SIGINT quits at once.

Slow clients: a connection that has not sent a whole request's headers within
ServerLimits.header_read_timeout of opening, or of its last response, is closed (slowloris).
uvicorn's own keep-alive timeout closes connections idle between requests
(--timeout-keep-alive, 5 s). --limit-concurrency answers requests beyond it with uvicorn's
plain-text 503, /health included.
"""
from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

log = logging.getLogger(__name__)
# Past the drain's deadline, the seconds uvicorn still waits for the ended responses to be
# written before it cancels them.
FLUSH_SECONDS = 5.0


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, serving, shutdown_timeout: float):
        super().__init__(config)
        self.serving = serving
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after its shutdown (the default handler would then
        # kill the process with 128 + signal); a graceful shutdown exits 0 instead.
        self._captured_signals.clear()
        if first and self._loop is not None:
            log.info("%s: shutting down; running requests get %gs to finish",
                     signal.Signals(sig).name, self.shutdown_timeout)
            self._loop.call_soon_threadsafe(self._start_drain)

    def engine_died(self) -> None:
        """From the engine thread: stop serving, exit 1 so a supervisor restarts us."""
        self.exit_code = 1
        if self._loop is not None:
            self._loop.call_soon_threadsafe(setattr, self, "should_exit", True)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self.serving.drain(self.shutdown_timeout))


def header_timeout_protocol(base: type, timeout: float) -> type:
    """`base` (uvicorn's HTTP protocol class), closing a connection that has not sent a
    whole request's headers `timeout` seconds after it opened or after its last response
    (uvicorn's keep-alive timeout stops at the next request's first byte, so a client could
    otherwise hold a kept-alive connection open one header byte at a time)."""

    class HeaderTimeoutProtocol(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._header_timer.cancel()
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            # A request whose headers are complete gets a new cycle; until then the cycle
            # is the one of the last response (None on a new connection).
            cycle = self.cycle
            self._header_timer = self.loop.call_later(timeout, self._headers_too_slow, cycle)

        def _headers_too_slow(self, cycle) -> None:
            if self.cycle is cycle and not self.transport.is_closing():
                log.info("closing a connection that sent no request headers in %gs", timeout)
                self.transport.close()

        def connection_lost(self, exc) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    HeaderTimeoutProtocol.__name__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeoutProtocol


def serve(app, host: str, port: int, log_level: str = "info", access_log: bool = True,
          timeout_keep_alive: int = 5, limit_concurrency: int | None = None) -> int:
    """Runs `app` (create_app's) until SIGTERM / SIGINT or the engine's death; returns the
    process's exit code."""
    limits = app.state.limits
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            access_log=access_log, timeout_keep_alive=timeout_keep_alive,
                            limit_concurrency=limit_concurrency,
                            timeout_graceful_shutdown=limits.shutdown_timeout + FLUSH_SECONDS)
    config.load()
    config.http_protocol_class = header_timeout_protocol(config.http_protocol_class,
                                                         limits.header_read_timeout)
    server = GracefulServer(config, app.state.serving, limits.shutdown_timeout)
    app.state.on_engine_death = server.engine_died
    server.run()
    return server.exit_code
