"""Test support for the identity layer: token minting and a local identity provider.

``IdP`` is a real HTTP/1.1 server on 127.0.0.1 (trio + h11, TLS from a trustme CA when
asked) serving an OIDC discovery document and a JWKS, with knobs for what goes wrong:
per-path modes (``ok``, ``error`` -> 500, ``drop`` -> close without answering, ``hang``
-> never answer), a Cache-Control/Age to send, and a hit counter per path. ``stop()``
closes the listener, so the next connection is refused, as with a server that is down.
"""

from __future__ import annotations

import base64
import collections
import json
import socket
import ssl
from pathlib import Path
from typing import Any

import h11
import jwt
import trio
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import get_default_algorithms

ISS = "https://idp.test"
AUD = "api://fastgw"
HMAC_SECRET = b"an-hmac-secret-for-tests-that-is-over-32-bytes"
# A fixed "now" for tests that do not run a clock: 2027-01-15.
NOW = 1_800_000_000.0

ALGORITHMS = get_default_algorithms()


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims at NOW; ``name=None`` removes a claim."""
    c: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "alice",
        "iat": int(NOW) - 10,
        "exp": int(NOW) + 600,
    }
    for k, v in overrides.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def mint(
    key: Any,
    alg: str,
    payload: dict[str, Any] | None = None,
    *,
    kid: str | None = "k1",
    headers: dict[str, Any] | None = None,
) -> bytes:
    """A token signed by PyJWT (the reference signer)."""
    h = dict(headers or {})
    if kid is not None:
        h["kid"] = kid
    return jwt.encode(
        claims() if payload is None else payload, key, algorithm=alg, headers=h
    ).encode()


def raw(header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes, sig: bytes = b"") -> bytes:
    """A compact token from parts, unsigned unless ``sig`` is given: for shapes PyJWT
    refuses to produce."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return b64(h) + b"." + b64(p) + b"." + b64(sig)


def sign_raw(key: Any, alg: str, header: dict[str, Any], payload: dict[str, Any]) -> bytes:
    """Sign arbitrary header/payload JSON with PyJWT's algorithm object directly."""
    signing_input = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(payload).encode())
    sig = ALGORITHMS[alg].sign(signing_input, key)
    return signing_input + b"." + b64(sig)


def public_jwk(private_key: Any, alg: str, kid: str | None, *, with_alg: bool = True) -> dict:
    jwk: dict[str, Any] = ALGORITHMS[alg].to_jwk(private_key.public_key(), as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    if with_alg:
        jwk["alg"] = alg
    jwk["use"] = "sig"
    return jwk


def public_pem(private_key: Any) -> bytes:
    pem: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def dead_port() -> int:
    """A loopback port with nothing listening (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class IdP:
    DISCOVERY = "/.well-known/openid-configuration"
    JWKS = "/jwks.json"

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.keys: list[dict[str, Any]] = []
        self.modes: dict[str, str] = {}
        self.cache_control: str | None = None
        self.age: int | None = None
        self.hits: collections.Counter[str] = collections.Counter()
        self.issuer: str | None = None  # discovery's "issuer"; the base URL by default
        self.jwks_path = self.JWKS
        self.extra_body: bytes | None = None  # replaces the JWKS body when set
        self.base_url = ""
        self._scope = trio.CancelScope()

    @property
    def jwks_url(self) -> str:
        return self.base_url + self.jwks_path

    @property
    def discovery_url(self) -> str:
        return self.base_url + self.DISCOVERY

    async def start(self, nursery: trio.Nursery) -> str:
        listeners = await nursery.start(self._serve)
        port = listeners[0].socket.getsockname()[1]
        scheme = "https" if self.ssl_context else "http"
        self.base_url = f"{scheme}://127.0.0.1:{port}"
        if self.issuer is None:
            self.issuer = self.base_url
        return self.base_url

    def stop(self) -> None:
        self._scope.cancel()

    async def _serve(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            await trio.serve_tcp(self._handle, 0, host="127.0.0.1", task_status=task_status)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        try:
            if self.ssl_context is not None:
                stream = trio.SSLStream(tcp, self.ssl_context, server_side=True)
                await stream.do_handshake()
            await self._exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _exchange(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        path = ""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = bytes(await stream.receive_some(65536))
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                path = event.target.decode()
            elif isinstance(event, h11.EndOfMessage):
                break
        self.hits[path] += 1
        mode = self.modes.get(path, "ok")
        if mode == "drop":
            return
        if mode == "hang":
            await trio.sleep_forever()
        headers = [("Content-Type", "application/json"), ("Connection", "close")]
        if mode == "error":
            status, body = 500, b'{"error":"down"}'
        elif path == self.DISCOVERY:
            status = 200
            body = json.dumps({"issuer": self.issuer, "jwks_uri": self.jwks_url}).encode()
        elif path == self.jwks_path:
            status = 200
            body = self.extra_body or json.dumps({"keys": self.keys}).encode()
            if self.cache_control is not None:
                headers.append(("Cache-Control", self.cache_control))
            if self.age is not None:
                headers.append(("Age", str(self.age)))
        else:
            status, body = 404, b"{}"
        headers.append(("Content-Length", str(len(body))))
        out = conn.send(h11.Response(status_code=status, headers=headers))
        out += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        await stream.send_all(out)
