"""``ember serve``: run the HTTP server over one engine folder (uvicorn).

The CLI only parses and calls the API: ``create_app`` + ``make_server`` (``run_server``
does both). SIGTERM/SIGINT start a graceful drain: the listening socket closes, /health
turns 503 "draining", in-flight requests get ``--drain-timeout`` seconds to finish and are
then cancelled (their KV freed), the engine closes, and the process exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from ember.cli import KV_LAYOUT_OPTIONS, add_kv_layout_arguments
from ember.errors import EmberError
from ember.server.limits import ServerLimits

log = logging.getLogger("ember.server")

DRAIN_BACKSTOP_S = 10.0  # after drain_timeout_s + this, uvicorn cancels what is still open
LOAD_OPTIONS = ("max_batch", "kv_memory", "max_queue", "prefill_chunk", "admit_batch", "threads", "backend",
                *KV_LAYOUT_OPTIONS)
IMAGE_LOAD_OPTIONS = ("threads", "backend")  # what a diffusion folder takes (its queue is the server's)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``serve`` subcommand on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser("serve", help="serve an engine folder over an OpenAI-compatible HTTP API",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run_from_args)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="compiled engine folder (artifacts/NAME)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; set an --api-key "
                                                       "before binding a public address)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="name in /v1/models and responses (default: folder name)")
    p.add_argument("--api-key", default=os.environ.get("EMBER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $EMBER_API_KEY)")
    g = p.add_argument_group("engine (passed to ember.load)")
    g.add_argument("--max-batch", type=int, default=None, help="sequences generated together (slots)")
    g.add_argument("--kv-memory", default=None, help="KV-cache memory, bytes or e.g. 512MiB")
    add_kv_layout_arguments(g)
    g.add_argument("--max-queue", type=int, default=None, help="waiting requests before 429 (image folders: "
                                                               "default 8)")
    g.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens per scheduler iteration "
                                                                   "(default: 128 on the CPU, 1024 on CUDA)")
    g.add_argument("--admit-batch", type=int, default=None, help="requests admitted together while the slots are "
                                                                 "busy (default: 1 on the CPU, 8 on CUDA)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads of the backend")
    g.add_argument("--backend", default=None, help="'onnxruntime': run a TensorRT / TensorRT-RTX folder's ONNX graphs "
                                                   "with ONNX Runtime (default: the folder's own backend)")
    lim = p.add_argument_group("request limits")
    lim.add_argument("--max-body-bytes", type=int, default=ServerLimits.max_body_bytes)
    lim.add_argument("--max-prompt-tokens", type=int, default=None, help="default: model positions - 1")
    lim.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens (default: positions - 1)")
    lim.add_argument("--drain-timeout", type=float, default=ServerLimits.drain_timeout_s,
                     help="seconds in-flight requests get after SIGTERM before they are cancelled")
    lim.add_argument("--max-connections", type=int, default=ServerLimits.max_connections,
                     help="open connections; past it a new connection gets 503 and is closed")
    lim.add_argument("--header-timeout", type=float, default=ServerLimits.header_timeout_s,
                     help="seconds a connection has to send its request line and headers before it is closed")
    lim.add_argument("--body-timeout", type=float, default=ServerLimits.body_timeout_s,
                     help="seconds a request has to send its whole body before it gets 408")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(app: Any, *, host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits = ServerLimits(),
                log_level: str = "info", access_log: bool = True) -> Any:
    """A ``uvicorn.Server`` for ``app`` (from ``create_app``) with the limits' header timeout and
    connection limit (``ember.server.protocol``). ``server.run()`` serves until SIGTERM/SIGINT,
    which start ``app.state.begin_drain()``; a finished drain returns normally (exit status 0)."""
    import uvicorn
    from uvicorn.server import HANDLED_SIGNALS

    from ember.server.protocol import GuardedH11Protocol

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.begin_drain()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn's, less re-raising the signal once the server stopped: that would end a
            # process whose drain finished cleanly with status 143 (SIGTERM) instead of 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    protocol = functools.partial(GuardedH11Protocol, header_timeout_s=limits.header_timeout_s,
                                 max_connections=limits.max_connections)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log, http=protocol,
                            timeout_graceful_shutdown=limits.drain_timeout_s + DRAIN_BACKSTOP_S, lifespan="on")
    return DrainingServer(config)


def run_server(folder: str | Path, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
               api_key: str | None = None, limits: ServerLimits = ServerLimits(), load_options: dict | None = None,
               log_level: str = "info", access_log: bool = True) -> int:
    """Serve ``folder`` until SIGTERM/SIGINT; returns the exit code (0 after a drain, 1 if the
    engine failed to load)."""
    import ember
    from ember.engine_format.manifest import read_manifest
    from ember.server.app import create_app

    folder = Path(folder)
    if not is_loopback(host) and not api_key:
        log.warning("binding %s without --api-key: anyone who can reach this address can use the server", host)
    options = {k: v for k, v in (load_options or {}).items() if v is not None}
    failed: list[str] = []
    server: Any = None

    def on_failure(message: str) -> None:
        failed.append(message)
        if server is not None:
            server.should_exit = True

    def load() -> Any:
        if read_manifest(folder).kind == "diffusion":
            return ember.load(folder, **{k: v for k, v in options.items() if k in IMAGE_LOAD_OPTIONS})
        return ember.load(folder, **options)

    app = create_app(load, model_name=model_name or folder.name, folder=folder,
                     api_key=api_key, limits=limits, on_load_failure=on_failure)
    server = make_server(app, host=host, port=port, limits=limits, log_level=log_level, access_log=access_log)
    server.run()
    if failed:
        log.error("engine failed to load: %s", failed[0])
        return 1
    return 0


def run_from_args(args: argparse.Namespace) -> int:
    limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                          max_tokens_limit=args.max_tokens_limit, drain_timeout_s=args.drain_timeout,
                          max_queue=args.max_queue, header_timeout_s=args.header_timeout,
                          body_timeout_s=args.body_timeout, max_connections=args.max_connections)
    return run_server(args.folder, host=args.host, port=args.port, model_name=args.model_name, api_key=args.api_key,
                      limits=limits, load_options={k: getattr(args, k) for k in LOAD_OPTIONS},
                      log_level=args.log_level, access_log=args.access_log)


def main(argv: list[str] | None = None) -> int:
    """``python -m ember.server FOLDER [options]`` (the same as ``ember serve``)."""
    parser = argparse.ArgumentParser(prog="python -m ember.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except EmberError as e:  # as `ember serve` prints it: one line, exit 2
        print(f"python -m ember.server: error: {e}", file=sys.stderr)
        return 2
