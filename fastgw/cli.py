"""The ``fastgw`` command: argv -> config -> check or serve. No policy lives here.

Exit codes: 0 fine, 1 the config has problems (each printed as ``FILE: KEY: MESSAGE`` on
stderr), 2 usage errors (argparse's convention), 130 interrupted. ``check`` never prints
a traceback. ``fastgw.server`` is imported only by ``serve``, so ``check`` and
``--version`` stay fast and work on their own.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from fastgw._version import __version__
from fastgw.config import GatewayConfig, load_config
from fastgw.errors import ConfigError

__all__ = ["main"]

# Exit statuses (sysexits.h names where one fits).
EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2
EXIT_SOFTWARE = 70  # EX_SOFTWARE: a bug in fastgw
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = _make_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "serve" and args.port is not None and not args.demo:
            parser.error("--port goes with --demo; a config file sets its listeners' ports")
    except SystemExit as e:  # --help, --version, usage errors: argparse has printed already
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "check":
            return _check(args.config)
        if args.command == "explain":
            from fastgw.policy.explain import explain

            allowed, lines = explain(_load(args.config), args.method, args.url, args.header)
            print("\n".join(lines))
            return EXIT_OK if allowed else 1
        if args.command == "who-can":
            from fastgw.policy.explain import who_can

            print("\n".join(who_can(_load(args.config), args.method, args.url)))
            return EXIT_OK
        return _serve(args)
    except _Exit as e:
        return e.status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


class _Exit(Exception):
    """Stop with this exit status; what to say has been said."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastgw",
        description="Identity-aware API gateway for serverless function endpoints.",
    )
    parser.add_argument("--version", action="version", version=f"fastgw {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = commands.add_parser("check", help="validate a config file and exit")
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="gateway TOML file")

    serve = commands.add_parser("serve", help="run the gateway")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", "--config", metavar="FILE", help="gateway TOML file")
    source.add_argument(
        "--demo",
        action="store_true",
        help="run a complete example with a built-in demo function backend",
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=None,
        metavar="N",
        help="with --demo: the gateway's port on 127.0.0.1 (default 8080)",
    )
    explain = commands.add_parser(
        "explain", help="what happens to a request and why (offline, from the config)"
    )
    explain.add_argument("-c", "--config", required=True, metavar="FILE", help="gateway TOML file")
    explain.add_argument("method", help="e.g. GET")
    explain.add_argument("url", help="e.g. https://api.example.com/orders/1 or /orders/1")
    explain.add_argument(
        "-H", "--header", action="append", default=[], metavar="'Name: value'",
        help="a request header (repeatable)",
    )  # fmt: skip
    who = commands.add_parser("who-can", help="who may call a route (offline, from the config)")
    who.add_argument("-c", "--config", required=True, metavar="FILE", help="gateway TOML file")
    who.add_argument("method")
    who.add_argument("url")
    serve.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="worker processes sharing the listening ports (default 1)",
    )
    return parser


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError(f"workers must be 1-256, got {n}")
    return n


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {port}")
    return port


def _check(path: str) -> int:
    config = _load(path)
    print(
        f"OK: {len(config.listeners)} listeners, {len(config.backends)} backends, "
        f"{len(config.routes)} routes"
    )
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    if args.demo:
        port = 8080 if args.port is None else args.port
        return int(_server_module().run_demo(port))
    config = _load(args.config)
    if args.workers > 1:
        supervisor = importlib.import_module("fastgw.supervisor")
        return int(supervisor.run_workers(config, args.config, args.workers))
    return int(_server_module().run(config))


def _load(path: str) -> GatewayConfig:
    """The config; raises _Exit after printing its problems (or a bug, in one line)."""
    try:
        return load_config(path)
    except ConfigError as e:
        for file, key, message in e.problems:
            print(f"{file}: {key}: {message}" if key else f"{file}: {message}", file=sys.stderr)
        raise _Exit(EXIT_CONFIG) from None
    except Exception as e:  # a bug in the loader: say so in one line, not a traceback
        print(
            f"fastgw: internal error while loading {path} (a bug; please report it): "
            f"{type(e).__name__}: {e}",
            file=sys.stderr,
        )
        raise _Exit(EXIT_SOFTWARE) from None


def _server_module() -> ModuleType:
    # Imported here, not at the top: check and --version must not pay for (or depend on)
    # trio, the compiled core and the rest of the serving machinery.
    return importlib.import_module("fastgw.server")
