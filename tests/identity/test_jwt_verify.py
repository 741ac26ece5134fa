"""Verifier.verify on static keys: every acceptance and every rejection, and the cache.

No network here (tests/identity/test_jwks.py has the fetching side). ``now`` is passed
explicitly, so time is whatever a test says it is.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fastgw.identity import (
    AuthError,
    Identity,
    IdentityConfigError,
    Issuer,
    IssuerUnavailable,
    KeySet,
    StaticKeys,
    UnknownKey,
    Verifier,
)
from fastgw.identity import jwt as fj
from fastgw.identity.jwt import keyset_from_jwks
from tests.identity.support import (
    AUD,
    HMAC_SECRET,
    ISS,
    NOW,
    b64,
    claims,
    mint,
    public_jwk,
    public_pem,
    raw,
    sign_raw,
)

ALL_ASYM = ("RS256", "ES256", "EdDSA", "PS256")


def issuer(**kw: Any) -> Issuer:
    base: dict[str, Any] = {
        "name": "idp",
        "issuer": ISS,
        "audiences": (AUD,),
        "jwks_url": "https://idp.test/jwks.json",
    }
    base.update(kw)
    return Issuer(**base)


class Keys:
    """A mutable key source, as a fetcher would be: ``keys`` is swapped whole."""

    def __init__(self, keys: KeySet | None) -> None:
        self.keys = keys
        self.refetches = 0

    def request_refetch(self) -> None:
        self.refetches += 1

    async def wait_refetch(self, timeout_s: float) -> bool:
        return False

    def statistics(self) -> dict[str, Any]:
        return {"ready": self.keys is not None}


@pytest.fixture
def jwks(rsa_key: Any, ec_key: Any, ed_key: Any) -> dict[str, Any]:
    return {
        "keys": [
            public_jwk(rsa_key, "RS256", "rsa1"),
            public_jwk(ec_key, "ES256", "ec1"),
            public_jwk(ed_key, "EdDSA", "ed1"),
        ]
    }


def verifier_for(
    jwks: dict[str, Any], iss: Issuer | None = None, **kw: Any
) -> tuple[Verifier, Keys]:
    iss = iss or issuer()
    extra = fj._hmac_keys(iss)
    ks, _ = keyset_from_jwks(jwks, iss.algorithms, extra)
    src = Keys(ks)
    return Verifier([iss], sources={iss.name: src}, **kw), src


@pytest.fixture
def v(jwks: dict[str, Any]) -> Verifier:
    return verifier_for(jwks)[0]


def reject(v: Verifier, token: bytes, description: str, now: float = NOW) -> AuthError:
    with pytest.raises(AuthError) as info:
        v.verify(token, now)
    assert info.value.code == "invalid_token"
    assert info.value.description == description
    assert info.value.status == 401
    return info.value


# --- acceptance ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "fixture", "kid"),
    [("RS256", "rsa_key", "rsa1"), ("ES256", "ec_key", "ec1"), ("EdDSA", "ed_key", "ed1")],
)
def test_valid_token_of_each_default_algorithm(
    v: Verifier, request: pytest.FixtureRequest, alg: str, fixture: str, kid: str
) -> None:
    key = request.getfixturevalue(fixture)
    ident = v.verify(mint(key, alg, kid=kid), NOW)
    assert ident == Identity("jwt", "alice", ISS, claims(), kid)
    assert ident.kind == "jwt"
    assert ident.claims["aud"] == AUD


def test_hs256_only_with_a_configured_secret(jwks: dict[str, Any]) -> None:
    iss = issuer(algorithms=("RS256", "HS256"), hmac_secret=HMAC_SECRET, hmac_kid="hs")
    v, _ = verifier_for(jwks, iss)
    assert v.verify(mint(HMAC_SECRET, "HS256", kid="hs"), NOW).key == "hs"
    # Without the secret, HS256 cannot even be configured...
    with pytest.raises(IdentityConfigError, match="HS256 needs an HMAC secret"):
        issuer(algorithms=("RS256", "HS256"))
    # ... and the default allowlist refuses an HS256 token outright.
    v2, _ = verifier_for(jwks)
    reject(v2, mint(HMAC_SECRET, "HS256", kid="hs"), fj.BAD_ALGORITHM)


def test_ps256_when_allowed(rsa_key: Any) -> None:
    # An RSA JWK without "alg" may verify every allowed RSA algorithm.
    jwk = public_jwk(rsa_key, "RS256", "rsa1", with_alg=False)
    v, _ = verifier_for({"keys": [jwk]}, issuer(algorithms=("RS256", "PS256")))
    assert v.verify(mint(rsa_key, "PS256", kid="rsa1"), NOW).subject == "alice"
    assert v.verify(mint(rsa_key, "RS256", kid="rsa1"), NOW).subject == "alice"
    reject(v, mint(rsa_key, "RS384", kid="rsa1"), fj.BAD_ALGORITHM)


def test_a_jwk_alg_binds_the_key_to_that_algorithm(rsa_key: Any) -> None:
    v, _ = verifier_for(
        {"keys": [public_jwk(rsa_key, "RS256", "rsa1")]}, issuer(algorithms=("RS256", "PS256"))
    )
    reject(v, mint(rsa_key, "PS256", kid="rsa1"), fj.BAD_ALGORITHM)


def test_same_claims_as_pyjwt_decode(v: Verifier, rsa_key: Any) -> None:
    payload = claims(groups=["a", "b"], scope="read write", nested={"x": [1, 2.5, None]})
    token = mint(rsa_key, "RS256", payload, kid="rsa1")
    ref = jwt.decode(
        token,
        rsa_key.public_key(),
        algorithms=["RS256"],
        audience=AUD,
        issuer=ISS,
        options={"verify_exp": False, "verify_iat": False},
    )
    assert dict(v.verify(token, NOW).claims) == ref


def test_audience_list_with_one_accepted(v: Verifier, rsa_key: Any) -> None:
    token = mint(rsa_key, "RS256", claims(aud=["other", AUD]), kid="rsa1")
    assert v.verify(token, NOW).subject == "alice"


def test_token_without_kid_uses_the_only_key_of_its_algorithm(v: Verifier, rsa_key: Any) -> None:
    assert v.verify(mint(rsa_key, "RS256", kid=None), NOW).key == "rsa1"


def test_token_without_kid_is_refused_when_ambiguous(rsa_key: Any, rsa_key2: Any) -> None:
    v, _ = verifier_for(
        {"keys": [public_jwk(rsa_key, "RS256", "a"), public_jwk(rsa_key2, "RS256", "b")]}
    )
    reject(v, mint(rsa_key, "RS256", kid=None), fj.NO_KEY_ID)


def test_kidless_keys_are_each_tried(rsa_key: Any, rsa_key2: Any) -> None:
    # Static PEMs without kid (old + new during a rotation): either may verify.
    v, _ = verifier_for(
        {
            "keys": [
                public_jwk(rsa_key, "RS256", None),
                public_jwk(rsa_key2, "RS256", None),
            ]
        }
    )
    assert v.verify(mint(rsa_key2, "RS256", kid=None), NOW).key == ""
    assert v.verify(mint(rsa_key2, "RS256", kid="whatever"), NOW).subject == "alice"


def test_claims_are_read_only(v: Verifier, rsa_key: Any) -> None:
    ident = v.verify(mint(rsa_key, "RS256", kid="rsa1"), NOW)
    with pytest.raises(TypeError):
        ident.claims["sub"] = "mallory"  # type: ignore[index]


# --- time ----------------------------------------------------------------------------


def test_expired_with_leeway(v: Verifier, rsa_key: Any) -> None:
    token = mint(rsa_key, "RS256", claims(exp=int(NOW) - 30), kid="rsa1")
    assert v.verify(token, NOW).subject == "alice"  # inside the 60 s leeway
    token = mint(rsa_key, "RS256", claims(exp=int(NOW) - 60), kid="rsa1")
    reject(v, token, fj.EXPIRED)  # exp <= now - leeway, as PyJWT


def test_not_yet_valid(v: Verifier, rsa_key: Any) -> None:
    assert v.verify(mint(rsa_key, "RS256", claims(nbf=int(NOW) + 60), kid="rsa1"), NOW)
    reject(v, mint(rsa_key, "RS256", claims(nbf=int(NOW) + 61), kid="rsa1"), fj.NOT_YET_VALID)
    reject(v, mint(rsa_key, "RS256", claims(iat=int(NOW) + 61), kid="rsa1"), fj.NOT_YET_VALID)


def test_zero_leeway(jwks: dict[str, Any], rsa_key: Any) -> None:
    v, _ = verifier_for(jwks, issuer(leeway_s=0))
    token = mint(rsa_key, "RS256", claims(exp=int(NOW) + 1), kid="rsa1")
    assert v.verify(token, NOW).subject == "alice"
    reject(v, token, fj.EXPIRED, now=NOW + 1)


def test_expiry_is_checked_before_the_signature(v: Verifier, rsa_key: Any) -> None:
    # An expired token with a forged signature says "expired", like a genuine one: the
    # answer tells nothing about whether the signature would have verified.
    good = mint(rsa_key, "RS256", claims(exp=int(NOW) - 3600), kid="rsa1")
    forged = good[: good.rindex(b".") + 1] + b64(b"\x00" * 256)
    assert reject(v, good, fj.EXPIRED).description == reject(v, forged, fj.EXPIRED).description


@pytest.mark.parametrize("bad", [True, "1800000600", [1], {"a": 1}])
def test_numeric_dates_must_be_numbers(v: Verifier, rsa_key: Any, bad: Any) -> None:
    reject(v, mint(rsa_key, "RS256", claims(exp=bad), kid="rsa1"), fj.MALFORMED)
    reject(v, mint(rsa_key, "RS256", claims(nbf=bad), kid="rsa1"), fj.MALFORMED)


@pytest.mark.parametrize("text", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_dates_are_malformed(jwks: dict[str, Any], text: bytes) -> None:
    iss = issuer(algorithms=("RS256", "HS256"), hmac_secret=HMAC_SECRET)
    v, _ = verifier_for(jwks, iss)
    payload = json.dumps(claims(exp=0)).encode().replace(b'"exp": 0', b'"exp": ' + text)
    header = b64(b'{"alg":"HS256","typ":"JWT"}')
    signing_input = header + b"." + b64(payload)
    sig = hmac.new(HMAC_SECRET, signing_input, hashlib.sha256).digest()
    reject(v, signing_input + b"." + b64(sig), fj.MALFORMED)


def test_nan_anywhere_in_the_payload_is_malformed(jwks: dict[str, Any]) -> None:
    # RFC 8259 6: NaN and Infinity are not JSON; Python's json module would read them.
    iss = issuer(algorithms=("RS256", "HS256"), hmac_secret=HMAC_SECRET)
    v, _ = verifier_for(jwks, iss)
    payload = json.dumps(claims(score=float("nan"))).encode()
    assert b"NaN" in payload
    header = b64(b'{"alg":"HS256"}')
    signing_input = header + b"." + b64(payload)
    sig = hmac.new(HMAC_SECRET, signing_input, hashlib.sha256).digest()
    reject(v, signing_input + b"." + b64(sig), fj.MALFORMED)


# --- issuer, audience, claims --------------------------------------------------------


def test_wrong_issuer(v: Verifier, rsa_key: Any) -> None:
    reject(
        v, mint(rsa_key, "RS256", claims(iss="https://evil.test"), kid="rsa1"), fj.UNKNOWN_ISSUER
    )
    reject(v, mint(rsa_key, "RS256", claims(iss=None), kid="rsa1"), fj.UNKNOWN_ISSUER)
    header = {"alg": "RS256", "kid": "rsa1"}
    reject(v, sign_raw(rsa_key, "RS256", header, claims(iss=5)), fj.UNKNOWN_ISSUER)


def test_wrong_audience(v: Verifier, rsa_key: Any) -> None:
    reject(v, mint(rsa_key, "RS256", claims(aud="api://other"), kid="rsa1"), fj.BAD_AUDIENCE)
    reject(v, mint(rsa_key, "RS256", claims(aud=["x", "y"]), kid="rsa1"), fj.BAD_AUDIENCE)
    reject(v, mint(rsa_key, "RS256", claims(aud=[]), kid="rsa1"), fj.BAD_AUDIENCE)
    reject(v, mint(rsa_key, "RS256", claims(aud=None), kid="rsa1"), fj.BAD_AUDIENCE)
    reject(v, mint(rsa_key, "RS256", claims(aud=[AUD, 5]), kid="rsa1"), fj.MALFORMED)
    reject(v, mint(rsa_key, "RS256", claims(aud={"a": AUD}), kid="rsa1"), fj.MALFORMED)


def test_required_claims(jwks: dict[str, Any], rsa_key: Any) -> None:
    v, _ = verifier_for(jwks, issuer(required_claims=("exp", "email")))
    reject(v, mint(rsa_key, "RS256", kid="rsa1"), fj.MISSING_CLAIM)
    assert v.verify(mint(rsa_key, "RS256", claims(email="a@x"), kid="rsa1"), NOW)
    # exp is required by default.
    v2, _ = verifier_for(jwks)
    reject(v2, mint(rsa_key, "RS256", claims(exp=None), kid="rsa1"), fj.MISSING_CLAIM)


def test_non_string_subject(v: Verifier, rsa_key: Any) -> None:
    reject(v, mint(rsa_key, "RS256", claims(sub=42), kid="rsa1"), fj.MALFORMED)


# --- algorithms and keys -------------------------------------------------------------


def test_bad_signature(v: Verifier, rsa_key: Any, rsa_key2: Any) -> None:
    token = mint(rsa_key, "RS256", kid="rsa1")
    head, _, sig = token.rpartition(b".")
    flipped = bytearray(fj._b64decode(sig))
    flipped[10] ^= 1
    reject(v, head + b"." + b64(bytes(flipped)), fj.BAD_SIGNATURE)
    reject(v, mint(rsa_key2, "RS256", kid="rsa1"), fj.BAD_SIGNATURE)  # another key, same kid
    reject(v, head + b".", fj.BAD_SIGNATURE)  # no signature at all
    # The payload changed after signing.
    h, _, s = token.split(b".")
    other = b64(json.dumps(claims(sub="mallory")).encode())
    reject(v, h + b"." + other + b"." + s, fj.BAD_SIGNATURE)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_never_accepted(v: Verifier, alg: str) -> None:
    reject(v, raw({"alg": alg, "typ": "JWT"}, claims()), fj.BAD_ALGORITHM)
    reject(v, raw({"alg": alg, "kid": "rsa1"}, claims()), fj.BAD_ALGORITHM)


def test_none_cannot_be_configured() -> None:
    with pytest.raises(IdentityConfigError, match="never allowed"):
        issuer(algorithms=("RS256", "none"))


def test_hs256_signed_with_the_rsa_public_key_is_refused(
    jwks: dict[str, Any], rsa_key: Any
) -> None:
    """The RS256 -> HS256 confusion: the attacker signs with HMAC, using the (public)
    RSA key's PEM as the secret, hoping the verifier passes that key to HMAC."""
    pem = public_pem(rsa_key)
    header = {"alg": "HS256", "kid": "rsa1", "typ": "JWT"}
    signing_input = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(claims()).encode())
    sig = hmac.new(pem, signing_input, hashlib.sha256).digest()
    token = signing_input + b"." + b64(sig)
    # Default issuer: HS256 is not allowed at all.
    v, _ = verifier_for(jwks)
    reject(v, token, fj.BAD_ALGORITHM)
    # An issuer that does allow HS256 (with its own secret): the kid names the RSA key,
    # which is bound to RS256 only.
    iss = issuer(algorithms=("RS256", "HS256"), hmac_secret=HMAC_SECRET)
    v2, _ = verifier_for(jwks, iss)
    reject(v2, token, fj.BAD_ALGORITHM)
    # Without a kid the HMAC secret is tried, and the signature does not match it.
    no_kid = {"alg": "HS256", "typ": "JWT"}
    signing_input = b64(json.dumps(no_kid).encode()) + b"." + b64(json.dumps(claims()).encode())
    sig = hmac.new(pem, signing_input, hashlib.sha256).digest()
    reject(v2, signing_input + b"." + b64(sig), fj.BAD_SIGNATURE)


