"""mTLS callers: an identity from the client certificate an mTLS listener verified.

Strategy. The TLS layer has already verified the chain against the listener's client
CA; this module only reads names out of the certificate as ``ssl`` reports them
(``SSLObject.getpeercert()``: a dict of nested tuples) and never parses DER itself.
``getpeercert()`` returns ``{}`` for a certificate that was not verified, and
``identity_from_peer_cert`` treats that, like None, as "no client certificate".

The subject, in order of preference: the SPIFFE ID (a workload identity, SPIFFE
X509-SVID 2: exactly one URI SAN, ``spiffe://trust-domain/path``), the subject's common
name, the first DNS name, the first email address, the whole subject DN. Every name is
also in ``claims`` for policies: ``cn``, ``dns``, ``uri``, ``email``, ``ip`` (tuples),
``spiffe_id`` (or None), ``subject_dn``, ``issuer_dn`` (RFC 4514 strings), ``serial``
and ``not_after`` as ``ssl`` gives them. ``Identity.issuer`` is the issuer DN.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from fastgw.identity.base import Identity

__all__ = ["dn_string", "identity_from_peer_cert", "spiffe_id"]

# The attribute names ssl reports, as RFC 4514 3 writes them; others keep ssl's name.
_SHORT_NAMES = {
    "commonName": "CN",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}

# SPIFFE ID spec 2.1-2.3: lowercase trust domain of [a-z0-9._-]; path segments of
# [A-Za-z0-9._-], none empty, "." or ".."; no query, fragment, port or user info.
_SPIFFE_RE = re.compile(r"spiffe://([a-z0-9._-]+)((?:/[A-Za-z0-9._-]+)*)\Z")
# SPIFFE ID spec 2.4: at most 2048 bytes; 2.1: a trust domain of at most 255.
_SPIFFE_MAX = 2048
_TRUST_DOMAIN_MAX = 255


def spiffe_id(uri: str) -> str | None:
    """``uri`` if it is a valid SPIFFE ID, else None."""
    if len(uri) > _SPIFFE_MAX:
        return None
    m = _SPIFFE_RE.match(uri)
    if m is None or len(m.group(1)) > _TRUST_DOMAIN_MAX:
        return None
    if any(seg in (".", "..") for seg in m.group(2).split("/")):
        return None
    return uri


def _escape(value: str) -> str:
    """RFC 4514 2.4 escaping, plus hex escapes for control characters so the string is
    safe in a header or a log line."""
    out = []
    for i, c in enumerate(value):
        if c in '"+,;<>\\' or (i == 0 and c in " #") or (i == len(value) - 1 and c == " "):
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\{ord(c):02x}")
        else:
            out.append(c)
    return "".join(out)


def dn_string(rdns: Any) -> str:
    """ssl's ``((('commonName', 'x'),), ...)`` as an RFC 4514 string, last RDN first
    (``CN=x,O=Example,C=DE``); multi-valued RDNs joined with ``+``."""
    parts = []
    for rdn in reversed(tuple(rdns or ())):
        parts.append(
            "+".join(f"{_SHORT_NAMES.get(name, name)}={_escape(str(value))}" for name, value in rdn)
        )
    return ",".join(parts)


def identity_from_peer_cert(cert: Mapping[str, Any] | None) -> Identity | None:
    """The caller's identity from a verified peer certificate dict, or None when there is
    none (None or ``{}``). Raises nothing for any dict ``ssl`` can produce; a dict of
    another shape is a bug in the caller."""
    if not cert:
        return None
    subject = cert.get("subject", ())
    cn = None
    for rdn in subject:
        for name, value in rdn:
            if name == "commonName" and cn is None:
                cn = value
    dns: list[str] = []
    uri: list[str] = []
    email: list[str] = []
    ip: list[str] = []
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            dns.append(value)
        elif kind == "URI":
            uri.append(value)
        elif kind == "email":
            email.append(value)
        elif kind == "IP Address":
            ip.append(value.strip())  # ssl appends a newline to IPv6 addresses
    # SPIFFE X509-SVID 2: an SVID carries exactly one URI SAN.
    spiffe = spiffe_id(uri[0]) if len(uri) == 1 else None
    subject_dn = dn_string(subject)
    issuer_dn = dn_string(cert.get("issuer", ()))
    claims = {
        "cn": cn,
        "dns": tuple(dns),
        "uri": tuple(uri),
        "email": tuple(email),
        "ip": tuple(ip),
        "spiffe_id": spiffe,
        "subject_dn": subject_dn,
        "issuer_dn": issuer_dn,
        "serial": cert.get("serialNumber"),
        "not_after": cert.get("notAfter"),
    }
    name = spiffe or cn or (dns[0] if dns else None) or (email[0] if email else None)
    return Identity("mtls", name or subject_dn, issuer_dn or None, MappingProxyType(claims))
