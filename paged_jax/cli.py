"""The paged-jax command line.

    paged-jax serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                    [--served-model-name NAME] [engine options]
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
import logging
import os
import pathlib
import re
import sys

from paged_jax.config import EngineConfig, ServerLimits
from paged_jax.plan import check_options

_SIZE_SUFFIXES = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


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


def add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--log-level", default=default,
                        choices=["critical", "error", "warning", "info", "debug"],
                        help="debug also shows the traceback of an error (default: "
                        "%(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paged-jax", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1/* routes")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients send (default: --model)")
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
    return parser


def serve(args: argparse.Namespace, config: EngineConfig) -> int:
    from paged_jax.engine import LLMEngine
    from paged_jax.server import create_app
    from paged_jax.server.uvicorn_server import serve as run_server

    from paged_jax import multihost

    limits = server_limits(args)
    engine = LLMEngine(config)
    if engine.multihost and not multihost.is_leader():
        engine.follow()  # mirror process 0's steps until its server stops
        return 0
    engine.lead()  # multi-host: publish every step's adds and aborts to the other processes
    app = create_app(engine, served_model_name=args.served_model_name, api_key=args.api_key,
                     limits=limits, disable_docs=args.disable_fastapi_docs,
                     log_stats_interval=None if args.disable_log_stats
                     else args.log_stats_interval)
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
    try:
        config = engine_config(args)
        if args.command == "serve":
            server_limits(args)
            if not args.log_stats_interval > 0:
                raise ValueError(f"--log-stats-interval must be > 0 seconds, got "
                                 f"{args.log_stats_interval}")
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
