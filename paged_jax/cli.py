"""The paged-jax command line.

    paged-jax serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--api-key KEY ...]
                    [--served-model-name NAME] [--chat-template FILE] [engine options]
    paged-jax generate --prompt "..." [--max-tokens N] [--temperature T] [--chat]
                    [engine options]
    paged-jax convert --output DIR [engine options]   # Orbax checkpoint, restored per shard

Multi-host (docs/ARCHITECTURE.md, "Tensor parallelism"): run the same command on every host
with --tensor-parallel-size <all devices> --coordinator-address HOST0:PORT --num-processes N
--process-id I; process 0 prints or serves HTTP, the others compute.

Engine options are EngineConfig's fields in kebab case (--max-num-seqs 16), generated from the
dataclass so the two never drift apart. `python -m paged_jax ...` is the same command.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import pathlib
import re
import sys

from paged_jax.config import EngineConfig, ServerLimits
from paged_jax.plan import check_options

_SIZE_SUFFIXES = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
# paged_jax.server.chat_options.TOOL_CALL_PARSERS (a test checks they agree), copied because
# importing the server package loads JAX and FastAPI: seconds before any --help or error.
TOOL_CALL_PARSERS = ("hermes", "llama3_json")
# Where the API key comes from when no --api-key is given, first set first (vLLM's name too)
API_KEY_ENV_VARS = ("PAGED_JAX_API_KEY", "VLLM_API_KEY")


def parse_int(text: str) -> int:
    """An integer, optionally with a binary size suffix: 4096, 512M, 2GiB."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not an integer or size: {text!r}")
    return int(match.group(1)) * _SIZE_SUFFIXES[match.group(2)]


def add_engine_options(parser: argparse.ArgumentParser, **defaults) -> None:
    """defaults: this command's own defaults where they differ from EngineConfig's."""
    group = parser.add_argument_group("engine options (EngineConfig)")
    for field in dataclasses.fields(EngineConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = str(field.type)
        default = defaults.get(field.name, field.default)
        choices = [c for c in field.metadata.get("choices") or () if c is not None]
        help_text = field.metadata["help"]
        if choices:
            help_text += f"; one of {', '.join(str(c) for c in choices)}"
        if "default" not in help_text or field.name in defaults:
            help_text += f" (default: {default})"
        if "bool" in kind:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                               default=default, help=help_text)
        else:
            group.add_argument(flag, dest=field.name, default=default, help=help_text,
                               choices=choices or None, metavar=field.name.upper(),
                               type=parse_int if "int" in kind else
                               float if "float" in kind else str)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The flags' EngineConfig; raises ValueError for a value or a combination it refuses."""
    config = EngineConfig(**{f.name: getattr(args, f.name)
                             for f in dataclasses.fields(EngineConfig)})
    check_options(config)
    return config


