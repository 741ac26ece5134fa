"""RFC 6750 at the edge: reading a bearer token (section 2.1) and answering when
authentication fails (section 3).

Strategy. Every value that goes into ``WWW-Authenticate`` is reduced to the characters
RFC 6750 3 allows inside its quoted strings (``%x20-21 / %x23-5B / %x5D-7E``: printable
ASCII without ``"`` and ``\\``); anything else becomes ``?``. So no value can end its
quoted string early, add a parameter, or break the header line (CR, LF, NUL), whatever
a caller passes in, and no escaping rules are needed on either side. Descriptions are
also cut to ``MAX_DESCRIPTION`` characters.

``answer_for`` maps what the identity layer raised to what the gateway sends: status,
an error code for the JSON body, a safe detail, and the headers to add.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastgw.identity.base import INVALID_REQUEST, INVALID_TOKEN, AuthError, IssuerUnavailable

__all__ = [
    "DEFAULT_REALM",
    "Answer",
    "answer_for",
    "bearer_token",
    "check_realm",
    "www_authenticate",
]

DEFAULT_REALM = "fastgw"
# 200 characters: fastgw's own descriptions are under 60; the cap stops a bug from
# writing kilobytes into a header.
MAX_DESCRIPTION = 200
# RFC 6750 3.1 codes; insufficient_scope is the policy layer's (403).
ERROR_CODES = frozenset((INVALID_REQUEST, INVALID_TOKEN, "insufficient_scope"))

_UNSAFE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
# RFC 6749 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ), separated by spaces.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+\Z")
# RFC 6750 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*\Z")


def _safe(value: str, limit: int | None = None) -> str:
    if limit is not None and len(value) > limit:
        value = value[:limit]
    return _UNSAFE.sub("?", value)


def check_realm(realm: str) -> str | None:
    """None when ``realm`` is usable as configured; otherwise what is wrong (for the
    config loader: ``www_authenticate`` would replace the characters instead)."""
    if not realm:
        return "must not be empty"
    if _UNSAFE.search(realm):
        return 'must be printable ASCII without " or \\'
    return None


def www_authenticate(
    realm: str = DEFAULT_REALM,
    error: str | None = None,
    description: str | None = None,
    scope: str | None = None,
) -> bytes:
    """A ``WWW-Authenticate`` value: ``Bearer realm="..."[, scope="..."][, error="...",
    error_description="..."]`` (RFC 6750 3). With no ``error`` it is the challenge for a
    request that carried no credentials (RFC 6750 3.1: no error code then). Scope tokens
    with characters RFC 6749 3.3 does not allow are left out.

    Raises ValueError for an ``error`` that is not an RFC 6750 code (a bug in the caller).
    """
    params = [f'realm="{_safe(realm, MAX_DESCRIPTION)}"']
    if scope:
        tokens = [t for t in scope.split(" ") if _SCOPE_TOKEN.match(t)]
        if tokens:
            params.append(f'scope="{" ".join(tokens)}"')
    if error is not None:
        if error not in ERROR_CODES:
            raise ValueError(f"not an RFC 6750 error code: {error!r}")
        params.append(f'error="{error}"')
        if description:
            params.append(f'error_description="{_safe(description, MAX_DESCRIPTION)}"')
    return ("Bearer " + ", ".join(params)).encode("ascii")


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token in an ``Authorization: Bearer <token>`` value (RFC 6750 2.1; the scheme
    is case-insensitive, RFC 9110 11.1). None when there is no Authorization value or it
    uses another scheme: the request carries no bearer credentials. Raises AuthError
    ``invalid_request`` when it says Bearer but the token is missing or malformed.
    """
    if authorization is None:
        return None
    scheme, _, rest = authorization.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = rest.lstrip(b" ")
    if not token:
        raise AuthError(INVALID_REQUEST, "bearer token is missing")
    if _B64TOKEN.match(token) is None:
        raise AuthError(INVALID_REQUEST, "bearer token is malformed")
    return token


@dataclass(frozen=True, slots=True)
class Answer:
    """What to send when authentication did not succeed."""

    status: int
    code: str  # for the JSON body's "error"
    detail: str  # safe to show
    headers: tuple[tuple[bytes, bytes], ...]


def answer_for(problem: AuthError | IssuerUnavailable | None, realm: str = DEFAULT_REALM) -> Answer:
    """The answer to ``problem``: None (no credentials) -> 401 with a bare challenge;
    AuthError -> 401 or 400 with its RFC 6750 code; IssuerUnavailable -> 503, no
    challenge (the credential was not judged)."""
    if problem is None:
        header = www_authenticate(realm)
        return Answer(
            401, "unauthenticated", "credentials are required", ((b"www-authenticate", header),)
        )
    if isinstance(problem, IssuerUnavailable):
        return Answer(503, "issuer_unavailable", problem.description, ())
    header = www_authenticate(realm, problem.code, problem.description)
    return Answer(
        problem.status, problem.code, problem.description, ((b"www-authenticate", header),)
    )
