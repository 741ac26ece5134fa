"""mTLS identities: from getpeercert() dicts as ssl makes them, over a real handshake, and
from hand-built dicts for the shapes a real CA rarely issues."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import ssl
from typing import Any

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fastgw.identity import identity_from_peer_cert
from fastgw.identity.mtls import dn_string, spiffe_id


def client_cert(
    ca: trustme.CA, cn: str | None, sans: list[x509.GeneralName]
) -> tuple[bytes, bytes]:
    """A client certificate signed by the trustme CA, with any SANs (trustme cannot make
    URI SANs, which SPIFFE needs)."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example, Inc.")]
    if cn is not None:
        names.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(names))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


async def peer_cert_over_tls(ca: trustme.CA, cert_pem: bytes, key_pem: bytes, tmp: Any) -> dict:
    """Handshake client -> server on 127.0.0.1 with a required client certificate;
    return what the server's getpeercert() says."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    (tmp / "c.pem").write_bytes(cert_pem + key_pem)
    client_ctx.load_cert_chain(str(tmp / "c.pem"))
    got: dict = {}

    async def handler(stream: trio.SocketStream) -> None:
        s = trio.SSLStream(stream, server_ctx, server_side=True)
        await s.do_handshake()
        got.update(s.getpeercert())
        await s.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        client = trio.SSLStream(tcp, client_ctx, server_hostname="127.0.0.1")
        await client.do_handshake()
        await client.receive_some(1)  # the server's close
        await client.aclose()
        nursery.cancel_scope.cancel()
    return got


async def test_spiffe_svid_over_a_real_handshake(ca: trustme.CA, tmp_path: Any) -> None:
    cert, key = client_cert(
        ca,
        "billing",
        [x509.UniformResourceIdentifier("spiffe://prod.example.org/ns/billing/sa/api")],
    )
    ident = identity_from_peer_cert(await peer_cert_over_tls(ca, cert, key, tmp_path))
    assert ident is not None
    assert ident.kind == "mtls"
    assert ident.subject == "spiffe://prod.example.org/ns/billing/sa/api"
    assert ident.claims["spiffe_id"] == ident.subject
    assert ident.claims["cn"] == "billing"
    assert ident.claims["subject_dn"] == "CN=billing,O=Example\\, Inc."
    assert ident.issuer is not None and "trustme" in ident.issuer
    assert ident.claims["serial"]


async def test_dns_email_ip_sans_over_a_real_handshake(ca: trustme.CA, tmp_path: Any) -> None:
    cert, key = client_cert(
        ca,
        None,
        [
            x509.DNSName("worker.internal"),
            x509.RFC822Name("ops@example.org"),
            x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
            x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
        ],
    )
    ident = identity_from_peer_cert(await peer_cert_over_tls(ca, cert, key, tmp_path))
    assert ident is not None
    assert ident.subject == "worker.internal"  # no SPIFFE ID, no CN: the first DNS name
    assert ident.claims["dns"] == ("worker.internal",)
    assert ident.claims["email"] == ("ops@example.org",)
    assert ident.claims["ip"] == ("10.1.2.3", "2001:DB8:0:0:0:0:0:1")
    assert ident.claims["spiffe_id"] is None


def test_no_certificate() -> None:
    assert identity_from_peer_cert(None) is None
    assert identity_from_peer_cert({}) is None  # getpeercert() of an unverified peer


def test_subject_preference() -> None:
    def subject(cert: dict) -> str:
        ident = identity_from_peer_cert(cert)
        assert ident is not None
        return ident.subject

    cn = {"subject": ((("commonName", "svc-a"),),)}
    assert subject(cn) == "svc-a"
    assert subject({**cn, "subjectAltName": (("URI", "spiffe://td/x"),)}) == "spiffe://td/x"
    # Two URI SANs: not an SVID (SPIFFE X509-SVID 2), so no SPIFFE ID.
    two = {**cn, "subjectAltName": (("URI", "spiffe://td/x"), ("URI", "https://x.test/"))}
    assert subject(two) == "svc-a"
    assert subject({"subjectAltName": (("email", "a@b.test"),)}) == "a@b.test"
    assert subject({"subject": ((("organizationName", "Org"),),)}) == "O=Org"


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("spiffe://example.org", True),
        ("spiffe://example.org/ns/default/sa/x", True),
        ("spiffe://ex-ample_1.org/a.b-c_d", True),
        ("SPIFFE://example.org/x", False),
        ("spiffe://Example.org/x", False),
        ("spiffe://example.org/", False),
        ("spiffe://example.org//x", False),
        ("spiffe://example.org/./x", False),
        ("spiffe://example.org/../x", False),
        ("spiffe://example.org:443/x", False),
        ("spiffe://user@example.org/x", False),
        ("spiffe://example.org/x?q=1", False),
        ("spiffe://example.org/x#f", False),
        ("spiffe://example.org/%41", False),
        ("spiffe:///x", False),
        ("spiffe://example.org/" + "a" * 2100, False),
    ],
)
def test_spiffe_id_validation(uri: str, ok: bool) -> None:
    assert (spiffe_id(uri) == uri) is ok


def test_dn_escaping() -> None:
    rdns = (
        (("countryName", "DE"),),
        (("organizationName", 'A "B" + C; <D>\\'),),
        (("commonName", " #lead"), ("serialNumber", "trail ")),
        (("commonName", "line\r\nX-Injected: 1"),),
    )
    assert dn_string(rdns) == (
        "CN=line\\0d\\0aX-Injected: 1,"
        "CN=\\ #lead+serialNumber=trail\\ ,"
        'O=A \\"B\\" \\+ C\\; \\<D\\>\\\\,'
        "C=DE"
    )
