"""The daemon: run a Gateway under trio with signal handling and graceful drain.

SIGTERM or SIGINT: stop accepting, let requests in flight finish for up to the config's
``drain_timeout_s``, then exit 0 (1 if connections had to be cut). The workers issue adds
a supervisor here; one process for now.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

import trio

from fastgw.config.model import GatewayConfig
from fastgw.gateway import Gateway, bound_urls

Ready = Callable[[list[tuple[str, int]]], None]


async def serve_until_signalled(gw: Gateway, ready: Ready | None = None) -> int:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(gw.serve)
            if ready is not None:
                ready(addrs)
            async for _ in signals:
                break
            print("fastgw: draining", file=sys.stderr, flush=True)
            clean = await gw.drain()
            nursery.cancel_scope.cancel()
    return 0 if clean else 1


def _print_ready(config: GatewayConfig) -> Ready:
    def ready(addrs: list[tuple[str, int]]) -> None:
        urls = bound_urls(addrs, [lc.tls for lc in config.listeners])
        print("fastgw: listening on " + ", ".join(urls), file=sys.stderr, flush=True)

    return ready


def run(config: GatewayConfig, *, demo: bool = False, ready: Ready | None = None) -> int:
    """Serve ``config`` until SIGTERM/SIGINT; returns the process exit code."""
    if demo:
        return run_demo(config.listeners[0].port if config.listeners else 8080)
    gw = Gateway(config)
    return trio.run(serve_until_signalled, gw, ready or _print_ready(config))


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
