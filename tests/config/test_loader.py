"""The config loader: good files become the right objects; every kind of mistake comes back
as (file, key path, message), all of them at once, never only the first."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from fastgw.config import (
    BackendConfig,
    ConfigError,
    Endpoint,
    GatewayConfig,
    Limits,
    ListenerConfig,
    RouteConfig,
    config_from_dict,
    load_config,
)
from fastgw.config.loader import parse_address, parse_endpoint
from fastgw.demo import demo_config

# --- building test files -----------------------------------------------------------------

# Each section as {key: raw TOML value}; a case overrides keys (None removes one).
LISTENER = {"name": '"main"', "address": '"127.0.0.1:0"'}
BACKEND = {"endpoints": '["http://127.0.0.1:9000"]'}
ROUTE = {"name": '"all"', "backend": '"fn"'}


def section(header: str, base: dict[str, str], override: dict[str, str | None]) -> str:
    merged = {**base, **override}
    lines = [header] + [f"{k} = {v}" for k, v in merged.items() if v is not None]
    return "\n".join(lines) + "\n"


def make(
    *,
    listener: dict[str, str | None] | None = None,
    backend: dict[str, str | None] | None = None,
    route: dict[str, str | None] | None = None,
    top: str = "",
    extra: str = "",
) -> str:
    """A valid one-listener, one-backend ("fn"), one-route config, with changes."""
    return (
        top
        + "\n"
        + section("[[listeners]]", LISTENER, listener or {})
        + section("[backends.fn]", BACKEND, backend or {})
        + section("[[routes]]", ROUTE, route or {})
        + extra
    )


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def problems(path: Path) -> list[tuple[str, str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """Real PEM files from a throwaway CA, in tmp_path (where the config goes too)."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    other = ca.issue_cert("other.example")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "combined.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "other.key"))
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (tmp_path / "encrypted.key").write_bytes(encrypted)
    return tmp_path


# --- good configs ------------------------------------------------------------------------


def test_full_config_loads_into_objects(certs: Path) -> None:
    path = write(
        certs / "gateway.toml",
        """
[gateway]
via = "1.1 edge"
xff_append = false
drain_timeout_s = 3

[limits]
max_head_bytes = 16384
max_header_fields = 50
max_target_bytes = 4096
max_body_bytes = 0
head_timeout_s = 5
idle_timeout_s = 30.5
body_timeout_s = 20
max_connections = 500

[[listeners]]
name = "public"
address = "0.0.0.0:8443"
tls_cert_file = "server.pem"
tls_key_file = "server.key"
client_ca_file = "ca.pem"
client_cert = "optional"

[[listeners]]
name = "local"
address = "[::1]:0"

[backends.fn]
endpoints = ["https://fn.example.com/prefix/", "http://127.0.0.1:9000", "https://[::1]:8443"]
ca_file = "ca.pem"
client_cert_file = "server.pem"
client_key_file = "server.key"
server_name = "fn.example.com"
connect_timeout_s = 1
first_byte_timeout_s = 2.5
total_timeout_s = 10
pool_max_size = 8
pool_idle_timeout_s = 4

[[routes]]
name = "api"
path_prefix = "/api"
backend = "fn"
strip_prefix = true

[[routes]]
name = "rest"
backend = "fn"
""",
    )
    config = load_config(path)
    d = str(certs)
    assert config == GatewayConfig(
        listeners=(
            ListenerConfig(
                name="public",
                host="0.0.0.0",
                port=8443,
                tls_cert_file=f"{d}/server.pem",
                tls_key_file=f"{d}/server.key",
                client_ca_file=f"{d}/ca.pem",
                client_cert="optional",
            ),
            ListenerConfig(name="local", host="::1", port=0),
        ),
        backends={
            "fn": BackendConfig(
                name="fn",
                endpoints=(
                    Endpoint(
                        url="https://fn.example.com/prefix/",
                        scheme="https",
                        host="fn.example.com",
                        port=443,
                        path_prefix="/prefix",
                    ),
                    Endpoint(
                        url="http://127.0.0.1:9000",
                        scheme="http",
                        host="127.0.0.1",
                        port=9000,
                        path_prefix="",
                    ),
                    Endpoint(
                        url="https://[::1]:8443",
                        scheme="https",
                        host="::1",
                        port=8443,
                        path_prefix="",
                    ),
                ),
                ca_file=f"{d}/ca.pem",
                client_cert_file=f"{d}/server.pem",
                client_key_file=f"{d}/server.key",
                server_name="fn.example.com",
                connect_timeout_s=1.0,
                first_byte_timeout_s=2.5,
                total_timeout_s=10.0,
                pool_max_size=8,
                pool_idle_timeout_s=4.0,
            )
        },
        routes=(
            RouteConfig(name="api", backend="fn", path_prefix="/api", strip_prefix=True),
            RouteConfig(name="rest", backend="fn", path_prefix="/", strip_prefix=False),
        ),
        limits=Limits(
            max_head_bytes=16384,
            max_header_fields=50,
            max_target_bytes=4096,
            max_body_bytes=0,
            head_timeout_s=5.0,
            idle_timeout_s=30.5,
            body_timeout_s=20.0,
            max_connections=500,
        ),
        via="1.1 edge",
        xff_append=False,
        drain_timeout_s=3.0,
        source=str(path),
    )
    assert isinstance(config.backends["fn"].connect_timeout_s, float)
    assert config.backends["fn"].endpoints[2].authority == "[::1]:8443"
    assert config.listeners[0].tls and not config.listeners[1].tls