def test_pem_as_hmac_secret_cannot_be_configured(rsa_key: Any) -> None:
    with pytest.raises(IdentityConfigError, match="asymmetric"):
        issuer(algorithms=("HS256",), hmac_secret=public_pem(rsa_key), jwks_url=None)


def test_alg_not_in_allowlist(v: Verifier, rsa_key: Any) -> None:
    reject(v, mint(rsa_key, "RS512", kid="rsa1"), fj.BAD_ALGORITHM)


def test_alg_of_another_key_type(v: Verifier, ec_key: Any) -> None:
    # ES256 header naming the RSA key's kid.
    reject(v, mint(ec_key, "ES256", kid="rsa1"), fj.BAD_ALGORITHM)


def test_unknown_kid_asks_for_a_refetch(jwks: dict[str, Any], rsa_key: Any) -> None:
    v, src = verifier_for(jwks)
    with pytest.raises(UnknownKey) as info:
        v.verify(mint(rsa_key, "RS256", kid="rotated"), NOW)
    assert info.value.description == fj.UNKNOWN_KEY
    assert src.refetches == 1


def test_crit_header_is_refused(v: Verifier, rsa_key: Any) -> None:
    token = sign_raw(rsa_key, "RS256", {"alg": "RS256", "kid": "rsa1", "crit": ["exp"]}, claims())
    reject(v, token, fj.BAD_HEADER)


