"""TLS on both sides with real certificates from a throwaway CA (trustme)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trustme

from fastgw.config.model import ListenerConfig
from fastgw.gateway import Gateway

from .helpers import Client, Received, Responder, Upstream, make_config


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def files(tmp_path: Path, cert: trustme.LeafCert, name: str) -> tuple[str, str]:
    c = tmp_path / f"{name}.pem"
    k = tmp_path / f"{name}.key"
    cert.private_key_pem.write_to_path(str(k))
    cert.cert_chain_pems[0].write_to_path(str(c))
    for extra in cert.cert_chain_pems[1:]:
        with c.open("ab") as f:
            f.write(extra.bytes())
    return str(c), str(k)


def upstream_ctx(ca: trustme.CA, require_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "fn.test").configure_cert(ctx)
    if require_client_cert:
        ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def test_tls_upstream_verified(nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path) -> None:
    up = Upstream(ssl_context=upstream_ctx(ca))
    uport = await nursery.start(up.serve)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    gw = Gateway(make_config([f"https://127.0.0.1:{uport}"], backend_kw={"ca_file": str(ca_file)}))
    port = (await nursery.start(gw.serve))[0][1]
    c = await Client.open(port)
    for _ in range(3):
        r = await c.request(b"GET", b"/secure")
        assert r.status == 200
    assert up.connections == 1  # TLS connection kept alive and reused


async def test_tls_upstream_untrusted_is_502(nursery: trio.Nursery, ca: trustme.CA) -> None:
    # The gateway verifies against the system CAs: a throwaway CA is not among them.
    up = Upstream(ssl_context=upstream_ctx(ca))
    uport = await nursery.start(up.serve)
    gw = Gateway(make_config([f"https://127.0.0.1:{uport}"]))
    port = (await nursery.start(gw.serve))[0][1]
    c = await Client.open(port)
    r = await c.request(b"GET", b"/")
    assert r.status == 502
    assert r.json()["error"] == "upstream_unreachable"
    assert up.received == []


async def test_tls_upstream_wrong_name_is_502(
    nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path
) -> None:
    up = Upstream(ssl_context=upstream_ctx(ca))
    uport = await nursery.start(up.serve)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    gw = Gateway(
        make_config(
            [f"https://127.0.0.1:{uport}"],
            backend_kw={"ca_file": str(ca_file), "server_name": "other.test"},
        )
    )
    port = (await nursery.start(gw.serve))[0][1]
    c = await Client.open(port)
    assert (await c.request(b"GET", b"/")).status == 502


async def test_mtls_to_upstream(nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path) -> None:
    up = Upstream(ssl_context=upstream_ctx(ca, require_client_cert=True))
    uport = await nursery.start(up.serve)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert, key = files(tmp_path, ca.issue_cert("gateway.client.test"), "client")
    gw = Gateway(
        make_config(
            [f"https://127.0.0.1:{uport}"],
            backend_kw={
                "ca_file": str(ca_file),
                "client_cert_file": cert,
                "client_key_file": key,
                "server_name": "fn.test",
            },
        )
    )
    port = (await nursery.start(gw.serve))[0][1]
    c = await Client.open(port)
    r = await c.request(b"GET", b"/")
    assert r.status == 200
    seen = up.received[0].peer_cert
    assert seen is not None
    assert ("DNS", "gateway.client.test") in seen["subjectAltName"]


async def test_tls_listener_and_mtls_callers(
    nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path
) -> None:
    peers: list[object] = []

    async def handler(req: Received, r: Responder) -> None:
        peers.extend(d.t.peer_cert for d in gw.connections)
        await r.respond(200, b"hi")

    up = Upstream(handler=handler)
    uport = await nursery.start(up.serve)
    cert, key = files(tmp_path, ca.issue_cert("localhost"), "server")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    lc = ListenerConfig(
        name="tls",
        host="127.0.0.1",
        port=0,
        tls_cert_file=cert,
        tls_key_file=key,
        client_ca_file=str(ca_file),
        client_cert="required",
    )
    gw = Gateway(make_config([f"http://127.0.0.1:{uport}"], listener=lc))
    port = (await nursery.start(gw.serve))[0][1]

    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    ca.issue_cert("caller@example.test", "svc.example.test").configure_cert(client_ctx)
    c = await Client.open(port, client_ctx)
    r = await c.request(b"GET", b"/x")
    assert r.status == 200 and r.body == b"hi"
    assert up.received[0].header(b"x-forwarded-proto") == b"https"
    # The verified client certificate is visible to later stages.
    assert any(p and ("DNS", "svc.example.test") in p["subjectAltName"] for p in peers)

    # Without a client certificate the handshake is refused and nothing is proxied.
    no_cert = ssl.create_default_context()
    ca.configure_trust(no_cert)
    with pytest.raises((trio.BrokenResourceError, ssl.SSLError, EOFError)):
        c2 = await Client.open(port, no_cert)
        await c2.request(b"GET", b"/y")
    assert len(up.received) == 1