def test_minimal_config_takes_model_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "gw.toml", make()))
    assert config.limits == Limits()
    assert config.via == "1.1 fastgw"
    assert config.xff_append is True
    assert config.drain_timeout_s == GatewayConfig(listeners=()).drain_timeout_s
    assert config.backends["fn"] == BackendConfig(
        name="fn", endpoints=(parse_endpoint("http://127.0.0.1:9000"),)
    )
    assert config.routes == (RouteConfig(name="all", backend="fn"),)


def test_every_limits_field_is_configurable_under_its_name(tmp_path: Path) -> None:
    lines = [f"{f.name} = 7" for f in dataclasses.fields(Limits)]
    config = load_config(write(tmp_path / "gw.toml", make(top="[limits]\n" + "\n".join(lines))))
    assert all(getattr(config.limits, f.name) == 7 for f in dataclasses.fields(Limits))


def test_via_false_disables_via(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "gw.toml", make(top="[gateway]\nvia = false")))
    assert config.via is None


def test_cert_and_key_in_one_file(certs: Path) -> None:
    path = write(certs / "gw.toml", make(listener={"tls_cert_file": '"combined.pem"'}))
    assert load_config(path).listeners[0].tls_cert_file == str(certs / "combined.pem")


# --- includes and relative paths ---------------------------------------------------------


def test_includes_resolve_relative_to_the_including_file(certs: Path) -> None:
    (certs / "conf" / "tls").mkdir(parents=True)
    for name in ("server.pem", "server.key"):
        os.replace(certs / name, certs / "conf" / "tls" / name)
    write(
        certs / "conf" / "gateway.toml",
        'include = ["routing/routes.toml", "tls/listeners.toml"]\n'
        + section("[backends.local]", BACKEND, {}),
    )
    write(
        certs / "conf" / "routing" / "routes.toml",
        'include = ["backends.toml"]\n'
        + section("[[routes]]", ROUTE, {"name": '"a"', "backend": '"remote"'})
        + section(
            "[[routes]]", ROUTE, {"name": '"b"', "backend": '"local"', "path_prefix": '"/b"'}
        ),
    )
    write(
        certs / "conf" / "routing" / "backends.toml",
        section(
            "[backends.remote]",
            BACKEND,
            {"ca_file": '"../../ca.pem"', "endpoints": '["https://x.example"]'},
        ),
    )
    write(
        certs / "conf" / "tls" / "listeners.toml",
        section(
            "[[listeners]]",
            LISTENER,
            {"tls_cert_file": '"server.pem"', "tls_key_file": '"./server.key"'},
        ),
    )
    # Load from another directory: nothing may depend on the current one.
    config = load_config(certs / "conf" / "gateway.toml")
    assert [r.name for r in config.routes] == ["a", "b"]
    assert list(config.backends) == ["remote", "local"]  # an include counts where it stands
    assert config.backends["remote"].ca_file == str(certs / "ca.pem")
    assert config.listeners[0].tls_cert_file == str(certs / "conf" / "tls" / "server.pem")
    assert config.listeners[0].tls_key_file == str(certs / "conf" / "tls" / "server.key")


def test_errors_in_an_included_file_name_that_file(tmp_path: Path) -> None:
    main = write(tmp_path / "gw.toml", 'include = ["sub/routes.toml"]\n' + make())
    write(
        tmp_path / "sub" / "routes.toml",
        section("[[routes]]", ROUTE, {"name": '"x"', "backend": '"nope"', "path_prefix": '"/x"'}),
    )
    assert problems(main) == [
        (
            str(tmp_path / "sub" / "routes.toml"),
            "routes[0].backend",
            'unknown backend "nope" (known: fn)',
        )
    ]


def test_file_names_in_messages_follow_the_path_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "conf" / "gw.toml", 'include = ["more.toml"]\n' + make())
    write(tmp_path / "conf" / "more.toml", "bogus = 1\n")
    monkeypatch.chdir(tmp_path)
    assert problems(Path("conf/gw.toml")) == [
        ("conf/more.toml", "bogus", 'unknown key "bogus"'),
    ]


