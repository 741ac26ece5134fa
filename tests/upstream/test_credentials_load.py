"""The must-show of upstream credentials: ID tokens that live 10 s, under sustained load
through a real gateway to two endpoints (two audiences), for 18 s of real time (real
sockets need the real clock): no request ever carries an expired token, and the token
source sees one fetch per audience per refresh period (refresh at 70-75 % of the
lifetime: 75 % less up to 5 % jitter).

Run alone: ``.venv/bin/pytest -q -s tests/upstream/test_credentials_load.py`` (``-s``
prints the figures)."""

from __future__ import annotations

import itertools

import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from fastgw.config.model import CredentialConfig
from tests.e2e.helpers import Client, make_config
from tests.upstream.gateway_support import CheckingUpstream, TokenMint, running

LIFETIME_S = 10
RUN_S = 18.0
CLIENTS = 8


async def test_short_lived_tokens_under_load(
    nursery: trio.Nursery, rsa_key: rsa.RSAPrivateKey
) -> None:
    mint = TokenMint(rsa_key, lifetime_s=LIFETIME_S)
    meta = await mint.start(nursery)
    a, b = CheckingUpstream(rsa_key), CheckingUpstream(rsa_key)
    oa, ob = await a.start(nursery), await b.start(nursery)
    cred = CredentialConfig(type="google_id_token", metadata_url=meta)
    config = make_config([oa, ob], backend_kw={"credential": cred, "balance": "round_robin"})
    statuses: dict[int, int] = {}
    async with running(config) as (_gw, port):

        async def client(deadline: float) -> None:
            c = await Client.open(port)
            while trio.current_time() < deadline:
                r = await c.request(b"GET", b"/work")
                statuses[r.status] = statuses.get(r.status, 0) + 1
            await c.aclose()

        start = trio.current_time()
        async with trio.open_nursery() as clients:
            for _ in range(CLIENTS):
                clients.start_soon(client, start + RUN_S)
        end = trio.current_time()

    sent = sum(statuses.values())
    seen_expired = a.seen.expired + b.seen.expired
    per_audience = {aud: len(times) for aud, times in mint.fetches.items()}
    print(
        f"\nrequests={sent} ({sent / (end - start):.0f}/s) statuses={statuses} "
        f"expired={seen_expired} bad={a.seen.bad + b.seen.bad} fetches={per_audience} "
        f"distinct tokens={len(a.seen.tokens)}+{len(b.seen.tokens)}"
    )
    assert sent / (end - start) > 100  # sustained load, not a trickle
    assert statuses == {200: sent}  # never a 503: refreshed well before expiry
    assert seen_expired == 0
    assert a.seen.bad == b.seen.bad == a.seen.missing == b.seen.missing == 0
    assert a.seen.ok + b.seen.ok == sent
    assert set(mint.fetches) == {oa, ob}
    for aud, times in mint.fetches.items():
        # One fetch per refresh period: consecutive fetches of an audience are one
        # period apart (70-75 % of a lifetime of 9-10 s: exp is whole seconds), never
        # two within one period, and none missed.
        gaps = [t2 - t1 for t1, t2 in itertools.pairwise(times)]
        assert all(6.0 <= g <= 8.0 for g in gaps), (aud, gaps)
        assert end - times[-1] < 8.0, (aud, times, end)
        periods = int((end - times[0]) // (0.75 * LIFETIME_S))
        assert len(times) in (periods + 1, periods + 2), (aud, times)
        assert len(times) >= 3  # 18 s: at least two refreshes
    # Every token the source minted was used by its own endpoint (and only there).
    assert len(a.seen.tokens) == per_audience[oa]
    assert len(b.seen.tokens) == per_audience[ob]