def test_key_urls_in_the_header_are_ignored(v: Verifier, rsa_key2: Any) -> None:
    # jku/jwk in the header never supply a key: signed with a key of the attacker's.
    header = {
        "alg": "RS256",
        "kid": "rsa1",
        "jku": "https://evil.test/jwks",
        "jwk": public_jwk(rsa_key2, "RS256", "rsa1"),
    }
    reject(v, sign_raw(rsa_key2, "RS256", header, claims()), fj.BAD_SIGNATURE)


def test_issuer_without_keys_is_unavailable(rsa_key: Any) -> None:
    iss = issuer()
    v = Verifier([iss], sources={"idp": Keys(None)})
    with pytest.raises(IssuerUnavailable) as info:
        v.verify(mint(rsa_key, "RS256", kid="rsa1"), NOW)
    assert info.value.status == 503
    assert "idp" in info.value.description
    assert not v.ready("idp")


def test_two_issuers(jwks: dict[str, Any], rsa_key: Any, ec_key: Any) -> None:
    a = issuer(name="a", issuer="https://a.test")
    b = issuer(name="b", issuer="https://b.test", audiences=("b-api",))
    ks_a, _ = keyset_from_jwks({"keys": [public_jwk(rsa_key, "RS256", "k")]}, a.algorithms)
    ks_b, _ = keyset_from_jwks({"keys": [public_jwk(ec_key, "ES256", "k")]}, b.algorithms)
    v = Verifier([a, b], sources={"a": StaticKeys(ks_a), "b": StaticKeys(ks_b)})
    ta = mint(rsa_key, "RS256", claims(iss="https://a.test"), kid="k")
    tb = mint(ec_key, "ES256", claims(iss="https://b.test", aud="b-api"), kid="k")
    assert v.verify(ta, NOW).issuer == "https://a.test"
    assert v.verify(tb, NOW).issuer == "https://b.test"
    # b's key does not verify a's tokens, even with the same kid.
    reject(
        v,
        mint(rsa_key, "RS256", claims(iss="https://b.test", aud="b-api"), kid="k"),
        fj.BAD_ALGORITHM,
    )
    with pytest.raises(ValueError, match="two issuers"):
        Verifier([a, a], sources={"a": StaticKeys(ks_a)})