def test_include_cycle_is_reported(tmp_path: Path) -> None:
    main = write(tmp_path / "gw.toml", 'include = ["a.toml"]\n' + make())
    write(tmp_path / "a.toml", 'include = ["b.toml"]\n')
    write(tmp_path / "b.toml", 'include = ["a.toml", "gw.toml"]\n')
    a, b = str(tmp_path / "a.toml"), str(tmp_path / "b.toml")
    assert problems(main) == [
        (b, "include[0]", f"include cycle: {a} -> {b} -> {a}"),
        (b, "include[1]", f"include cycle: {main} -> {a} -> {b} -> {main}"),
    ]


def test_self_include_is_a_cycle(tmp_path: Path) -> None:
    main = write(tmp_path / "gw.toml", 'include = ["./gw.toml"]\n' + make())
    assert problems(main) == [(str(main), "include[0]", f"include cycle: {main} -> {main}")]


def test_a_file_included_twice_is_read_once(tmp_path: Path) -> None:
    main = write(tmp_path / "gw.toml", 'include = ["a.toml", "b.toml"]\n' + make())
    write(tmp_path / "a.toml", 'include = ["common.toml"]\n')
    write(tmp_path / "b.toml", 'include = ["common.toml"]\n')
    write(tmp_path / "common.toml", section("[backends.shared]", BACKEND, {}))
    assert list(load_config(main).backends) == ["shared", "fn"]


def test_missing_include_is_reported_where_it_is_named(tmp_path: Path) -> None:
    main = write(tmp_path / "gw.toml", 'include = ["gone.toml", 3]\n' + make())
    assert problems(main) == [
        (
            str(main),
            "include[0]",
            f"cannot read included file {tmp_path / 'gone.toml'}: No such file or directory",
        ),
        (str(main), "include[1]", "expected string (a file name), got integer"),
    ]


def test_gateway_and_limits_only_in_the_main_file(tmp_path: Path) -> None:
    main = write(tmp_path / "gw.toml", 'include = ["more.toml"]\n' + make())
    write(tmp_path / "more.toml", "[gateway]\nvia = false\n[limits]\nmax_connections = 1\n")
    more = str(tmp_path / "more.toml")
    assert problems(main) == [
        (more, "gateway", "[gateway] is only allowed in the main config file"),
        (more, "limits", "[limits] is only allowed in the main config file"),
    ]


def test_duplicates_across_files_name_the_first(tmp_path: Path) -> None:
    main = write(tmp_path / "gw.toml", 'include = ["more.toml"]\n' + make())
    more = write(
        tmp_path / "more.toml",
        section("[[listeners]]", LISTENER, {"address": '"127.0.0.1:1"'})
        + section("[backends.fn]", BACKEND, {})
        + section("[[routes]]", ROUTE, {"path_prefix": '"/more"'}),
    )
    m = str(more)
    # The included file's content comes first, so the main file holds the duplicates.
    assert problems(main) == [
        (
            str(main),
            "listeners[0].name",
            f'duplicate listener name "main" (first at listeners[0] in {m})',
        ),
        (str(main), "backends.fn", f'duplicate backend name "fn" (first at backends.fn in {m})'),
        (str(main), "routes[0].name", f'duplicate route name "all" (first at routes[0] in {m})'),
    ]


# --- syntax errors and unreadable files --------------------------------------------------


def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "gw.toml", '[[listeners]]\nname = "main"\naddress = \n')
    assert problems(path) == [(str(path), "line 3, column 11", "invalid TOML: Invalid value")]


def test_toml_syntax_error_in_an_include(tmp_path: Path) -> None:
    main = write(tmp_path / "gw.toml", 'include = ["bad.toml"]\n' + make())
    bad = write(tmp_path / "bad.toml", '[[routes]]\nname = "x"\nname = "y"\n')
    assert problems(main) == [
        (str(bad), "line 3, column 11", "invalid TOML: Cannot overwrite a value")
    ]


def test_unterminated_file_reports_end_of_file(tmp_path: Path) -> None:
    path = write(tmp_path / "gw.toml", "# a list\nx = [1,\n")
    assert problems(path) == [(str(path), "line 2 (end of file)", "invalid TOML: Invalid value")]


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_bytes(b'# ok\nname = "\xff"\n')
    assert problems(path) == [(str(path), "line 2", "invalid TOML: file is not valid UTF-8")]


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert problems(path) == [(str(path), "", "cannot read config file: No such file or directory")]


# --- every validation error ------------------------------------------------------------

