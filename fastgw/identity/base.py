"""What every identity source produces (``Identity``) and the two ways it can fail.

An ``Identity`` is built once per credential and shared: the JWT verifier caches it and
hands the same object to every request that carries the same token, so it is immutable
all the way down (a frozen dataclass whose ``claims`` is a read-only mapping).

Failures are of two kinds, and the difference decides the answer:

- ``AuthError``: the caller's credential is missing, malformed or not acceptable. The
  answer is RFC 6750's: 401 (``invalid_token``) or 400 (``invalid_request``), with a
  ``WWW-Authenticate: Bearer`` challenge built by ``fastgw.identity.answers``.
- ``IssuerUnavailable``: the credential may be fine but fastgw cannot check it yet (the
  issuer's keys were never loaded). The answer is 503 for that issuer only.

Both carry only text that is safe to show a client: fixed phrases chosen by fastgw,
never bytes from the token, never key material.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from fastgw.errors import FastgwError

__all__ = [
    "ANONYMOUS",
    "INVALID_REQUEST",
    "INVALID_TOKEN",
    "AuthError",
    "Identity",
    "IdentityConfigError",
    "IdentityKind",
    "IssuerUnavailable",
]

IdentityKind = Literal["jwt", "apikey", "mtls", "anonymous"]

# RFC 6750 3.1 error codes that authentication can produce. (``insufficient_scope`` is a
# policy decision, 403, and belongs to the policy layer.)
INVALID_REQUEST = "invalid_request"
INVALID_TOKEN = "invalid_token"

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling.

    - ``kind``: which source produced it.
    - ``subject``: ``sub`` of a JWT, the name of an API key, the SPIFFE ID / CN of a
      client certificate; ``""`` for anonymous.
    - ``issuer``: ``iss`` of a JWT, the issuer DN of a client certificate, None for API
      keys and anonymous callers.
    - ``claims``: the verified JWT claims, an API key's attributes, or the certificate's
      names; read-only.
    - ``key``: the name of what vouched for the caller: the JWT signing key's ``kid``
      (``""`` when the key has none), the API key's name, None otherwise.
    """

    kind: IdentityKind
    subject: str
    issuer: str | None = None
    # Not hashed (a mapping is not hashable); compared.
    claims: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, hash=False)
    key: str | None = None


ANONYMOUS = Identity("anonymous", "")


class AuthError(FastgwError):
    """A credential was missing, malformed or not acceptable.

    ``code`` is an RFC 6750 3.1 error code (``invalid_token`` or ``invalid_request``);
    ``description`` is a fixed phrase, safe to put in ``error_description`` and in a JSON
    body. ``status`` follows RFC 6750 3.1: 400 for ``invalid_request``, 401 otherwise.
    """

    def __init__(self, code: str, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description

    @property
    def status(self) -> int:
        return 400 if self.code == INVALID_REQUEST else 401

    def __repr__(self) -> str:
        return f"AuthError({self.code!r}, {self.description!r})"


class IssuerUnavailable(FastgwError):
    """The token names a configured issuer whose keys fastgw has not been able to load
    (never fetched successfully since start). Answer 503: the fault is not the caller's.
    ``issuer`` is the configured issuer's name (from config, safe to show)."""

    status = 503

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        self.description = f"signing keys of issuer {issuer} are not available yet"
        super().__init__(self.description)


class IdentityConfigError(ValueError):
    """Identity configuration (an issuer, its key files, API keys) is not usable.
    ``problems`` lists ``(field, message)`` pairs, fields named as in the constructor's
    arguments (``key_files[1]``, ``keys[3].sha256``), so a config loader can prefix its
    file and key path and report every problem at once."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{k}: {m}" for k, m in problems))