# --- structure -----------------------------------------------------------------------


def _valid_parts(rsa_key: Any) -> tuple[bytes, bytes, bytes]:
    h, p, s = mint(rsa_key, "RS256", kid="rsa1").split(b".")
    return h, p, s


@pytest.mark.parametrize(
    "make",
    [
        lambda h, p, s: b"",
        lambda h, p, s: h,
        lambda h, p, s: h + b"." + p,
        lambda h, p, s: h + b"." + p + b"." + s + b".",
        lambda h, p, s: h + b"." + p + b"." + s + b".x",
        lambda h, p, s: h + b"==." + p + b"." + s,  # padding
        lambda h, p, s: h + b"." + p + b"." + s + b"==",
        lambda h, p, s: h.replace(b"J", b"+") + b"." + p + b"." + s,  # standard alphabet
        lambda h, p, s: h + b"." + p.replace(b"e", b"/") + b"." + s,
        lambda h, p, s: h + b" ." + p + b"." + s,
        lambda h, p, s: h + b"\n." + p + b"." + s,
        lambda h, p, s: h[:-1] + b"." + p + b"." + s,  # cut inside a base64 group
        lambda h, p, s: b"A" + h + b"." + p + b"." + s,
        lambda h, p, s: h + b"." + b"A" + p + b"." + s,
        lambda h, p, s: b"." + p + b"." + s,
        lambda h, p, s: h + b".." + s,
    ],
)
def test_malformed_structure(v: Verifier, rsa_key: Any, make: Any) -> None:
    reject(v, make(*_valid_parts(rsa_key)), fj.MALFORMED)