def server_limits(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(max_request_body_bytes=args.max_request_body_bytes,
                        max_sequences_per_request=args.max_sequences_per_request,
                        shutdown_timeout=args.shutdown_timeout,
                        header_read_timeout=args.header_read_timeout)


def json_string_list(text: str) -> list[str]:
    """A JSON list of strings, as vLLM's CORS flags take: '["https://a.example"]'."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise argparse.ArgumentTypeError(f"not a JSON list of strings: {text!r}")
    return value


def api_keys(args: argparse.Namespace) -> list[str]:
    """The --api-key values, else the first of API_KEY_ENV_VARS set; [] for no key."""
    if args.api_key:
        return list(args.api_key)
    return next(([os.environ[name]] for name in API_KEY_ENV_VARS if os.environ.get(name)), [])


def cors_options(args: argparse.Namespace):
    from paged_jax.server.middleware import CorsOptions

    return CorsOptions(allowed_origins=args.allowed_origins,
                       allowed_methods=args.allowed_methods,
                       allowed_headers=args.allowed_headers,
                       allow_credentials=args.allow_credentials)


def chat_options(args: argparse.Namespace):
    """The serve flags' ChatOptions; raises ValueError naming the flag for a template that
    cannot be read or a combination it refuses."""
    from paged_jax.server.chat_options import ChatOptions, load_chat_template

    try:
        template = load_chat_template(args.chat_template)
    except (OSError, ValueError) as err:  # OSError: a file it may not read
        raise ValueError(f"--chat-template: {err}") from err
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError(f"--enable-auto-tool-choice needs --tool-call-parser (one of "
                         f"{', '.join(TOOL_CALL_PARSERS)})")
    return ChatOptions(chat_template=template,
                       trust_request_chat_template=args.trust_request_chat_template,
                       enable_auto_tool_choice=args.enable_auto_tool_choice,
                       tool_call_parser=args.tool_call_parser)


def add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--log-level", default=default,
                        choices=["critical", "error", "warning", "info", "debug"],
                        help="debug also shows the traceback of an error (default: "
                        "%(default)s)")


def add_cors_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("CORS (the browser's cross-origin checks; vLLM's flags)")
    for name, what in (("origins", "origins"), ("methods", "HTTP methods"),
                       ("headers", "request headers")):
        group.add_argument(f"--allowed-{name}", type=json_string_list, default=["*"],
                           metavar="JSON", help=f"the {what} allowed, a JSON list of "
                           "strings (default: [\"*\"], any)")
    group.add_argument("--allow-credentials", action="store_true",
                       help="allow cookies and authorization headers in cross-origin requests")


def add_chat_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("chat templates and tool calls")
    group.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                       help="the Jinja chat template every chat is rendered with, a file or the "
                       "template itself (default: the tokenizer's)")
    group.add_argument("--trust-request-chat-template", action="store_true",
                       help="honour a request's own chat_template field (a template is code "
                       "the server runs; refused otherwise)")
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="tool_choice \"auto\": the model may call tools, parsed from its "
                       "text by --tool-call-parser (which it needs)")
    group.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
                       help="how tool calls are read from the model's text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paged-jax", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", action="append", default=None, metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on /v1/* routes and the API "
                       "docs; give it several times to accept any of several keys (default: "
                       f"${API_KEY_ENV_VARS[0]}, else ${API_KEY_ENV_VARS[1]}, else no key)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients send (default: --model)")
    serve.add_argument("--root-path", default="",
                       help="the path prefix of a proxy in front that routes by path "
                       "(FastAPI's root_path): /PREFIX/v1/... is served as /v1/...")
    add_cors_flags(serve)
    add_chat_flags(serve)
    add_log_level(serve, "info")
    serve.add_argument("--no-access-log", action="store_true", help="do not log each request")
    serve.add_argument("--max-request-body-bytes", type=parse_int,
                       default=ServerLimits.max_request_body_bytes,
                       help="larger request bodies get a 413 (default: %(default)s)")
    serve.add_argument("--max-sequences-per-request", type=int,
                       default=ServerLimits.max_sequences_per_request,
                       help="most prompts x n in one request; beyond, a 400 "
                       "(default: %(default)s)")
    serve.add_argument("--shutdown-timeout", type=float, default=ServerLimits.shutdown_timeout,
                       help="seconds running requests get to finish after SIGTERM / SIGINT; "
                       "then streams end with an error event and others get a 503 "
                       "(default: %(default)s)")
    serve.add_argument("--header-read-timeout", type=float,
                       default=ServerLimits.header_read_timeout,
                       help="seconds a new connection gets to send its request headers "
                       "(default: %(default)s)")
    serve.add_argument("--timeout-keep-alive", type=int, default=5,
                       help="seconds an idle kept-alive connection stays open "
                       "(default: %(default)s)")
    serve.add_argument("--limit-concurrency", type=int, default=None,
                       help="open connections and requests beyond which new requests get a "
                       "503 (default: no limit)")
    serve.add_argument("--disable-log-stats", action="store_true",
                       help="no periodic stats line (throughput, queues, KV usage, prefix-cache "
                       "hit rate) in the log")
    serve.add_argument("--log-stats-interval", type=float, default=10.0,
                       help="seconds between stats lines while there is work "
                       "(default: %(default)s)")
    serve.add_argument("--metrics-prefix", default="paged_jax:",
                       help="prefix of the Prometheus series (vllm: serves vLLM's names, for "
                            "dashboards built for vLLM)")
    serve.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                       help="export a span per request to this OTLP/HTTP traces endpoint "
                            "(the OTEL_EXPORTER_OTLP_* environment configures the rest); needs "
                            "the tracing extra")
    serve.add_argument("--disable-fastapi-docs", action="store_true",
                       help="serve no /docs, /redoc or /openapi.json (otherwise they are "
                       "behind --api-key like /v1)")
    # A server starts ready: every step shape compiled before /health says so (vLLM warms up
    # before it serves too), instead of a first request that waits seconds for a compile.
    add_engine_options(serve, precompile=True)

    gen = commands.add_parser("generate", help="generate once with paged_jax.LLM and print it")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    add_log_level(gen, "warning")
    add_engine_options(gen)

    conv = commands.add_parser("convert", help="save the model's converted parameters as an "
                               "Orbax checkpoint folder (loaded shard by shard by --model DIR)")
    conv.add_argument("--output", required=True, help="the checkpoint folder to write")
    add_log_level(conv, "warning")
    add_engine_options(conv)
    commands.add_parser("models", help="list the model architectures paged-jax runs")
    return parser


def serve(args: argparse.Namespace, config: EngineConfig) -> int:
    from paged_jax.engine import LLMEngine
    from paged_jax.server import create_app
    from paged_jax.server.uvicorn_server import serve as run_server

    from paged_jax import multihost

    limits = server_limits(args)
    chat = chat_options(args)  # read before the model loads (main() has checked it)
    engine = LLMEngine(config)
    if engine.multihost and not multihost.is_leader():
        engine.follow()  # mirror process 0's steps until its server stops
        return 0
    engine.lead()  # multi-host: publish every step's adds and aborts to the other processes
    app = create_app(engine, served_model_name=args.served_model_name, api_key=api_keys(args),
                     limits=limits, disable_docs=args.disable_fastapi_docs,
                     log_stats_interval=None if args.disable_log_stats
                     else args.log_stats_interval,
                     chat_options=chat, cors=cors_options(args),
                     root_path=args.root_path, metrics_prefix=args.metrics_prefix,
                     tracer=tracer(args, engine))
    # Everything built so far (the model, JAX's and the tokenizer's objects) lives as long as
    # the server: out of the cyclic collector's reach, its full collections no longer walk it
    # while each step makes short-lived outputs (as vLLM does). Measured on 256-request
    # asynchronous steps in a process that holds a second engine's objects: the update phase
    # took 6.9 ms a step without this, 1.7 ms with it (docs/RESULTS.md, host overhead).
    gc.collect()
    gc.freeze()
    try:
        return run_server(app, host=args.host, port=args.port, log_level=args.log_level,
                          access_log=not args.no_access_log,
                          timeout_keep_alive=args.timeout_keep_alive,
                          limit_concurrency=args.limit_concurrency)
    finally:
        # The engine thread tells the followers as it stops; this covers a server whose
        # engine thread never started or is stuck in a step (the engine serializes the two
        # broadcasts; a no-op once one has been sent).
        engine.stop_followers()


def tracer(args: argparse.Namespace, engine):
    if args.otlp_traces_endpoint is None:
        return None
    from paged_jax.server.tracing import RequestTracer

    return RequestTracer.for_endpoint(args.otlp_traces_endpoint,
                                      args.served_model_name or engine.model_name)


def generate(args: argparse.Namespace, config: EngineConfig) -> None:
    from paged_jax import multihost
    from paged_jax.llm import LLM
    from paged_jax.sampling_params import SamplingParams

    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    llm = LLM(**options)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    if not llm.llm_engine.multihost or multihost.is_leader():  # every process generated it
        print(outputs[0].outputs[0].text)


def convert(args: argparse.Namespace, config: EngineConfig) -> None:
    from paged_jax import multihost
    from paged_jax.checkpoint.sharded import save_checkpoint
    from paged_jax.engine import setup_devices
    from paged_jax.models.loader import load_model

    _, mesh, dtype = setup_devices(config)  # as the engine does, without building one
    model = load_model(config.model, dtype=dtype, cache_dir=config.cache_dir,
                       with_tokenizer=False, mesh=mesh, revision=config.revision)
    folder = save_checkpoint(model, args.output)
    if multihost.is_leader():
        print(folder)


def main(argv: list[str] | None = None) -> int:
    """The process's exit code: 0, or 1 when the server stopped because its engine died."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "models":  # the registry only: no engine options, no JAX
        from paged_jax.models.registry import table

        print(table())
        return 0
    try:
        config = engine_config(args)
        if args.command == "serve":
            server_limits(args)
            if not args.log_stats_interval > 0:
                raise ValueError(f"--log-stats-interval must be > 0 seconds, got "
                                 f"{args.log_stats_interval}")
            if args.root_path and not re.fullmatch(r"(/[^/?#\s]+)+", args.root_path):
                # "/api/" or "api" would match no request path: every route a 404
                raise ValueError(f"--root-path must be a path such as /api (a leading /, no "
                                 f"trailing one), got {args.root_path!r}")
            chat_options(args)  # a missing template file: a usage error before the model loads
            if args.otlp_traces_endpoint is not None:
                from paged_jax.server.tracing import tracing_unavailable

                reason = tracing_unavailable()
                if reason:
                    raise ValueError(f"--otlp-traces-endpoint needs OpenTelemetry: {reason}")
            from paged_jax.server.metrics import check_prefix

            check_prefix(args.metrics_prefix)
    except ValueError as err:
        parser.error(str(err))
    level = getattr(args, "log_level", None)
    logging.basicConfig(level=level.upper() if level else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # Compiled steps kept on disk: a second start of the same model and options compiles
        # (almost) nothing.
        import jax

        root = pathlib.Path(config.cache_dir).expanduser() if config.cache_dir else (
            pathlib.Path("~/.cache/paged_jax").expanduser())
        jax.config.update("jax_compilation_cache_dir", str(root / "jax"))
    if level != "debug":  # JAX's probe for a TPU, at INFO on every machine without one
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    command = {"serve": serve, "generate": generate, "convert": convert}[args.command]
    try:
        return command(args, config) or 0
    except (FileNotFoundError, ValueError, NotImplementedError) as err:
        # A model that is missing or not supported, an option the model cannot take: one
        # line, no traceback (which --log-level debug shows).
        if level == "debug":
            raise
        print(f"paged-jax {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
