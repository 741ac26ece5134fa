"""API keys: a secret in a configured request header, mapped to a named identity.

Strategy. Config holds only the SHA-256 of each key (hex), never the key, so a leaked
config file or a ``fastgw explain`` printout grants nothing. A presented key is hashed
once and the digest looked up in a dict of digests, so the work per request does not
depend on how many keys are configured or on how close a guess is to a real key: the
hash hides the presented bytes' relation to any stored key, and the one comparison made
is ``hmac.compare_digest`` on digests. Unsalted SHA-256 is enough because keys are
random and long (``generate_api_key`` gives 256 bits): there is nothing to brute-force
that a salt or a slow hash would protect, unlike passwords.

Every ``Identity`` is built once, at construction; ``lookup`` returns the shared object.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fastgw.identity.base import Identity, IdentityConfigError

__all__ = ["DEFAULT_HEADER", "ApiKey", "ApiKeys", "generate_api_key", "hash_api_key"]

DEFAULT_HEADER = "X-Api-Key"
# 1 KiB: generated keys are 43 characters and vendors' formats stay under 200; a longer
# value cannot be a key of ours, so it is not even hashed.
MAX_KEY_BYTES = 1024

_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}\Z")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:-]*\Z")
# RFC 9110 5.1: a field name is a token.
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")


def hash_api_key(key: str | bytes) -> str:
    """The value to put in config for ``key``: its SHA-256, 64 lowercase hex digits."""
    data = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(data).hexdigest()


def generate_api_key() -> str:
    """A new random key: 32 bytes from the OS CSPRNG, base64url (43 characters)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One configured key: its ``name`` (the identity's subject; several keys may share
    a name, which is how a key is rotated), the SHA-256 of the key as hex, and
    attributes that policies can test (e.g. ``{"team": "billing", "tier": "gold"}``)."""

    name: str
    sha256: str
    attributes: Mapping[str, Any] = field(default_factory=dict)


class ApiKeys:
    """The configured keys and the header they are read from.

    ``header`` is the field name as configured; ``header_name`` is it lowercased, as
    bytes, for lookups in a parsed head. Raises IdentityConfigError listing every bad
    name, hash or duplicate.
    """

    __slots__ = ("_by_digest", "header", "header_name")

    def __init__(self, keys: Iterable[ApiKey], header: str = DEFAULT_HEADER) -> None:
        problems: list[tuple[str, str]] = []
        if not isinstance(header, str) or not _TOKEN_RE.match(header):
            problems.append(("header", f"{header!r} is not a valid header field name"))
        by_digest: dict[bytes, tuple[bytes, Identity]] = {}
        for n, k in enumerate(keys):
            where = f"keys[{n}]"
            if not isinstance(k.name, str) or not _NAME_RE.match(k.name):
                problems.append((f"{where}.name", "use letters, digits and '_.@:-'"))
            if not isinstance(k.sha256, str) or not _HEX64_RE.match(k.sha256):
                problems.append(
                    (f"{where}.sha256", "must be the SHA-256 of the key as 64 hex digits")
                )
                continue
            digest = bytes.fromhex(k.sha256)
            if digest in by_digest:
                other = by_digest[digest][1].subject
                problems.append((f"{where}.sha256", f"same key hash as key {other!r}"))
                continue
            if not isinstance(k.attributes, Mapping):
                problems.append((f"{where}.attributes", "must be a table"))
                continue
            claims = MappingProxyType(dict(k.attributes))
            by_digest[digest] = (digest, Identity("apikey", k.name, None, claims, k.name))
        if problems:
            raise IdentityConfigError(problems)
        self._by_digest = by_digest
        self.header = header
        self.header_name = header.lower().encode()

    def identities(self) -> list[Identity]:
        """One identity per configured key (for ``fastgw who-can``)."""
        return [ident for _, ident in self._by_digest.values()]

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, presented: bytes | None) -> Identity | None:
        """The identity of the key ``presented`` (the header's value), or None when
        there is no such key (absent, empty, too long or unknown). Never raises for any
        bytes."""
        if not presented or len(presented) > MAX_KEY_BYTES:
            return None
        digest = hashlib.sha256(presented).digest()
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            return None
        return found[1]