def test_non_canonical_base64_is_refused(v: Verifier, rsa_key: Any) -> None:
    """A last character carrying non-zero unused bits decodes to the same bytes in a
    lenient decoder: one token, two spellings. fastgw refuses the second."""
    h, p, s = _valid_parts(rsa_key)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for seg, make in (
        (h, lambda x: x + b"." + p + b"." + s),
        (s, lambda x: h + b"." + p + b"." + x),
    ):
        if len(seg) % 4 in (2, 3):
            bits = 4 if len(seg) % 4 == 2 else 2
            value = alphabet.index(seg[-1:])
            twin = seg[:-1] + alphabet[value + 1 : value + 2]
            assert value % (1 << bits) == 0 and (value + 1) % (1 << bits) != 0
            reject(v, make(twin), fj.MALFORMED)


@pytest.mark.parametrize(
    "header",
    [
        b"not json",
        b"[1, 2]",
        b'"alg"',
        b'{"alg": "RS256"',
        b'{"alg": 256}',
        b'{"alg": "RS256", "kid": 1}',
        b"\xff\xfe{}",
        '{"alg": "RS256"}'.encode("utf-16"),
        b"\xef\xbb\xbf" + b'{"alg": "RS256"}',  # UTF-8 BOM: RFC 8259 8.1 says no
        b"[" * 5000 + b"]" * 5000,  # deeper than the JSON decoder's recursion
    ],
)
def test_malformed_json_header(v: Verifier, header: bytes) -> None:
    token = raw(header, claims(), b"x" * 256)
    if len(token) > 8192:
        reject(v, token, fj.TOO_LARGE)
    else:
        reject(v, token, fj.MALFORMED)