CASES: list[tuple[str, dict[str, object], str, str]] = [
    # (id, make() arguments, key path, message)
    (
        "unknown top-level key",
        {"top": "listners = []"},
        "listners",
        'unknown key "listners"; did you mean "listeners"?',
    ),
    ("unknown key no suggestion", {"top": "zzz = 1"}, "zzz", 'unknown key "zzz"'),
    (
        "unknown backend key",
        {"backend": {"retries": "1"}},
        "backends.fn.retries",
        'unknown key "retries"',
    ),
    (
        "part of one key",
        {"backend": {"idle_timeout": "1"}},
        "backends.fn.idle_timeout",
        'unknown key "idle_timeout"; did you mean "pool_idle_timeout_s"?',
    ),
    (
        "part of several keys",
        {"backend": {"out_s": "1"}},
        "backends.fn.out_s",
        'unknown key "out_s"; did you mean one of "connect_timeout_s", '
        '"first_byte_timeout_s", "total_timeout_s"?',
    ),
    (
        "misspelt backend key",
        {"backend": {"conect_timeout_s": "1"}},
        "backends.fn.conect_timeout_s",
        'unknown key "conect_timeout_s"; did you mean "connect_timeout_s"?',
    ),
    (
        "unknown gateway key",
        {"top": "[gateway]\nxff = true"},
        "gateway.xff",
        'unknown key "xff"; did you mean "xff_append"?',
    ),
    (
        "unknown limits key",
        {"top": "[limits]\nmax_head_size = 1"},
        "limits.max_head_size",
        'unknown key "max_head_size"; did you mean "max_head_bytes"?',
    ),
    (
        "string for int",
        {"top": '[limits]\nmax_head_bytes = "32k"'},
        "limits.max_head_bytes",
        'expected integer, got string "32k"',
    ),
    (
        "float for int",
        {"backend": {"pool_max_size": "1.5"}},
        "backends.fn.pool_max_size",
        "expected integer, got float 1.5",
    ),
    (
        "bool for seconds",
        {"top": "[limits]\nidle_timeout_s = true"},
        "limits.idle_timeout_s",
        "expected number (seconds), got boolean true",
    ),
    (
        "array for seconds",
        {"backend": {"total_timeout_s": "[1]"}},
        "backends.fn.total_timeout_s",
        "expected number (seconds), got array",
    ),
    (
        "negative int",
        {"top": "[limits]\nmax_connections = -1"},
        "limits.max_connections",
        "must be greater than 0, got -1",
    ),
    (
        "zero seconds",
        {"backend": {"connect_timeout_s": "0"}},
        "backends.fn.connect_timeout_s",
        "must be greater than 0, got 0",
    ),
    (
        "negative where zero is allowed",
        {"top": "[limits]\nmax_body_bytes = -1"},
        "limits.max_body_bytes",
        "must be 0 or more, got -1",
    ),
    (
        "negative drain",
        {"top": "[gateway]\ndrain_timeout_s = -0.5"},
        "gateway.drain_timeout_s",
        "must be 0 or more, got -0.5",
    ),
    (
        "nan",
        {"top": "[limits]\nhead_timeout_s = nan"},
        "limits.head_timeout_s",
        "must be a finite number, got nan",
    ),
    (
        "inf",
        {"backend": {"pool_idle_timeout_s": "inf"}},
        "backends.fn.pool_idle_timeout_s",
        "must be a finite number, got inf",
    ),
    (
        "first byte after total",
        {"backend": {"first_byte_timeout_s": "20", "total_timeout_s": "10"}},
        "backends.fn.first_byte_timeout_s",
        "first_byte_timeout_s (20 s) is longer than total_timeout_s (10 s)",
    ),
    (
        "bool type",
        {"top": '[gateway]\nxff_append = "yes"'},
        "gateway.xff_append",
        'expected boolean (true or false), got string "yes"',
    ),
    (
        "via true",
        {"top": "[gateway]\nvia = true"},
        "gateway.via",
        "expected string or false, got boolean true",
    ),
    (
        "via empty",
        {"top": '[gateway]\nvia = ""'},
        "gateway.via",
        "must not be empty; use via = false to turn Via off",
    ),
    (
        "via line break",
        {"top": '[gateway]\nvia = "1.1 a\\r\\nX: y"'},
        "gateway.via",
        "must be visible ASCII (a header value), without line breaks",
    ),
    ("gateway not a table", {"top": "gateway = 1"}, "gateway", "expected table, got integer 1"),
    # addresses
    (
        "address without port",
        {"listener": {"address": '"127.0.0.1"'}},
        "listeners[0].address",
        '"127.0.0.1" has no port; expected HOST:PORT, e.g. 127.0.0.1:8080',
    ),
    (
        "bare ipv6",
        {"listener": {"address": '"::1:8080"'}},
        "listeners[0].address",
        "IPv6 addresses need brackets, e.g. [::1]:8080",
    ),
    (
        "bad ipv6",
        {"listener": {"address": '"[::g]:80"'}},
        "listeners[0].address",
        '"::g" is not an IPv6 address',
    ),
    (
        "unclosed bracket",
        {"listener": {"address": '"[::1:80"'}},
        "listeners[0].address",
        '"[::1:80" is not [IPV6]:PORT, e.g. [::1]:8080',
    ),
    (
        "port too big",
        {"listener": {"address": '"127.0.0.1:65536"'}},
        "listeners[0].address",
        "port 65536 is out of range 0-65535",
    ),
    (
        "port not a number",
        {"listener": {"address": '"127.0.0.1:http"'}},
        "listeners[0].address",
        'port "http" is not a number',
    ),
    (
        "negative port",
        {"listener": {"address": '"127.0.0.1:-1"'}},
        "listeners[0].address",
        'port "-1" is not a number',
    ),
    (
        "bad ipv4",
        {"listener": {"address": '"300.1.1.1:80"'}},
        "listeners[0].address",
        '"300.1.1.1" is not an IPv4 address',
    ),
    (
        "no host",
        {"listener": {"address": '":80"'}},
        "listeners[0].address",
        "missing host; use 0.0.0.0 or [::] to listen on all addresses",
    ),
    (
        "bad host name",
        {"listener": {"address": '"my_host:80"'}},
        "listeners[0].address",
        '"my_host" is not a valid host name',
    ),
    (
        "address not a string",
        {"listener": {"address": "8080"}},
        "listeners[0].address",
        "expected string, got integer 8080",
    ),
    (
        "address missing",
        {"listener": {"address": None}},
        "listeners[0].address",
        "missing (required)",
    ),
    # endpoints
    (
        "ftp endpoint",
        {"backend": {"endpoints": '["ftp://fn.example.com"]'}},
        "backends.fn.endpoints[0]",
        'URL scheme must be http or https, got "ftp"',
    ),
    (
        "no scheme",
        {"backend": {"endpoints": '["fn.example.com"]'}},
        "backends.fn.endpoints[0]",
        "URL scheme must be http or https, got none",
    ),
    (
        "userinfo",
        {"backend": {"endpoints": '["https://u:p@fn.example.com"]'}},
        "backends.fn.endpoints[0]",
        "URL must not contain user info (user:password@); "
        "upstream credentials are configured apart from the URL",
    ),
    (
        "query",
        {"backend": {"endpoints": '["https://fn.example.com/x?key=1"]'}},
        "backends.fn.endpoints[0]",
        "URL must not have a query (?...)",
    ),
    (
        "empty query",
        {"backend": {"endpoints": '["https://fn.example.com/?"]'}},
        "backends.fn.endpoints[0]",
        "URL must not have a query (?...)",
    ),
    (
        "fragment",
        {"backend": {"endpoints": '["https://fn.example.com/#top"]'}},
        "backends.fn.endpoints[0]",
        "URL must not have a fragment (#...)",
    ),
    (
        "no host",
        {"backend": {"endpoints": '["http:///x"]'}},
        "backends.fn.endpoints[0]",
        "URL has no host",
    ),
    (
        "port 0",
        {"backend": {"endpoints": '["http://127.0.0.1:0"]'}},
        "backends.fn.endpoints[0]",
        "URL port must be 1-65535, got 0",
    ),
    (
        "port too big",
        {"backend": {"endpoints": '["http://127.0.0.1:70000"]'}},
        "backends.fn.endpoints[0]",
        "URL port is not a number in 1-65535",
    ),
    (
        "space",
        {"backend": {"endpoints": '["http://fn.example.com/a b"]'}},
        "backends.fn.endpoints[0]",
        "URL contains whitespace or control characters",
    ),
    (
        "bad url host",
        {"backend": {"endpoints": '["http://fn..example/"]'}},
        "backends.fn.endpoints[0]",
        '"fn..example" is not a valid host name',
    ),
    (
        "second endpoint",
        {"backend": {"endpoints": '["http://127.0.0.1:1", 5]'}},
        "backends.fn.endpoints[1]",
        "expected string (a URL) or table {url = ...}, got integer 5",
    ),
    (
        "endpoints empty",
        {"backend": {"endpoints": "[]"}},
        "backends.fn.endpoints",
        "must list at least one endpoint URL",
    ),
    (
        "endpoints string",
        {"backend": {"endpoints": '"http://127.0.0.1:1"'}},
        "backends.fn.endpoints",
        'expected array of URLs, got string "http://127.0.0.1:1"',
    ),
    (
        "endpoints missing",
        {"backend": {"endpoints": None, "pool_max_size": "2"}},
        "backends.fn.endpoints",
        "missing (required): a backend needs at least one endpoint URL",
    ),
    (
        "bad server_name",
        {"backend": {"endpoints": '["https://a.example"]', "server_name": '"a b"'}},
        "backends.fn.server_name",
        '"a b" is not a valid host name',
    ),
    (
        "server_name on http backend",
        {"backend": {"server_name": '"a.example"'}},
        "backends.fn.server_name",
        "server_name has no effect: no endpoint of this backend uses https",
    ),
    (
        "bad backend name",
        {"extra": section('[backends."a b"]', BACKEND, {})},
        'backends."a b"',
        "invalid name \"a b\": use letters, digits, '-', '_' and '.', "
        "starting with a letter or digit",
    ),
    (
        "backend not a table",
        {"extra": "[backends]\nother = 1\n"},
        "backends.other",
        "expected table, got integer 1",
    ),
    # routes
    (
        "unknown backend",
        {"route": {"backend": '"fnn"'}},
        "routes[0].backend",
        'unknown backend "fnn"; did you mean "fn"?',
    ),
    (
        "route without backend",
        {"route": {"backend": None}},
        "routes[0].backend",
        "missing (required unless path_map names the backend)",
    ),
    ("route without name", {"route": {"name": None}}, "routes[0].name", "missing (required)"),
    (
        "bad route name",
        {"route": {"name": '"a/b"'}},
        "routes[0].name",
        "invalid name \"a/b\": use letters, digits, '-', '_' and '.', "
        "starting with a letter or digit",
    ),
    (
        "relative prefix",
        {"route": {"path_prefix": '"api"'}},
        "routes[0].path_prefix",
        'must start with /, got "api"',
    ),
    (
        "prefix with query",
        {"route": {"path_prefix": '"/api?x"'}},
        "routes[0].path_prefix",
        "must not contain spaces, control characters, '?' or '#'",
    ),
    (
        "strip_prefix string",
        {"route": {"strip_prefix": '"no"'}},
        "routes[0].strip_prefix",
        'expected boolean (true or false), got string "no"',
    ),
    (
        "duplicate route name",
        {"extra": section("[[routes]]", ROUTE, {"path_prefix": '"/b"'})},
        "routes[1].name",
        'duplicate route name "all" (first at routes[0])',
    ),
    (
        "duplicate conditions",
        {"extra": section("[[routes]]", ROUTE, {"name": '"b"'})},
        "routes[1]",
        'same conditions as route "all"; this route would never match',
    ),
    # listeners
    (
        "duplicate listener name",
        {"extra": section("[[listeners]]", LISTENER, {"address": '"127.0.0.1:1"'})},
        "listeners[1].name",
        'duplicate listener name "main" (first at listeners[0])',
    ),
    (
        "same address twice",
        {
            "listener": {"address": '"127.0.0.1:8080"'},
            "extra": section(
                "[[listeners]]", LISTENER, {"name": '"b"', "address": '"127.0.0.1:8080"'}
            ),
        },
        "listeners[1].address",
        'same address as listener "main"',
    ),
    (
        "client_cert value",
        {"listener": {"client_cert": '"sometimes"'}},
        "listeners[0].client_cert",
        'must be one of "none", "optional", "required", got "sometimes"',
    ),
    (
        "client_cert without CA",
        {"listener": {"client_cert": '"required"'}},
        "listeners[0].client_cert",
        'client_cert = "required" needs client_ca_file',
    ),
    (
        "include not an array",
        {"top": 'include = "x.toml"'},
        "include",
        "expected array of file names, got string",
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "key_path", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_each_problem_names_file_key_and_what_is_wrong(
    tmp_path: Path, kwargs: dict[str, object], key_path: str, message: str
) -> None:
    path = write(tmp_path / "gateway.toml", make(**kwargs))  # type: ignore[arg-type]
    assert problems(path) == [(str(path), key_path, message)]


def test_sections_of_the_wrong_shape(tmp_path: Path) -> None:
    path = write(
        tmp_path / "gw.toml",
        'listeners = "x"\n[routes]\nname = "a"\n' + section("[backends.fn]", BACKEND, {}),
    )
    assert problems(path) == [
        (str(path), "listeners", 'expected array of tables ([[listeners]]), got string "x"'),
        (
            str(path),
            "routes",
            "expected array of tables ([[routes]]), got a single table ([routes])",
        ),
    ]


@pytest.mark.parametrize("listeners", ["", "listeners = []\n"])
def test_no_listeners(tmp_path: Path, listeners: str) -> None:
    path = write(
        tmp_path / "gw.toml",
        listeners + section("[backends.fn]", BACKEND, {}) + section("[[routes]]", ROUTE, {}),
    )
    assert problems(path) == [
        (str(path), "listeners", "no listeners: add at least one [[listeners]] table")
    ]


# --- files: missing, unreadable, wrong content ---------------------------------------------

FILE_CASES: list[tuple[str, dict[str, str | None], dict[str, str | None], str, str]] = [
    # (id, listener overrides, backend overrides, key path, message with {d} = the directory)
    (
        "missing cert",
        {"tls_cert_file": '"nope.pem"'},
        {},
        "listeners[0].tls_cert_file",
        "file not found: {d}/nope.pem",
    ),
    (
        "cert is a directory",
        {"tls_cert_file": '"."'},
        {},
        "listeners[0].tls_cert_file",
        "is a directory, not a file: {d}",
    ),
    ("empty path", {"tls_cert_file": '""'}, {}, "listeners[0].tls_cert_file", "must not be empty"),
    (
        "key without cert",
        {"tls_key_file": '"server.key"'},
        {},
        "listeners[0].tls_key_file",
        "tls_key_file without tls_cert_file; set both for TLS",
    ),
    (
        "CA without TLS",
        {"client_ca_file": '"ca.pem"', "client_cert": '"required"'},
        {},
        "listeners[0].client_ca_file",
        "client certificates need TLS: set tls_cert_file too",
    ),
    (
        "CA with client_cert none",
        {"tls_cert_file": '"combined.pem"', "client_ca_file": '"ca.pem"'},
        {},
        "listeners[0].client_ca_file",
        'client_ca_file is set but client_cert is "none"; '
        'set client_cert = "required" or "optional"',
    ),
    (
        "key does not match cert",
        {"tls_cert_file": '"server.pem"', "tls_key_file": '"other.key"'},
        {},
        "listeners[0].tls_cert_file",
        "cannot load certificate and key: key values mismatch",
    ),
    (
        "cert without key",
        {"tls_cert_file": '"server.pem"'},
        {},
        "listeners[0].tls_cert_file",
        "no private key in {d}/server.pem; set tls_key_file or add the key to it",
    ),
    (
        "garbage cert",
        {"tls_cert_file": '"garbage.pem"', "tls_key_file": '"server.key"'},
        {},
        "listeners[0].tls_cert_file",
        "no PEM certificate in {d}/garbage.pem",
    ),
    (
        "garbage key",
        {"tls_cert_file": '"server.pem"', "tls_key_file": '"garbage.pem"'},
        {},
        "listeners[0].tls_key_file",
        "no PEM private key in {d}/garbage.pem",
    ),
    (
        "key given as cert",
        {"tls_cert_file": '"server.key"', "tls_key_file": '"server.key"'},
        {},
        "listeners[0].tls_cert_file",
        "no PEM certificate in {d}/server.key",
    ),
    (
        "encrypted key",
        {"tls_cert_file": '"server.pem"', "tls_key_file": '"encrypted.key"'},
        {},
        "listeners[0].tls_key_file",
        "private key is encrypted; passphrase-protected keys are not supported",
    ),
    (
        "garbage CA",
        {
            "tls_cert_file": '"combined.pem"',
            "client_ca_file": '"garbage.pem"',
            "client_cert": '"required"',
        },
        {},
        "listeners[0].client_ca_file",
        "no PEM certificate in {d}/garbage.pem",
    ),
    (
        "missing backend CA",
        {},
        {"endpoints": '["https://a.example"]', "ca_file": '"ca2.pem"'},
        "backends.fn.ca_file",
        "file not found: {d}/ca2.pem",
    ),
    (
        "garbage backend CA",
        {},
        {"endpoints": '["https://a.example"]', "ca_file": '"garbage.pem"'},
        "backends.fn.ca_file",
        "no PEM certificate in {d}/garbage.pem",
    ),
    (
        "client key without cert",
        {},
        {"endpoints": '["https://a.example"]', "client_key_file": '"server.key"'},
        "backends.fn.client_key_file",
        "client_key_file without client_cert_file; set both",
    ),
    (
        "client key mismatch",
        {},
        {
            "endpoints": '["https://a.example"]',
            "client_cert_file": '"server.pem"',
            "client_key_file": '"other.key"',
        },
        "backends.fn.client_cert_file",
        "cannot load certificate and key: key values mismatch",
    ),
    (
        "CA on http backend",
        {},
        {"ca_file": '"ca.pem"'},
        "backends.fn.ca_file",
        "ca_file has no effect: no endpoint of this backend uses https",
    ),
]


@pytest.mark.parametrize(
    ("listener", "backend", "key_path", "message"),
    [c[1:] for c in FILE_CASES],
    ids=[c[0] for c in FILE_CASES],
)
def test_file_problems(
    certs: Path,
    listener: dict[str, str | None],
    backend: dict[str, str | None],
    key_path: str,
    message: str,
) -> None:
    path = write(certs / "gateway.toml", make(listener=listener, backend=backend))
    assert problems(path) == [(str(path), key_path, message.format(d=certs))]


def test_mtls_listener_loads(certs: Path) -> None:
    path = write(
        certs / "gw.toml",
        make(
            listener={
                "tls_cert_file": '"server.pem"',
                "tls_key_file": '"server.key"',
                "client_ca_file": '"ca.pem"',
                "client_cert": '"required"',
            }
        ),
    )
    listener = load_config(path).listeners[0]
    assert listener.client_cert == "required"
    assert listener.client_ca_file == str(certs / "ca.pem")


# --- all problems together -----------------------------------------------------------------


def test_all_problems_come_together_in_file_order(tmp_path: Path) -> None:
    main = write(
        tmp_path / "gw.toml",
        """include = ["routes.toml"]

[limits]
max_head_bytes = 0
max_body_byts = 3

[[listeners]]
name = "main"
address = "::1:80"

[backends.fn]
endpoints = ["ftp://x.example", "http://127.0.0.1:9000"]
pool_max_size = 1.5
""",
    )
    routes = write(
        tmp_path / "routes.toml",
        """[[routes]]
name = "api"
path_prefix = "api"
backend = "fm"
""",
    )
    m, r = str(main), str(routes)
    assert problems(main) == [
        (r, "routes[0].path_prefix", 'must start with /, got "api"'),
        (m, "limits.max_body_byts", 'unknown key "max_body_byts"; did you mean "max_body_bytes"?'),
        (m, "limits.max_head_bytes", "must be greater than 0, got 0"),
        (m, "listeners[0].address", "IPv6 addresses need brackets, e.g. [::1]:80"),
        (m, "backends.fn.endpoints[0]", 'URL scheme must be http or https, got "ftp"'),
        (m, "backends.fn.pool_max_size", "expected integer, got float 1.5"),
        (r, "routes[0].backend", 'unknown backend "fm" (known: fn)'),
    ]
    # The exception's text carries every line too.
    with pytest.raises(ConfigError, match=r"(?s)routes\.toml: routes\[0\]\.path_prefix.*fm"):
        load_config(main)


def test_a_bad_backend_does_not_make_its_routes_unknown(tmp_path: Path) -> None:
    path = write(tmp_path / "gw.toml", make(backend={"endpoints": '["ftp://x"]'}))
    assert [p[1] for p in problems(path)] == ["backends.fn.endpoints[0]"]


def test_an_unreadable_include_does_not_cascade(tmp_path: Path) -> None:
    main = write(
        tmp_path / "gw.toml",
        'include = ["backends.toml"]\n' + section("[[routes]]", ROUTE, {"backend": '"remote"'}),
    )
    write(tmp_path / "backends.toml", "[backends.remote\n")
    [(file, _, message)] = problems(main)
    assert file == str(tmp_path / "backends.toml")
    assert message.startswith("invalid TOML")


# --- config_from_dict ----------------------------------------------------------------------


def test_config_from_dict(certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(certs)
    data = {
        "listeners": [
            {
                "name": "tls",
                "address": "127.0.0.1:0",
                "tls_cert_file": "server.pem",
                "tls_key_file": "server.key",
            }
        ],
        "backends": {"fn": {"endpoints": ["http://127.0.0.1:9000"]}},
        "routes": [{"name": "all", "backend": "fn"}],
    }
    config = config_from_dict(data, source="embedded")
    assert config.source == "embedded"
    assert config.listeners[0].tls_cert_file == str(certs / "server.pem")


def test_config_from_dict_includes_resolve_against_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "conf" / "routes.toml", section("[[routes]]", ROUTE, {}))
    monkeypatch.chdir(tmp_path)
    data = {
        "include": ["conf/routes.toml"],
        "listeners": [{"name": "a", "address": "127.0.0.1:0"}],
        "backends": {"fn": {"endpoints": ["http://127.0.0.1:9000"]}},
    }
    assert config_from_dict(data).routes == (RouteConfig(name="all", backend="fn"),)


def test_config_from_dict_problems_name_the_source() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"listeners": [{"name": "x", "address": "nowhere"}]}, source="app")
    assert info.value.problems == [
        (
            "app",
            "listeners[0].address",
            '"nowhere" has no port; expected HOST:PORT, e.g. 127.0.0.1:8080',
        ),
    ]


