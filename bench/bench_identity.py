"""Micro benchmarks of JWT verification: fastgw's fast path against PyJWT's ``jwt.decode``.

Groups follow bench/README.md: ``"<op>:<message>"`` with
``extra_info = {"op", "message", "impl"}``, so ``python -m bench.check`` prints them next
to the HTTP core's (no floors are set for them yet: they are reported, not gated).

- ``verify_miss:<alg>``: a token never seen before, so every signature is checked.
  ``fastgw`` is ``Verifier.verify`` with the cache off (split, strict base64url, JSON,
  issuer/alg/kid lookup, claims, PyJWT's algorithm object's ``verify``). ``pyjwt`` is
  ``jwt.decode`` doing the same checks (audience, issuer, 60 s leeway, ``exp`` required)
  with the same prepared key object, so it does not parse a PEM per call. ``sig_only``
  is the bare ``algorithm.verify(signing_input, key, signature)`` on pre-split bytes:
  the floor under any verifier; fastgw's own cost is its time minus this one.
- ``verify_hit:rs256``: the token is in the verified-token cache. ``fastgw`` slices the
  token out of an ``Authorization`` value first (a new bytes object each call, as from a
  new request, so its hash is not cached) and verifies; ``dict_get`` is the same slice
  and a plain dict lookup, the least a cache hit can cost in Python.

Every benchmark checks its result once, untimed, before timing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from fastgw.identity import Identity, Issuer, StaticKeys, Verifier
from fastgw.identity.jwt import _b64decode, keyset_from_jwks

ISS = "https://idp.bench"
AUD = "api://bench"
NOW = time.time()
ALGS = get_default_algorithms()


def _tag(benchmark: Any, op: str, message: str, impl: str) -> None:
    benchmark.group = f"{op}:{message}"
    benchmark.extra_info.update(op=op, message=message, impl=impl)


class Case:
    """One algorithm: a private key, a token like an IdP's access token, and verifiers."""

    def __init__(self, alg: str, private_key: Any) -> None:
        self.alg = alg
        self.public_key = private_key.public_key()
        payload = {
            "iss": ISS,
            "aud": AUD,
            "sub": "user-0042",
            "iat": int(NOW) - 60,
            "exp": int(NOW) + 3600,
            "scope": "read write",
            "groups": ["eng", "oncall"],
            "email": "user-0042@example.org",
        }
        self.token = jwt.encode(payload, private_key, algorithm=alg, headers={"kid": "k1"}).encode()
        jwk = ALGS[alg].to_jwk(self.public_key, as_dict=True)
        jwk.update(kid="k1", alg=alg, use="sig")
        issuer = Issuer(
            name="bench", issuer=ISS, audiences=(AUD,), algorithms=(alg,), jwks_url=ISS + "/jwks"
        )
        keys, _ = keyset_from_jwks({"keys": [jwk]}, issuer.algorithms)
        self.miss = Verifier([issuer], cache_size=0, sources={"bench": StaticKeys(keys)})
        self.hit = Verifier([issuer], sources={"bench": StaticKeys(keys)})
        self.payload = payload

    def pyjwt_decode(self) -> dict[str, Any]:
        return jwt.decode(
            self.token,
            self.public_key,
            algorithms=[self.alg],
            audience=AUD,
            issuer=ISS,
            leeway=60,
            options={"require": ["exp"]},
        )


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    return {
        "rs256": Case("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "es256": Case("ES256", ec.generate_private_key(ec.SECP256R1())),
        "eddsa": Case("EdDSA", ed25519.Ed25519PrivateKey.generate()),
    }


MISS_IMPLS = ("fastgw", "pyjwt", "sig_only")


@pytest.mark.parametrize(
    ("message", "impl"),
    [pytest.param(m, i, id=f"{m}-{i}") for m in ("rs256", "es256", "eddsa") for i in MISS_IMPLS],
)
def test_verify_miss(benchmark: Any, cases: dict[str, Case], message: str, impl: str) -> None:
    _tag(benchmark, "verify_miss", message, impl)
    c = cases[message]
    fn: Callable[[], Any]
    if impl == "fastgw":
        ident = c.miss.verify(c.token, NOW)
        assert isinstance(ident, Identity) and dict(ident.claims) == c.payload
        token, v = c.token, c.miss
        fn = lambda: v.verify(token, NOW)  # noqa: E731
    elif impl == "pyjwt":
        assert c.pyjwt_decode() == c.payload
        fn = c.pyjwt_decode
    else:
        signing_input, _, sig64 = c.token.rpartition(b".")
        sig = _b64decode(sig64)
        algorithm, key = ALGS[c.alg], c.public_key
        assert algorithm.verify(signing_input, key, sig)
        fn = lambda: algorithm.verify(signing_input, key, sig)  # noqa: E731
    benchmark(fn)
    if impl == "fastgw":
        assert c.miss.hits == 0  # every timed call was a miss


@pytest.mark.parametrize("impl", ["fastgw", "dict_get"])
def test_verify_hit(benchmark: Any, cases: dict[str, Case], impl: str) -> None:
    _tag(benchmark, "verify_hit", "rs256", impl)
    c = cases["rs256"]
    authorization = b"Bearer " + c.token
    if impl == "fastgw":
        v = c.hit
        first = v.verify(authorization[7:], NOW)
        assert v.verify(authorization[7:], NOW) is first and v.hits == 1
        benchmark(lambda: v.verify(authorization[7:], NOW))
        assert v.misses == 1
    else:
        d = {c.token: object()}
        assert d.get(authorization[7:]) is not None
        benchmark(lambda: d.get(authorization[7:]))