def test_deep_json_payload(v: Verifier) -> None:
    reject(v, raw({"alg": "RS256", "kid": "rsa1"}, b"[" * 3000 + b"]" * 3000), fj.MALFORMED)


def test_json_whitespace_is_json(jwks: dict[str, Any]) -> None:
    # RFC 8259 2: whitespace around a value is allowed (the fast scanner falls back to
    # the full decoder for it); anything else after the value is not.
    iss = issuer(algorithms=("RS256", "HS256"), hmac_secret=HMAC_SECRET)
    v, _ = verifier_for(jwks, iss)

    def signed(header: bytes, payload: bytes) -> bytes:
        signing_input = b64(header) + b"." + b64(payload)
        return (
            signing_input
            + b"."
            + b64(hmac.new(HMAC_SECRET, signing_input, hashlib.sha256).digest())
        )

    body = json.dumps(claims()).encode()
    assert v.verify(signed(b' {"alg": "HS256"}\n', b"\t" + body + b" "), NOW).subject == "alice"
    reject(v, signed(b'{"alg": "HS256"}', body + b" x"), fj.MALFORMED)
    reject(v, signed(b'{"alg": "HS256"}{}', body), fj.MALFORMED)
    reject(v, signed(b"", body), fj.MALFORMED)


def test_many_distinct_headers(v: Verifier, rsa_key: Any) -> None:
    # Parsed headers are remembered, boundedly; a flood of distinct ones changes nothing.
    for i in range(3 * fj.MAX_HEADERS_REMEMBERED):
        with pytest.raises(UnknownKey):
            v.verify(raw({"alg": "RS256", "kid": f"k{i}"}, claims()), NOW)
    assert len(v._headers) <= fj.MAX_HEADERS_REMEMBERED
    assert v.verify(mint(rsa_key, "RS256", kid="rsa1"), NOW).subject == "alice"
    reject(v, raw({"alg": "none", "kid": "rsa1"}, claims()), fj.BAD_ALGORITHM)


def test_oversized_header_segment(v: Verifier) -> None:
    token = raw({"alg": "RS256", "kid": "k" * 2000}, claims(), b"x" * 256)
    assert len(token) < 8192
    reject(v, token, fj.MALFORMED)


