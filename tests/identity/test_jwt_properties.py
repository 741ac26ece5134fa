"""Properties of Verifier.verify over generated input.

- Any byte-level change to a valid token makes it fail, and the only exception that
  ever escapes ``verify`` is AuthError, for any bytes at all.
- On well-formed, correctly signed tokens with generated claims, fastgw and PyJWT's
  ``jwt.decode`` (the reference) agree: both accept with the same claims, or both
  refuse. Deliberate differences, covered in test_jwt_verify.py and kept out of the
  generators here: fastgw refuses strings and booleans as NumericDates (RFC 7519 2: a
  JSON number; PyJWT takes ``int(value)``) and NaN/Infinity anywhere (not JSON, RFC
  8259 6; Python's json module reads them).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from fastgw.identity import AuthError, Issuer, Verifier
from fastgw.identity.jwt import StaticKeys, _hmac_keys, keyset_from_jwks
from tests.identity.support import AUD, HMAC_SECRET, ISS, NOW, b64, claims, mint, public_jwk

FIXTURES = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def setup(rsa_key: Any, ec_key: Any, ed_key: Any) -> tuple[Verifier, list[bytes]]:
    iss = Issuer(
        name="idp",
        issuer=ISS,
        audiences=(AUD,),
        algorithms=("RS256", "ES256", "EdDSA", "HS256"),
        hmac_secret=HMAC_SECRET,
        jwks_url="https://idp.test/jwks",
    )
    jwks = {
        "keys": [
            public_jwk(rsa_key, "RS256", "rsa"),
            public_jwk(ec_key, "ES256", "ec"),
            public_jwk(ed_key, "EdDSA", "ed"),
        ]
    }
    ks, _ = keyset_from_jwks(jwks, iss.algorithms, _hmac_keys(iss))
    v = Verifier([iss], sources={"idp": StaticKeys(ks)})
    tokens = [
        mint(rsa_key, "RS256", kid="rsa"),
        mint(ec_key, "ES256", kid="ec"),
        mint(ed_key, "EdDSA", kid="ed"),
        mint(HMAC_SECRET, "HS256", kid=None),
    ]
    for t in tokens:
        v.verify(t, NOW)  # all valid (and now cached: mutants must not hit)
    return v, tokens


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, 10_000), st.sampled_from(b"A_-.=+/ \x00\r\n")),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 8)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
)


def mutate(token: bytes, op: tuple[str, int, Any]) -> bytes:
    kind, at, arg = op
    if not token and kind != "insert":
        return token
    i = at % (len(token) + (1 if kind == "insert" else 0))
    if kind == "flip":
        return token[:i] + bytes([token[i] ^ arg]) + token[i + 1 :]
    if kind == "set":
        return token[:i] + bytes([arg]) + token[i + 1 :]
    if kind == "delete":
        return token[:i] + token[i + arg :]
    if kind == "insert":
        return token[:i] + arg + token[i:]
    return token[:i]


@settings(FIXTURES, max_examples=300)
@given(which=st.integers(0, 3), ops=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_tokens_never_verify(
    setup: tuple[Verifier, list[bytes]], which: int, ops: list[tuple[str, int, Any]]
) -> None:
    v, tokens = setup
    token = tokens[which]
    for op in ops:
        token = mutate(token, op)
    assume(token != tokens[which])
    with pytest.raises(AuthError):
        v.verify(token, NOW)


@FIXTURES
@given(data=st.binary(max_size=9000))
def test_any_bytes_raise_only_auth_error(setup: tuple[Verifier, list[bytes]], data: bytes) -> None:
    v, _ = setup
    with pytest.raises(AuthError):
        v.verify(data, NOW)


_B64ISH = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/. ",
    max_size=200,
)


@FIXTURES
@given(h=_B64ISH, p=_B64ISH, s=_B64ISH)
def test_token_shaped_garbage_raises_only_auth_error(
    setup: tuple[Verifier, list[bytes]], h: str, p: str, s: str
) -> None:
    v, _ = setup
    with pytest.raises(AuthError):
        v.verify(f"{h}.{p}.{s}".encode(), NOW)


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@FIXTURES
@given(
    header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "x"]), _JSON),
    payload=_JSON,
)
def test_signed_arbitrary_json_raises_only_auth_error(
    setup: tuple[Verifier, list[bytes]], header: dict[str, Any], payload: Any
) -> None:
    """Correctly HMAC-signed tokens whose header and payload are any JSON."""
    v, _ = setup
    signing_input = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(payload).encode())
    sig = hmac.new(HMAC_SECRET, signing_input, hashlib.sha256).digest()
    try:
        ident = v.verify(signing_input + b"." + b64(sig), NOW)
    except AuthError:
        return
    # Accepted: then it really was a valid HS256 token for this issuer.
    assert header.get("alg") == "HS256"
    assert ident.claims == payload


# Offsets from now, in seconds, away from every boundary (leeway is 60 s) so that the
# second between our clock read and PyJWT's cannot matter. Each field is either left
# valid or drawn from these (valid and invalid values mixed), a few fields at a time, so
# that accepted and refused tokens are both common.
_VARIANTS: dict[str, st.SearchStrategy[Any]] = {
    "exp": st.sampled_from([None, -3600, -70, -65.5, -30, 30.5, 3600]),
    "nbf": st.sampled_from([None, -3600, 30, 70.5, 3600]),
    "iat": st.sampled_from([None, -3600, 30, 70.5, 3600]),
    "aud": st.sampled_from([None, AUD, "other", [AUD], ["x", AUD], ["x"], [], [AUD, 3], 7]),
    "iss": st.sampled_from([None, ISS, "https://other.test", ISS + "/"]),
    "sub": st.sampled_from([None, "alice", "", 5]),
}
_VALID: dict[str, Any] = {
    "exp": 600,
    "nbf": None,
    "iat": -10,
    "aud": AUD,
    "iss": ISS,
    "sub": "alice",
}


@settings(FIXTURES, max_examples=300)
@given(data=st.data(), extra=_JSON)
def test_agrees_with_pyjwt_decode(data: st.DataObject, extra: Any) -> None:
    varied = data.draw(st.sets(st.sampled_from(sorted(_VARIANTS)), max_size=3))
    values = {k: data.draw(_VARIANTS[k]) if k in varied else v for k, v in _VALID.items()}
    iss_cfg = Issuer(
        name="hs", issuer=ISS, audiences=(AUD,), algorithms=("HS256",), hmac_secret=HMAC_SECRET
    )
    v = Verifier([iss_cfg], cache_size=0)
    now = time.time()
    base = int(now)
    payload = claims(extra=extra, **{k: values[k] for k in ("aud", "iss", "sub")})
    for k in ("exp", "nbf", "iat"):
        if values[k] is None:
            payload.pop(k, None)
        else:
            payload[k] = base + values[k]
    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(json.dumps(payload).encode())
    token = (
        signing_input + b"." + b64(hmac.new(HMAC_SECRET, signing_input, hashlib.sha256).digest())
    )
    try:
        ours: dict[str, Any] | None = dict(v.verify(token, now).claims)
    except AuthError:
        ours = None
    try:
        ref: dict[str, Any] | None = jwt.decode(
            token,
            HMAC_SECRET,
            algorithms=["HS256"],
            audience=AUD,
            issuer=ISS,
            leeway=60,
            options={"require": ["exp"]},
        )
    except jwt.PyJWTError:
        ref = None
    event("accepted" if ours is not None else "refused")
    assert ours == ref
