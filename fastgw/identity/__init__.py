"""Who is calling: JWT bearer tokens (``jwt``), API keys (``apikey``), mTLS client
certificates (``mtls``), and RFC 6750 answers when that cannot be established
(``answers``). Public names only; the strategy of each part is in its module."""

from fastgw.identity.answers import Answer, answer_for, bearer_token, www_authenticate
from fastgw.identity.apikey import ApiKey, ApiKeys, generate_api_key, hash_api_key
from fastgw.identity.base import (
    ANONYMOUS,
    AuthError,
    Identity,
    IdentityConfigError,
    IssuerUnavailable,
)
from fastgw.identity.jwt import (
    Issuer,
    JwksFetcher,
    KeyFile,
    KeySet,
    StaticKeys,
    UnknownKey,
    Verifier,
    load_static_keys,
)
from fastgw.identity.mtls import identity_from_peer_cert

__all__ = [
    "ANONYMOUS",
    "Answer",
    "ApiKey",
    "ApiKeys",
    "AuthError",
    "Identity",
    "IdentityConfigError",
    "Issuer",
    "IssuerUnavailable",
    "JwksFetcher",
    "KeyFile",
    "KeySet",
    "StaticKeys",
    "UnknownKey",
    "Verifier",
    "answer_for",
    "bearer_token",
    "generate_api_key",
    "hash_api_key",
    "identity_from_peer_cert",
    "load_static_keys",
    "www_authenticate",
]
