"""RFC 6750 answers: the WWW-Authenticate challenge and reading the bearer token."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastgw.identity import AuthError, IssuerUnavailable, answer_for, bearer_token, www_authenticate
from fastgw.identity.answers import MAX_DESCRIPTION, check_realm

# RFC 6750 3 values: quoted strings of %x20-21 / %x23-5B / %x5D-7E.
_VALUE = r'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
_CHALLENGE = re.compile(
    rf"Bearer realm={_VALUE}(, scope={_VALUE})?(, error={_VALUE}(, error_description={_VALUE})?)?\Z"
)


def test_no_credentials_challenge() -> None:
    # RFC 6750 3.1: no error code when the request carried no credentials.
    assert www_authenticate("example") == b'Bearer realm="example"'


def test_invalid_token_challenge() -> None:
    assert www_authenticate("example", "invalid_token", "token has expired") == (
        b'Bearer realm="example", error="invalid_token", error_description="token has expired"'
    )


def test_scope() -> None:
    got = www_authenticate("r", scope='read write "bad" bad\\too ok:3')
    assert got == b'Bearer realm="r", scope="read write ok:3"'


def test_unknown_error_code_is_a_bug() -> None:
    with pytest.raises(ValueError):
        www_authenticate("r", "invalid_grant")


@pytest.mark.parametrize(
    "evil",
    [
        'x", error="invalid_request',
        "x\r\nSet-Cookie: a=b",
        "x\\",
        "x\x00y",
        "caf\u00e9 \u2028",
        "x" * 1000,
    ],
)
def test_no_header_injection(evil: str) -> None:
    value = www_authenticate(evil, "invalid_token", evil)
    text = value.decode("ascii")
    assert _CHALLENGE.match(text), text
    assert text.count('"') == 6
    assert len(text) < 2 * MAX_DESCRIPTION + 100


@given(realm=st.text(), description=st.text(), scope=st.text())
def test_challenge_is_always_well_formed(realm: str, description: str, scope: str) -> None:
    text = www_authenticate(realm, "invalid_token", description, scope).decode("ascii")
    assert _CHALLENGE.match(text), text


def test_check_realm() -> None:
    assert check_realm("fastgw api") is None
    assert check_realm("") is not None
    assert check_realm('a"b') is not None
    assert check_realm("é") is not None


@pytest.mark.parametrize(
    ("value", "token"),
    [
        (None, None),
        (b"Basic dXNlcjpwYXNz", None),  # another scheme: no bearer credentials
        (b"Bearerx abc", None),
        (b"Bearer abc.def.ghi", b"abc.def.ghi"),
        (b"bearer abc", b"abc"),
        (b"BEARER   abc", b"abc"),
        (b"Bearer a-b_c~d+e/f==", b"a-b_c~d+e/f=="),
    ],
)
def test_bearer_token(value: bytes | None, token: bytes | None) -> None:
    assert bearer_token(value) == token


@pytest.mark.parametrize(
    "value", [b"Bearer", b"Bearer ", b"Bearer a b", b"Bearer a,b", b"Bearer =abc", b"Bearer a=b"]
)
def test_bearer_token_malformed(value: bytes) -> None:
    with pytest.raises(AuthError) as info:
        bearer_token(value)
    assert info.value.code == "invalid_request"
    assert info.value.status == 400


def test_answer_for() -> None:
    a = answer_for(None, "api")
    assert (a.status, a.code) == (401, "unauthenticated")
    assert a.headers == ((b"www-authenticate", b'Bearer realm="api"'),)
    a = answer_for(AuthError("invalid_token", "token has expired"), "api")
    assert (a.status, a.code, a.detail) == (401, "invalid_token", "token has expired")
    assert a.headers[0][1].endswith(b'error="invalid_token", error_description="token has expired"')
    a = answer_for(AuthError("invalid_request", "bearer token is malformed"))
    assert a.status == 400 and b'realm="fastgw"' in a.headers[0][1]
    a = answer_for(IssuerUnavailable("corp"))
    assert (a.status, a.code, a.headers) == (503, "issuer_unavailable", ())
    assert "corp" in a.detail