def test_config_from_dict_rejects_a_non_mapping() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict([1, 2])  # type: ignore[arg-type]
    assert info.value.problems == [("<dict>", "", "expected a table (dict), got array")]


def test_demo_config_is_what_the_loader_would_build() -> None:
    from_dict = config_from_dict(
        {
            "listeners": [{"name": "demo", "address": "127.0.0.1:8081"}],
            "backends": {"demo-fn": {"endpoints": ["http://127.0.0.1:9999"]}},
            "routes": [{"name": "demo", "backend": "demo-fn", "path_prefix": "/"}],
        },
        source="<demo>",
    )
    assert demo_config(9999, 8081) == from_dict


# --- the parsers on their own ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:0", ("::1", 0)),
        ("[::]:443", ("::", 443)),
        ("localhost:80", ("localhost", 80)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("url", "authority", "prefix"),
    [
        ("http://fn.example.com", "fn.example.com", ""),
        ("https://fn.example.com:443/", "fn.example.com", ""),
        ("https://FN.example.com:8443/a/b/", "fn.example.com:8443", "/a/b"),
        ("HTTP://127.0.0.1:80/x", "127.0.0.1", "/x"),
        ("http://[::1]:9000/p", "[::1]:9000", "/p"),
        ("https://[2001:db8::1]", "[2001:db8::1]", ""),
    ],
)
def test_parse_endpoint(url: str, authority: str, prefix: str) -> None:
    endpoint = parse_endpoint(url)
    assert endpoint.authority == authority
    assert endpoint.path_prefix == prefix
    assert endpoint.scheme in ("http", "https")
    assert endpoint.url == url
