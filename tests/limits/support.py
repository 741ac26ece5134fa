"""The gateway config the limits tests share: one listener on a free port, the test's
function as backend ``fn``, a route ``api`` to it, and API keys by name; each test file
adds its own limits, budgets or tiers as TOML sections."""

from __future__ import annotations

from fastgw.identity import hash_api_key


def gateway_toml(uport: int, *sections: str, path_prefix: str = "/api") -> str:
    """The listener, backend and ``api`` route, then ``sections`` in order."""
    head = f"""
[[listeners]]
name = "main"
address = "127.0.0.1:0"
[backends.fn]
endpoints = ["http://127.0.0.1:{uport}"]
[[routes]]
name = "api"
path_prefix = "{path_prefix}"
backend = "fn"
"""
    return head + "\n".join(sections) + "\n"


def api_keys(*keys: tuple[str, bytes] | tuple[str, bytes, str]) -> str:
    """An ``[api_keys]`` section: per key its name, the key's bytes and optional extra
    lines for the entry (e.g. ``attributes = { tier = "free" }``)."""
    out = ["[api_keys]"]
    for name, key, *extra in keys:
        out += ["[[api_keys.keys]]", f'name = "{name}"', f'sha256 = "{hash_api_key(key)}"']
        out += extra
    return "\n".join(out) + "\n"


# The two callers most tests use: X-Api-Key "key-one" is caller "one", "key-two" "two".
ONE_TWO = api_keys(("one", b"key-one"), ("two", b"key-two"))
