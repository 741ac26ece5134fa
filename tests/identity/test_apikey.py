"""API keys: hashes in config, lookups by the presented key."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastgw.identity import ApiKey, ApiKeys, IdentityConfigError, generate_api_key, hash_api_key
from fastgw.identity.apikey import MAX_KEY_BYTES

KEY_A = "k3y-A_" + "a" * 37
KEY_B = "k3y-B_" + "b" * 37


@pytest.fixture
def keys() -> ApiKeys:
    return ApiKeys(
        [
            ApiKey("billing", hash_api_key(KEY_A), {"team": "billing", "tier": "gold"}),
            ApiKey("reports", hash_api_key(KEY_B).upper()),  # hex case does not matter
            ApiKey("billing", hash_api_key("rotated-" + KEY_A), {"team": "billing"}),
        ],
        header="X-Api-Key",
    )


def test_right_key(keys: ApiKeys) -> None:
    ident = keys.lookup(KEY_A.encode())
    assert ident is not None
    assert (ident.kind, ident.subject, ident.key, ident.issuer) == (
        "apikey",
        "billing",
        "billing",
        None,
    )
    assert dict(ident.claims) == {"team": "billing", "tier": "gold"}
    assert keys.lookup(KEY_A.encode()) is ident  # built once, shared
    b = keys.lookup(KEY_B.encode())
    assert b is not None and b.subject == "reports" and dict(b.claims) == {}
    # Two keys for one name (rotation): both work, each with its own attributes.
    r = keys.lookup(("rotated-" + KEY_A).encode())
    assert r is not None and r.subject == "billing" and dict(r.claims) == {"team": "billing"}


@pytest.mark.parametrize(
    "presented",
    [
        None,
        b"",
        KEY_A.encode()[:-1],
        KEY_A.encode() + b" ",
        KEY_A.upper().encode(),
        hash_api_key(KEY_A).encode(),  # the hash itself is not a key
        bytes.fromhex(hash_api_key(KEY_A)),
        b"x" * (MAX_KEY_BYTES + 1),
    ],
)
def test_wrong_key(keys: ApiKeys, presented: bytes | None) -> None:
    assert keys.lookup(presented) is None


def test_attributes_are_read_only(keys: ApiKeys) -> None:
    ident = keys.lookup(KEY_A.encode())
    assert ident is not None
    with pytest.raises(TypeError):
        ident.claims["tier"] = "platinum"  # type: ignore[index]


def test_config_problems() -> None:
    with pytest.raises(IdentityConfigError) as info:
        ApiKeys(
            [
                ApiKey("ok", hash_api_key("a")),
                ApiKey("bad name", hash_api_key("b")),
                ApiKey("short", "abc123"),
                ApiKey("dup", hash_api_key("a")),
                ApiKey("attrs", hash_api_key("c"), "x"),  # type: ignore[arg-type]
            ],
            header="Bad Header",
        )
    assert [f for f, _ in info.value.problems] == [
        "header",
        "keys[1].name",
        "keys[2].sha256",
        "keys[3].sha256",
        "keys[4].attributes",
    ]
    assert "same key hash as key 'ok'" in dict(info.value.problems)["keys[3].sha256"]


def test_header_name_for_lookups(keys: ApiKeys) -> None:
    assert keys.header == "X-Api-Key"
    assert keys.header_name == b"x-api-key"
    assert len(keys) == 3


def test_generate_and_hash() -> None:
    k = generate_api_key()
    assert len(k) == 43 and k != generate_api_key()
    assert hash_api_key(k) == hashlib.sha256(k.encode()).hexdigest()
    assert hash_api_key(k.encode()) == hash_api_key(k)
    ident = ApiKeys([ApiKey("n", hash_api_key(k))]).lookup(k.encode())
    assert ident is not None and ident.subject == "n"


@given(st.binary(max_size=2000))
def test_any_bytes_are_a_lookup_miss_or_the_key(presented: bytes) -> None:
    keys = ApiKeys([ApiKey("a", hash_api_key(KEY_A))])
    got = keys.lookup(presented)
    assert got is None or presented == KEY_A.encode()
