"""Real peers for the credential tests through a real gateway (real clock, real sockets
on 127.0.0.1, port 0):

- ``TokenMint``: a fake Google metadata server's identity endpoint (h11, via
  ``support.FakeServer``) minting real RS256 ID tokens signed with a test key, with
  ``aud`` the audience asked for; it records every fetch per audience, with its time.
- ``CheckingUpstream``: a function endpoint (``tests.e2e.helpers.Upstream``, h11) that
  verifies each token it gets (signature, audience = its own origin, ``exp`` against
  the request's arrival time) and counts good, expired and bad ones.
- ``running``: a ``Gateway`` served in a nursery, yielding it and its port.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import jwt
import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from fastgw.config.model import GatewayConfig
from fastgw.gateway import Gateway
from tests.e2e.helpers import Received, Responder, Upstream
from tests.upstream.support import FakeServer, Reply, Request

IDENTITY_PATH = "/computeMetadata/v1/instance/service-accounts/default/identity"


class TokenMint:
    """The identity endpoint of a metadata server: RS256 tokens, ``lifetime_s`` long."""

    def __init__(self, key: rsa.RSAPrivateKey, lifetime_s: int = 3600) -> None:
        self.key = key
        self.lifetime_s = lifetime_s
        self.fail = False
        self.fetches: dict[str, list[float]] = {}  # audience -> trio times of fetches
        self.server: FakeServer | None = None

    def count(self, audience: str) -> int:
        return len(self.fetches.get(audience, []))

    async def __call__(self, req: Request) -> Reply:
        if req.headers.get("metadata-flavor") != "Google" or req.path != IDENTITY_PATH:
            return Reply(404, b"not found")
        if self.fail:
            return Reply(503, b"unavailable")
        (aud,) = parse_qs(req.query)["audience"]
        self.fetches.setdefault(aud, []).append(trio.current_time())
        now = int(time.time())
        token = jwt.encode(
            {
                "iss": "https://accounts.google.com",
                "aud": aud,
                "sub": "gateway-sa",
                "iat": now,
                "exp": now + self.lifetime_s,
            },
            self.key,
            algorithm="RS256",
        )
        return Reply(200, token.encode(), [("Metadata-Flavor", "Google")])

    async def start(self, nursery: trio.Nursery) -> str:
        self.server = await FakeServer(self).start(nursery)
        return self.server.base_url


@dataclass
class Seen:
    ok: int = 0
    expired: int = 0
    bad: int = 0
    missing: int = 0
    tokens: set[str] = field(default_factory=set)
    last: Received | None = None


class CheckingUpstream:
    """An upstream that checks the ID token in ``field`` on every request."""

    def __init__(self, key: rsa.RSAPrivateKey, field_name: bytes = b"authorization") -> None:
        self.public = key.public_key()
        self.field = field_name
        self.seen = Seen()
        self.upstream = Upstream(self._handle)
        self.origin = ""
        self._verified: dict[str, dict] = {}

    async def start(self, nursery: trio.Nursery) -> str:
        port = await nursery.start(self.upstream.serve)
        self.origin = f"http://127.0.0.1:{port}"
        return self.origin

    async def _handle(self, req: Received, r: Responder) -> None:
        arrived = time.time()
        seen = self.seen
        seen.last = req
        value = req.header(self.field)
        if value is None or not value.startswith(b"Bearer "):
            seen.missing += 1
            await r.respond(401, b"no token")
            return
        token = value[7:].decode()
        claims = self._verified.get(token)
        if claims is None:
            try:
                # Signature and audience once per token; exp on every request below.
                claims = jwt.decode(
                    token,
                    self.public,
                    algorithms=["RS256"],
                    audience=self.origin,
                    options={"verify_exp": False},
                )
            except jwt.PyJWTError:
                seen.bad += 1
                await r.respond(403, b"bad token")
                return
            self._verified[token] = claims
        seen.tokens.add(token)
        if arrived >= claims["exp"]:
            seen.expired += 1
            await r.respond(401, b"expired token")
            return
        seen.ok += 1
        await r.respond(200, b"ok")


@asynccontextmanager
async def running(config: GatewayConfig) -> AsyncIterator[tuple[Gateway, int]]:
    gw = Gateway(config)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(gw.serve)
        yield gw, addrs[0][1]
        nursery.cancel_scope.cancel()
