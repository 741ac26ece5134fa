"""The daemon: run a Gateway under trio with signal handling and graceful drain.

- SIGTERM or SIGINT: stop accepting, let requests in flight finish for up to the config's
  ``drain_timeout_s``, then exit 0 (1 if connections had to be cut).
- SIGHUP: reload. The whole new config is loaded and validated (in a worker thread, so a
  large map file does not stall the loop), then swapped in atomically; on any problem
  the old config keeps serving, the problems are printed the way ``fastgw check`` prints
  them, and the failure is counted (``fastgw_config_reloads_total{result="failed"}``).
- SIGUSR1: reopen the audit log file (after log rotation moved it).
"""

from __future__ import annotations

import os
import signal
import ssl
import sys
from collections.abc import Callable

import trio

from fastgw.config.loader import load_config
from fastgw.config.model import GatewayConfig
from fastgw.errors import ConfigError
from fastgw.gateway import Gateway, bound_urls
from fastgw.supervisor import (
    SUPERVISOR_PID_ENV,
    WORKER_ENV,
    worker_overrides,
    worker_shared_buckets,
)

Ready = Callable[[list[tuple[str, int]]], None]


def format_problems(e: ConfigError) -> list[str]:
    """The lines ``fastgw check`` prints for a ConfigError."""
    return [f"{f}: {k}: {m}" if k else f"{f}: {m}" for f, k, m in e.problems]


async def reload_from(gw: Gateway, path: str) -> bool:
    """Load ``path`` and swap it in; on failure keep serving the old config. Returns
    whether the reload took effect."""
    try:
        config = await trio.to_thread.run_sync(load_config, path)
        if os.environ.get(WORKER_ENV):
            config = worker_overrides(config)
    except ConfigError as e:
        gw.reloads_failed += 1
        for line in format_problems(e):
            print(line, file=sys.stderr)
        print(
            f"fastgw: reload of {path} failed; the previous config keeps serving",
            file=sys.stderr,
            flush=True,
        )
        return False
    except Exception as e:  # a loader bug must not take the running gateway down
        gw.reloads_failed += 1
        print(
            f"fastgw: reload of {path} failed (internal error: {type(e).__name__}: {e}); "
            "the previous config keeps serving",
            file=sys.stderr,
            flush=True,
        )
        return False
    try:
        gw.reload(config)
    except (OSError, ssl.SSLError) as e:
        gw.reloads_failed += 1
        print(
            f"fastgw: reload of {path} failed: {e}; the previous config keeps serving",
            file=sys.stderr,
            flush=True,
        )
        return False
    print(f"fastgw: reloaded {path}", file=sys.stderr, flush=True)
    return True


async def serve_until_signalled(
    gw: Gateway, ready: Ready | None = None, config_path: str | None = None
) -> int:
    sigs = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1]
    with trio.open_signal_receiver(*sigs) as signals:
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(gw.serve)
            if ready is not None:
                ready(addrs)
            if os.environ.get(WORKER_ENV):
                # The supervisor's pid as it said, not os.getppid() here: by now it may
                # have died (we were already re-parented) and we would wait forever.
                supervisor = int(os.environ.get(SUPERVISOR_PID_ENV) or os.getppid())
                nursery.start_soon(_exit_with_supervisor, supervisor)
            async for sig in signals:
                if sig == signal.SIGHUP:
                    if config_path is None:
                        print(
                            "fastgw: SIGHUP ignored: no config file to reload",
                            file=sys.stderr,
                            flush=True,
                        )
                    else:
                        await reload_from(gw, config_path)
                elif sig == signal.SIGUSR1:
                    if gw.audit is not None:
                        gw.audit.reopen()
                else:
                    break
            print("fastgw: draining", file=sys.stderr, flush=True)
            clean = await gw.drain()
            nursery.cancel_scope.cancel()
    return 0 if clean else 1


async def _exit_with_supervisor(ppid: int) -> None:
    """A worker whose supervisor died (SIGKILL, a crash) is re-parented; it drains and
    exits rather than serve on, unsupervised, forever. Checked twice a second."""
    while os.getppid() == ppid:
        await trio.sleep(0.5)
    try:
        print("fastgw: supervisor gone; draining", file=sys.stderr, flush=True)
    except OSError:
        # Our stderr is a pipe that only the supervisor read: writes fail with EPIPE,
        # which would end the drain with BrokenPipeError. Nobody is left to read it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stderr.fileno())
        os.close(devnull)
    os.kill(os.getpid(), signal.SIGTERM)


def _print_ready(config: GatewayConfig, gw: Gateway) -> Ready:
    def ready(addrs: list[tuple[str, int]]) -> None:
        if gw.admin_address is not None:
            host, port = gw.admin_address
            print(f"fastgw: admin on http://{host}:{port}", file=sys.stderr, flush=True)
        urls = bound_urls(addrs, [lc.tls for lc in config.listeners])
        print("fastgw: listening on " + ", ".join(urls), file=sys.stderr, flush=True)

    return ready


def run(
    config: GatewayConfig,
    *,
    demo: bool = False,
    ready: Ready | None = None,
    config_path: str | None = None,
) -> int:
    """Serve ``config`` until SIGTERM/SIGINT; returns the process exit code. SIGHUP
    reloads from ``config_path`` (default: the file ``config`` was loaded from)."""
    if demo:
        return run_demo(config.listeners[0].port if config.listeners else 8080)
    if config_path is None and os.path.isfile(config.source):
        config_path = config.source
    worker = bool(os.environ.get(WORKER_ENV))
    if worker:
        config = worker_overrides(config)
    gw = Gateway(
        config, reuse_port=worker, shared_buckets=worker_shared_buckets() if worker else None
    )
    return trio.run(serve_until_signalled, gw, ready or _print_ready(config, gw), config_path)


def run_demo(listen_port: int = 8080) -> int:
    """The whole pipeline with no files: a demo function backend inside this process and
    a gateway in front of it. Prints the curl command that works."""
    from fastgw.demo import demo_config, serve_demo_function

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            _, fn_port = await nursery.start(serve_demo_function)
            config = demo_config(fn_port, listen_port)
            gw = Gateway(config)

            def ready(addrs: list[tuple[str, int]]) -> None:
                host, port = addrs[0]
                print(
                    f"fastgw demo: gateway on http://{host}:{port} -> demo function on "
                    f"http://127.0.0.1:{fn_port}\n"
                    "Try:\n"
                    f"  curl -s http://{host}:{port}/hello -H 'Content-Type: application/json'"
                    f' -d \'{{"name": "world"}}\'\n'
                    "Stop with Ctrl-C.",
                    flush=True,
                )

            code = await serve_until_signalled(gw, ready)
            nursery.cancel_scope.cancel()
        return code

    return trio.run(main)