def test_oversized_token(v: Verifier, rsa_key: Any, jwks: dict[str, Any]) -> None:
    big = mint(rsa_key, "RS256", claims(pad="x" * 8000), kid="rsa1")
    assert len(big) > 8192
    reject(v, big, fj.TOO_LARGE)
    # A smaller per-issuer limit applies once the issuer is known.
    v2, _ = verifier_for(jwks, issuer(max_token_bytes=700))
    reject(v2, mint(rsa_key, "RS256", claims(pad="x" * 200), kid="rsa1"), fj.TOO_LARGE)


def test_auth_error_text_never_echoes_the_token(v: Verifier, rsa_key: Any) -> None:
    evil = '\r\nX-Injected: 1 "quoted"'
    for token in (
        mint(rsa_key, "RS256", claims(iss=evil), kid="rsa1"),
        mint(rsa_key, "RS256", claims(aud=evil), kid="rsa1"),
        mint(rsa_key, "RS256", kid=evil),
    ):
        with pytest.raises(AuthError) as info:
            v.verify(token, NOW)
        assert info.value.description in {
            fj.UNKNOWN_ISSUER,
            fj.BAD_AUDIENCE,
            fj.UNKNOWN_KEY,
        }


# --- the cache -----------------------------------------------------------------------


def test_cache_hits_and_misses(v: Verifier, rsa_key: Any) -> None:
    token = mint(rsa_key, "RS256", kid="rsa1")
    first = v.verify(token, NOW)
    assert (v.hits, v.misses) == (0, 1)
    # Same bytes in a new object (as sliced from a new request's head).
    again = v.verify(bytes(bytearray(token)), NOW + 1)
    assert again is first
    assert (v.hits, v.misses) == (1, 1)
    stats = v.statistics()
    assert stats["cache_hits"] == 1 and stats["cache_entries"] == 1


def test_cache_entry_expires_at_exp(v: Verifier, rsa_key: Any) -> None:
    exp = int(NOW) + 100
    token = mint(rsa_key, "RS256", claims(exp=exp), kid="rsa1")
    v.verify(token, NOW)
    v.verify(token, exp - 0.001)
    assert v.hits == 1
    # At exp the entry is gone; the token is verified afresh (inside the leeway it is
    # still accepted, but not cached again) ...
    v.verify(token, exp)
    assert (v.hits, v.misses) == (1, 2)
    v.verify(token, exp + 1)
    assert (v.hits, v.misses) == (1, 3)
    # ... and past the leeway it is refused, cache or not.
    reject(v, token, fj.EXPIRED, now=exp + 60)


def test_cache_is_bounded_lru(jwks: dict[str, Any], rsa_key: Any) -> None:
    v, _ = verifier_for(jwks, cache_size=2)
    t = [mint(rsa_key, "RS256", claims(sub=f"u{i}"), kid="rsa1") for i in range(3)]
    v.verify(t[0], NOW)
    v.verify(t[1], NOW)
    v.verify(t[0], NOW)  # t0 is now the most recent
    v.verify(t[2], NOW)  # evicts t1
    assert v.evictions == 1
    hits = v.hits
    v.verify(t[0], NOW)
    assert v.hits == hits + 1
    v.verify(t[1], NOW)
    assert v.hits == hits + 1  # t1 was evicted: a miss
    assert v.statistics()["cache_entries"] == 2


def test_cache_disabled(jwks: dict[str, Any], rsa_key: Any) -> None:
    v, _ = verifier_for(jwks, cache_size=0)
    token = mint(rsa_key, "RS256", kid="rsa1")
    v.verify(token, NOW)
    v.verify(token, NOW)
    assert (v.hits, v.misses) == (0, 2)


def test_cache_max_ttl_for_tokens_without_exp(jwks: dict[str, Any], rsa_key: Any) -> None:
    v, _ = verifier_for(jwks, issuer(required_claims=()), cache_max_ttl_s=10)
    token = mint(rsa_key, "RS256", claims(exp=None), kid="rsa1")
    v.verify(token, NOW)
    v.verify(token, NOW + 9)
    v.verify(token, NOW + 10)
    assert (v.hits, v.misses) == (1, 2)


