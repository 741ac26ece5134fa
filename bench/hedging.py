"""Hedging against cold starts: client-side GET latency with hedging off and on.

Two function endpoints on loopback answer in ``--warm-ms``; endpoint A also plays a
scale-to-zero function: the first request after ``--idle-ms`` without traffic waits
``--cold-ms`` more. The load comes in bursts (``--clients`` connections, ``--requests``
GETs each) separated by idle gaps long enough for A to go cold again, so every burst
meets a cold start. The gateway knows the scale-to-zero window (``cold_after_idle_s``)
and hedges after ``--delay-ms`` (a quarter of it for an endpoint it judges cold).

    python -m bench.hedging                  # about 20 s
    python -m bench.hedging --rounds 3       # quicker

Prints p50/p90/p99/max per mode and the hedges sent and won. The claim checked by
tests/upstream/test_hedging.py: with hedging, p99 < delay + 2 x warm latency.
"""

from __future__ import annotations

import argparse

import trio

from fastgw.config.model import HedgeConfig, RouteConfig
from fastgw.gateway import Gateway
from tests.e2e.helpers import Client, make_config
from tests.upstream.fn_endpoint import FnEndpoint


def _q(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _run(args: argparse.Namespace, hedge: HedgeConfig | None) -> tuple[list[float], str]:
    idle_s = args.idle_ms / 1000
    a = FnEndpoint(
        b"A",
        delay_s=args.warm_ms / 1000,
        cold_after_idle_s=idle_s,
        cold_start_s=args.cold_ms / 1000,
    )
    b = FnEndpoint(b"B", delay_s=args.warm_ms / 1000)
    lat: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        gw = Gateway(
            make_config(
                [a.url, b.url],
                backend_kw={"cold_after_idle_s": idle_s},
                routes=[RouteConfig(name="fn", backend="fn", hedge=hedge)],
            )
        )
        port = (await nursery.start(gw.serve))[0][1]
        conns = [await Client.open(port) for _ in range(args.clients)]

        async def one(c: Client) -> None:
            for _ in range(args.requests):
                t0 = trio.current_time()
                r = await c.request(b"GET", b"/")
                lat.append(trio.current_time() - t0)
                assert r.status == 200, r.status

        for _ in range(args.rounds):
            async with trio.open_nursery() as n:
                for c in conns:
                    n.start_soon(one, c)
            await trio.sleep(idle_s * 2)
        for c in conns:
            await c.aclose()
        resil = gw.state.router.routes[0].resil
        extra = f"cold starts {a.cold_starts}"
        if resil is not None:
            extra += f", hedges sent {resil.counts[1]}, won {resil.counts[2]}"
        nursery.cancel_scope.cancel()
    return lat, extra


async def main(args: argparse.Namespace) -> None:
    delay_s = args.delay_ms / 1000
    print(
        f"warm {args.warm_ms:g} ms, cold start {args.cold_ms:g} ms after {args.idle_ms:g} ms "
        f"idle, hedge delay {args.delay_ms:g} ms; {args.rounds} bursts of "
        f"{args.clients}x{args.requests} GETs"
    )
    for name, hedge in (("off", None), ("on", HedgeConfig(delay_s=delay_s, budget_percent=20))):
        lat, extra = await _run(args, hedge)
        ms = [x * 1000 for x in lat]
        print(
            f"hedging {name:3}: n={len(ms)} p50 {_q(ms, 0.5):7.1f} ms  p90 {_q(ms, 0.9):7.1f} ms"
            f"  p99 {_q(ms, 0.99):7.1f} ms  max {max(ms):7.1f} ms  ({extra})"
        )


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=25, help="GETs per client per burst")
    ap.add_argument("--warm-ms", type=float, default=10.0)
    ap.add_argument("--cold-ms", type=float, default=2000.0)
    ap.add_argument("--idle-ms", type=float, default=300.0)
    ap.add_argument("--delay-ms", type=float, default=150.0)
    return ap.parse_args()


if __name__ == "__main__":
    trio.run(main, _args())
