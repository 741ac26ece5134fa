"""fastgw explain / who-can, as users run them: offline answers from the config files."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from fastgw.cli import main

SECURITY = """
[issuers.corp]
issuer = "https://login.example.com/"
audiences = ["api://orders"]
jwks_url = "https://login.example.com/jwks"
[api_keys]
[[api_keys.keys]]
name = "billing-batch"
sha256 = "{digest}"
attributes = {{ team = "billing" }}
[[policies]]
name = "orders-readers"
routes = ["orders"]
[[policies.rules]]
effect = "deny"
subjects = ["mallory"]
[[policies.rules]]
effect = "allow"
issuers = ["corp"]
claims = {{ "groups" = {{ contains = "orders-read" }} }}
[[policies.rules]]
effect = "allow"
key_attributes = {{ team = "billing" }}
"""


@pytest.fixture
def conf(tmp_path: Path) -> str:
    (tmp_path / "security.toml").write_text(
        SECURITY.format(digest=hashlib.sha256(b"k1").hexdigest())
    )
    (tmp_path / "gateway.toml").write_text(
        'include = ["security.toml"]\n[[listeners]]\nname = "m"\naddress = "127.0.0.1:0"\n'
        '[backends.orders]\nendpoints = ["http://127.0.0.1:1"]\n'
        '[[routes]]\nname = "orders"\npath_prefix = "/orders"\nbackend = "orders"\n'
        '[[routes]]\nname = "open"\npath_prefix = "/open"\nbackend = "orders"\n'
    )
    return str(tmp_path / "gateway.toml")


def token(**claims: object) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    body = {"iss": "https://login.example.com/", "sub": "bob", "exp": int(time.time()) + 60}
    body.update(claims)
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})


def test_explain_walks_every_rule(conf: str, capsys: pytest.CaptureFixture[str]) -> None:
    tok = token(groups=["other"])
    assert (
        main(["explain", "-c", conf, "GET", "/orders/1", "-H", f"Authorization: Bearer {tok}"]) == 1
    )
    out = capsys.readouterr().out
    assert "UNVERIFIED" in out and "issuer corp" in out and "sub 'bob'" in out
    assert "rule 0 (deny): no: subject 'bob' is not one of ['mallory']" in out
    assert 'rule 1 (allow): no: claim groups contains "orders-read": no (value ["other"])' in out
    assert "rule 2 (allow): no: needs an API key" in out
    assert "decision: 403 forbidden" in out

    tok = token(groups=["orders-read"])
    assert (
        main(["explain", "-c", conf, "GET", "/orders/1", "-H", f"Authorization: Bearer {tok}"]) == 0
    )
    out = capsys.readouterr().out
    assert "rule 1 (allow): matches -> allow" in out and "rule 2 (allow): not reached" in out


def test_explain_api_keys_missing_credentials_and_open_routes(
    conf: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", "-c", conf, "POST", "/orders/1", "-H", "X-Api-Key: k1"]) == 0
    assert "rule 2 (allow): matches -> allow" in capsys.readouterr().out
    assert main(["explain", "-c", conf, "GET", "/orders/1"]) == 1
    assert "credentials required: 401" in capsys.readouterr().out
    assert main(["explain", "-c", conf, "GET", "/open/x"]) == 0
    assert "none guard this route: allowed" in capsys.readouterr().out
    assert main(["explain", "-c", conf, "GET", "/nowhere"]) == 1
    assert "404 no_route" in capsys.readouterr().out
    hs = jwt.encode({"iss": "https://login.example.com/", "sub": "x"}, "s" * 32, algorithm="HS256")
    assert (
        main(["explain", "-c", conf, "GET", "/orders/1", "-H", f"Authorization: Bearer {hs}"]) == 1
    )
    assert "alg HS256 is not allowed" in capsys.readouterr().out


def test_who_can(conf: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["who-can", "-c", conf, "GET", "/orders/7"]) == 0
    out = capsys.readouterr().out
    assert "route orders" in out
    assert "rule 1: allow: tokens from corp (https://login.example.com/)" in out
    assert "API keys: billing-batch" in out
    assert main(["who-can", "-c", conf, "GET", "/open/1"]) == 0
    assert "anyone" in capsys.readouterr().out


def test_policies_scoped_by_environment(
    conf: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same config serves dev and prod with different rules, selected at start."""
    path = Path(conf)
    text = path.read_text().replace(
        "[[listeners]]", '[gateway]\nenvironment = "dev"\n[[listeners]]'
    )
    path.write_text(text)
    sec = path.parent / "security.toml"
    sec.write_text(
        sec.read_text()
        + '[[policies]]\nname = "prod-only"\nroutes = ["open"]\nenvironments = ["prod"]\n'
        '[[policies.rules]]\neffect = "deny"\n'
    )
    assert main(["explain", "-c", conf, "GET", "/open/x"]) == 0  # dev: no policy
    assert "environment: dev" in capsys.readouterr().out
    monkeypatch.setenv("FASTGW_ENV", "prod")
    assert main(["explain", "-c", conf, "GET", "/open/x"]) == 1  # prod: credentials needed
    assert "environment: prod" in capsys.readouterr().out