def test_cache_prune(v: Verifier, rsa_key: Any) -> None:
    v.verify(mint(rsa_key, "RS256", claims(exp=int(NOW) + 10), kid="rsa1"), NOW)
    v.verify(mint(rsa_key, "RS256", claims(exp=int(NOW) + 100), kid="rsa1"), NOW)
    assert v.cache_prune(NOW + 50) == 1
    assert v.statistics()["cache_entries"] == 1


def test_rotated_out_key_stops_cache_hits(rsa_key: Any, ec_key: Any) -> None:
    """Decision (see fastgw/identity/jwt.py): a key that leaves the key set takes its
    cached tokens with it, because a fresh check would now fail; keys that stay keep
    their cached tokens."""
    both = {"keys": [public_jwk(rsa_key, "RS256", "old"), public_jwk(ec_key, "ES256", "stays")]}
    v, src = verifier_for(both)
    t_old = mint(rsa_key, "RS256", kid="old")
    t_stays = mint(ec_key, "ES256", kid="stays")
    v.verify(t_old, NOW)
    v.verify(t_stays, NOW)
    assert src.keys is not None
    new, _ = keyset_from_jwks({"keys": [public_jwk(ec_key, "ES256", "stays")]}, ("ES256",))
    src.keys = new.carried_over(src.keys)
    hits = v.hits
    assert v.verify(t_stays, NOW).key == "stays"
    assert v.hits == hits + 1
    with pytest.raises(UnknownKey):
        v.verify(t_old, NOW)


def test_key_replaced_under_the_same_kid_retires_it(rsa_key: Any, rsa_key2: Any) -> None:
    v, src = verifier_for({"keys": [public_jwk(rsa_key, "RS256", "k")]})
    token = mint(rsa_key, "RS256", kid="k")
    v.verify(token, NOW)
    new, _ = keyset_from_jwks({"keys": [public_jwk(rsa_key2, "RS256", "k")]}, ("RS256",))
    assert src.keys is not None
    src.keys = new.carried_over(src.keys)
    reject(v, token, fj.BAD_SIGNATURE)


# --- key material --------------------------------------------------------------------


def test_jwks_parsing_skips_unusable_keys(rsa_key: Any, ec_key: Any) -> None:
    good = public_jwk(rsa_key, "RS256", "good")
    doc = {
        "keys": [
            good,
            {**public_jwk(rsa_key, "RS256", "enc"), "use": "enc"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},
            {**public_jwk(rsa_key, "RS256", "ops"), "key_ops": ["encrypt"]},
            {**public_jwk(ec_key, "ES256", "mismatch"), "alg": "RS256"},
            {"kty": "XYZ", "kid": "odd"},
            {"kty": "RSA", "kid": "broken", "n": "AQAB", "e": 5},
            "not a key",
        ]
    }
    ks, skipped = keyset_from_jwks(doc, ("RS256", "ES256"))
    assert [k.kid for k in ks.keys] == ["good"]
    assert len(skipped) == 7


def test_jwks_private_key_material_is_refused(rsa_key: Any) -> None:
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key, as_dict=True)
    jwk["kid"] = "priv"
    del jwk["key_ops"]  # PyJWT marks it ["sign"], which would be skipped for that alone
    with pytest.raises(ValueError, match="private or symmetric"):
        keyset_from_jwks({"keys": [jwk]}, ("RS256",))


def test_jwks_small_rsa_key_is_refused() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="1024 bits"):
        keyset_from_jwks({"keys": [public_jwk(small, "RS256", "s")]}, ("RS256",))


@pytest.mark.parametrize(
    "doc", [[], {}, {"keys": {}}, {"keys": []}, {"keys": [{"kty": "RSA"}] * 101}, "x"]
)
def test_not_a_usable_jwks(doc: Any) -> None:
    with pytest.raises(ValueError):
        keyset_from_jwks(doc, ("RS256",))


def test_ec_key_on_another_curve_is_skipped() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ValueError, match="allowlist"):
        keyset_from_jwks({"keys": [public_jwk(p384, "ES384", "p")]}, ("ES256",))


def test_eddsa_key_verifies_only_eddsa(ed_key: Any) -> None:
    ks, _ = keyset_from_jwks({"keys": [public_jwk(ed_key, "EdDSA", "e", with_alg=False)]}, ALL_ASYM)
    assert [k.alg for k in ks.keys] == ["EdDSA"]
    assert isinstance(ks.keys[0].key, ed25519.Ed25519PublicKey)
