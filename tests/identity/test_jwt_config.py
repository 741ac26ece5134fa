"""Issuer validation and static keys from files: every problem named, with its field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fastgw.identity import IdentityConfigError, Issuer, KeyFile, Verifier, load_static_keys
from tests.identity.support import (
    AUD,
    HMAC_SECRET,
    ISS,
    NOW,
    mint,
    public_jwk,
    public_pem,
    write,
)


def problems(**kw: Any) -> list[tuple[str, str]]:
    base: dict[str, Any] = {"name": "idp", "issuer": ISS, "audiences": (AUD,)}
    base.update(kw)
    with pytest.raises(IdentityConfigError) as info:
        Issuer(**base)
    return info.value.problems


def fields(**kw: Any) -> set[str]:
    return {f for f, _ in problems(**kw)}


def test_defaults() -> None:
    # A list from a loader becomes a tuple (the annotation says tuple: hence the ignore).
    i = Issuer(name="idp", issuer=ISS, audiences=[AUD], jwks_url="https://idp.test/k")  # type: ignore[arg-type]
    assert i.algorithms == ("RS256", "ES256", "EdDSA")
    assert i.audiences == (AUD,)
    assert i.leeway_s == 60 and i.max_token_bytes == 8192
    assert i.required_claims == ("exp",)


def test_secret_is_not_in_repr() -> None:
    i = Issuer(
        name="h", issuer=ISS, audiences=(AUD,), algorithms=("HS256",), hmac_secret=HMAC_SECRET
    )
    assert HMAC_SECRET.decode() not in repr(i)


def test_every_problem_is_reported_at_once() -> None:
    got = fields(
        name="bad name",
        audiences=(),
        algorithms=("RS256", "XS1", "none"),
        leeway_s=-1,
        max_token_bytes=0,
        jwks_url="http://idp.example/keys",
        fetch_timeout_s=0,
        min_refresh_s=100,
        max_refresh_s=10,
    )
    assert got == {
        "name",
        "audiences",
        "algorithms",
        "leeway_s",
        "max_token_bytes",
        "jwks_url",
        "fetch_timeout_s",
        "max_refresh_s",
    }


def test_key_sources() -> None:
    assert fields() == {"jwks_url"}  # none at all
    assert "jwks_url" in fields(discovery_url="https://a.test/x", jwks_url="https://a.test/k")
    assert "key_files" in fields(jwks_url="https://a.test/k", key_files=(KeyFile("x"),))
    assert fields(jwks_url="ftp://a.test/k") == {"jwks_url"}
    assert fields(jwks_url="https://u:p@a.test/k") == {"jwks_url"}
    assert fields(key_files=(KeyFile("k.pem"),), ca_file="ca.pem") == {"ca_file"}
    # http:// only towards loopback.
    Issuer(name="i", issuer=ISS, audiences=(AUD,), jwks_url="http://127.0.0.1:8080/k")
    Issuer(name="i", issuer=ISS, audiences=(AUD,), jwks_url="http://localhost/k")


def test_hmac_rules() -> None:
    assert "algorithms" in fields(algorithms=("HS256",), jwks_url="https://a.test/k")
    assert fields(hmac_secret=b"x" * 40) == {"hmac_secret"}  # no HS* allowed
    msg = dict(problems(algorithms=("HS512",), hmac_secret=b"x" * 40))["hmac_secret"]
    assert "64 bytes" in msg
    assert fields(hmac_kid="k", jwks_url="https://a.test/k") == {"hmac_kid"}
    # A secret alone is a complete key source.
    Issuer(name="i", issuer=ISS, audiences=(AUD,), algorithms=("HS256",), hmac_secret=b"y" * 32)


def test_static_pem_and_certificate(tmp_path: Path, rsa_key: Any, ec_key: Any) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("signer.test")  # an ECDSA P-256 certificate
    iss = Issuer(
        name="s",
        issuer=ISS,
        audiences=(AUD,),
        key_files=(
            KeyFile(write(tmp_path, "rsa.pem", public_pem(rsa_key)), kid="r"),
            KeyFile(write(tmp_path, "cert.pem", cert.cert_chain_pems[0].bytes()), kid="c"),
        ),
    )
    ks = load_static_keys(iss)
    assert sorted((k.kid, k.alg) for k in ks.keys) == [("c", "ES256"), ("r", "RS256")]
    v = Verifier([iss])
    assert v.verify(mint(rsa_key, "RS256", kid="r"), NOW).subject == "alice"
    signer = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
    assert v.verify(mint(signer, "ES256", kid="c"), NOW).key == "c"


def test_static_jwk_and_jwks_files(tmp_path: Path, rsa_key: Any, ed_key: Any) -> None:
    one = write(tmp_path, "one.json", json.dumps(public_jwk(ed_key, "EdDSA", None)).encode())
    many = write(
        tmp_path, "set.json", json.dumps({"keys": [public_jwk(rsa_key, "RS256", "a")]}).encode()
    )
    iss = Issuer(
        name="s",
        issuer=ISS,
        audiences=(AUD,),
        key_files=(KeyFile(one, kid="ed"), KeyFile(many)),
    )
    v = Verifier([iss])
    assert v.verify(mint(ed_key, "EdDSA", kid="ed"), NOW).key == "ed"
    assert v.verify(mint(rsa_key, "RS256", kid="a"), NOW).key == "a"


def test_static_key_problems(tmp_path: Path, rsa_key: Any, ec_key: Any) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    files = (
        KeyFile(str(tmp_path / "missing.pem")),
        KeyFile(write(tmp_path, "priv.pem", private)),
        KeyFile(write(tmp_path, "small.pem", public_pem(small))),
        KeyFile(write(tmp_path, "junk.pem", b"-----BEGIN PUBLIC KEY-----\nxx\n")),
        KeyFile(write(tmp_path, "ec.pem", public_pem(ec_key))),  # ES256 not allowed below
        KeyFile(write(tmp_path, "bad.json", b"{not json")),
        KeyFile(write(tmp_path, "set.json", b'{"keys": []}'), kid="x"),
    )
    iss = Issuer(name="s", issuer=ISS, audiences=(AUD,), algorithms=("RS256",), key_files=files)
    with pytest.raises(IdentityConfigError) as info:
        load_static_keys(iss)
    got = dict(info.value.problems)
    assert sorted(got) == [f"key_files[{i}]" for i in range(7)]
    assert "cannot read" in got["key_files[0]"]
    assert "private key" in got["key_files[1]"]
    assert "1024 bits" in got["key_files[2]"]
    assert "not a PEM" in got["key_files[3]"]
    assert "fits none" in got["key_files[4]"]
    assert "not valid JSON" in got["key_files[5]"]
    assert "kid cannot be set" in got["key_files[6]"]
    # Verifier construction reads the files, so it raises the same way.
    with pytest.raises(IdentityConfigError):
        Verifier([iss])


def test_pyjwt_would_have_accepted_the_same_static_token(tmp_path: Path, rsa_key: Any) -> None:
    iss = Issuer(
        name="s",
        issuer=ISS,
        audiences=(AUD,),
        key_files=(KeyFile(write(tmp_path, "rsa.pem", public_pem(rsa_key))),),
    )
    token = mint(rsa_key, "RS256", kid=None)
    ours = Verifier([iss]).verify(token, NOW)
    ref = jwt.decode(
        token, public_pem(rsa_key), algorithms=["RS256"], audience=AUD, issuer=ISS,
        options={"verify_exp": False, "verify_iat": False},
    )  # fmt: skip
    assert dict(ours.claims) == ref
