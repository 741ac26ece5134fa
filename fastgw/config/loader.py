"""Load, include and validate TOML configuration into frozen config objects.

Strategy: read the root file, then each file it includes (depth first, an included file's
content counts as if pasted where its ``include`` line stands, i.e. before the including
file's own tables). Every file is checked on its own against the schema below; what one
file cannot see (a route naming a backend from another file, a name used twice across
files) is checked once all files are in. Nothing stops at the first problem: each one is
collected as ``(file, key path, message)`` and all of them are raised together in one
``ConfigError``, so an operator fixes a file in one pass.

Schema (one file; ``gateway`` and ``limits`` only in the root file)::

    include = ["routes.toml"]        # relative to this file; nested includes allowed
    [gateway]    via = "1.1 fastgw" | false, xff_append = true, drain_timeout_s = 10
    [limits]     every field of model.Limits, same names
    [[listeners]] name, address = "127.0.0.1:8080" | "[::1]:8080", tls_cert_file,
                 tls_key_file, client_ca_file, client_cert = "none"|"optional"|"required"
    [backends.NAME] endpoints = ["https://host/prefix", ...], ca_file, client_cert_file,
                 client_key_file, server_name, connect_timeout_s, first_byte_timeout_s,
                 total_timeout_s, pool_max_size, pool_idle_timeout_s
    [backends.NAME.credential] type = "google_id_token" | "aws_sigv4" |
                 "azure_function_key" | "bearer_file", and that type's keys
                 (_CREDENTIAL_KEYS; model.CredentialConfig says what each means)
    [[routes]]   name, path_prefix = "/", backend = "NAME", strip_prefix = false

File paths (certificates, keys, CAs, includes) are relative to the file that names them
(to the current directory for ``config_from_dict``); the objects hold absolute paths.
Certificate, key and CA files are loaded into a throwaway ``ssl.SSLContext`` so a bad PEM
or a key that does not match its certificate is a config problem, not a failed start.
A file included twice (a diamond, not a cycle) is read once.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fastgw.config.model import (
    AdminConfig,
    AuditConfig,
    BackendConfig,
    BudgetConfig,
    ClaimCondition,
    CredentialConfig,
    Endpoint,
    GatewayConfig,
    HeaderActions,
    HealthCheckConfig,
    HedgeConfig,
    IdentityConfig,
    Limits,
    LimitsStoreConfig,
    LimitTier,
    ListenerConfig,
    OutlierConfig,
    PolicyConfig,
    PolicyRule,
    RateLimitConfig,
    RetryConfig,
    RouteConfig,
)
from fastgw.errors import ConfigError

__all__ = ["config_from_dict", "load_config", "parse_address", "parse_endpoint"]

Problem = tuple[str, str, str]

# --- the schema, as data -------------------------------------------------------------

_ROOT_KEYS = (
    "include", "gateway", "limits", "admin", "audit", "identity", "listeners", "backends",
    "routes", "issuers", "api_keys", "policies", "rate_limits", "limits_store", "budgets",
)  # fmt: skip
_ADMIN_KEYS = ("address",)
_AUDIT_KEYS = ("enabled", "path", "sample_success")
# Included files: routing files and security files (issuers, API keys, policies).
_INCLUDED_KEYS = (
    "include", "listeners", "backends", "routes", "issuers", "api_keys", "policies",
    "rate_limits", "budgets",
)  # fmt: skip
_BUDGET_KEYS = (
    "name", "requests", "window", "time_zone", "key", "routes", "mode", "cost_header",
    "max_cost", "store",
)  # fmt: skip
_LIMIT_KEYS = ("name", "rate_per_s", "burst", "key", "routes", "mode", "tier", "tier_map", "tiers")
_TIER_RE = re.compile(r"claim:[A-Za-z0-9_.:-]+\Z")
_STORE_KEYS = (
    "type", "address", "database", "prefix", "timeout_s", "on_failure", "username",
    "password_file", "password_env",
)  # fmt: skip
_LIMIT_KEY_RE = re.compile(
    r"(identity|ip|route|header:[!#$%&'*+\-.^_`|~0-9A-Za-z]+|claim:[A-Za-z0-9_.:-]+)\Z"
)
_GATEWAY_KEYS = (
    "via", "xff_append", "drain_timeout_s", "environment", "state_dir", "max_budget_keys",
)  # fmt: skip
_IDENTITY_KEYS = ("realm", "header_prefix", "authorization", "claim_headers", "token_cache_size")
_ISSUER_KEYS = (
    "issuer", "audiences", "algorithms", "leeway_s", "max_token_bytes", "required_claims",
    "discovery_url", "jwks_url", "key_files", "hmac_secret_file", "hmac_secret_env",
    "hmac_kid", "ca_file", "fetch_timeout_s", "min_refresh_s", "max_refresh_s",
    "refetch_interval_s",
)  # fmt: skip
_POLICY_KEYS = ("name", "routes", "rules", "mode", "environments", "allow_anonymous")
_RULE_KEYS = ("effect", "kinds", "issuers", "subjects", "claims", "key_attributes", "cert_sans")
_CLAIM_OPS = ("equals", "one_of", "contains", "all_of", "present")
_LISTENER_KEYS = (
    "name",
    "address",
    "tls_cert_file",
    "tls_key_file",
    "client_ca_file",
    "client_cert",
)
_BACKEND_KEYS = (
    "endpoints",
    "ca_file",
    "client_cert_file",
    "client_key_file",
    "server_name",
    "connect_timeout_s",
    "first_byte_timeout_s",
    "total_timeout_s",
    "pool_max_size",
    "pool_idle_timeout_s",
    "balance",
    "hash_on",
    "health_check",
    "outlier",
    "max_in_flight",
    "max_in_flight_per_identity",
    "max_queued",
    "queue_timeout_s",
    "retry_after_max_s",
    "credential",
    "cold_after_idle_s",
    "cold_first_byte_timeout_s",
    "keep_warm_interval_s",
    "keep_warm_path",
)
# An endpoint given as a table instead of a URL string.
_ENDPOINT_KEYS = ("url", "region", "priority", "weight", "max_in_flight")
_HEALTH_KEYS = (
    "path", "interval_s", "timeout_s", "healthy_threshold", "unhealthy_threshold",
    "expected_statuses",
)  # fmt: skip
_ROUTE_KEYS = (
    "name",
    "backend",
    "hosts",
    "path_prefix",
    "path",
    "path_regex",
    "path_map",
    "path_map_type",
    "methods",
    "headers",
    "strip_prefix",
    "replace_prefix",
    "rewrite_regex",
    "request_headers",
    "response_headers",
    "first_byte_timeout_s",
    "total_timeout_s",
    "max_body_bytes",
    "idempotent",
    "retry",
    "hedge",
    "replay_buffer_bytes",
)
# [backends.NAME.credential]: the keys each type takes (besides "type").
_CREDENTIAL_KEYS: dict[str, tuple[str, ...]] = {
    "google_id_token": (
        "source", "audience", "header", "metadata_url", "service_account", "key_file",
        "token_url",
    ),
    "aws_sigv4": (
        "source", "region", "service", "profile", "credentials_file", "endpoint_url",
    ),
    "azure_function_key": ("key_file", "key_env"),
    "bearer_file": ("path",),
}  # fmt: skip
_CREDENTIAL_VALUE_RE = re.compile(r"[\x21-\x7e]{1,2048}")
_MAP_TYPES = ("str", "beg", "end", "dir", "dom", "sub", "reg")
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_METHOD_RE = re.compile(r"[A-Z][A-Z-]*\Z")
_HOST_PATTERN_RE = re.compile(
    r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?\Z"
)
# Framing and hop-by-hop fields: fastgw writes or drops them itself.
_FRAMING_FIELDS = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer",
     "upgrade", "host"}
)  # fmt: skip
_CLIENT_CERT_MODES = ("none", "optional", "required")

# Numeric fields: (kind, lowest allowed value, whether that value itself is allowed).
# Limits are read off the model so a new field there is configurable under the same name;
# only the exceptions to "must be > 0" are listed.
_NumberRule = tuple[str, float, bool]
_LIMITS_ZERO_OK = frozenset({"max_body_bytes"})  # 0 means "no limit" (see model.Limits)
_LIMIT_RULES: dict[str, _NumberRule] = {
    f.name: (str(f.type), 0, f.name in _LIMITS_ZERO_OK) for f in dataclasses.fields(Limits)
}
assert all(kind in ("int", "float") for kind, _, _ in _LIMIT_RULES.values()), _LIMIT_RULES
_BACKEND_RULES: dict[str, _NumberRule] = {
    "connect_timeout_s": ("float", 0, False),
    "first_byte_timeout_s": ("float", 0, False),
    "total_timeout_s": ("float", 0, False),
    "pool_max_size": ("int", 0, False),
    "pool_idle_timeout_s": ("float", 0, False),
    "cold_after_idle_s": ("float", 0, False),
    "cold_first_byte_timeout_s": ("float", 0, False),
    "keep_warm_interval_s": ("float", 0, False),
}
_RETRY_KEYS = (
    "attempts", "on", "backoff_base_s", "backoff_max_s", "budget_percent", "min_retries_per_s",
)  # fmt: skip
_RETRY_RULES: dict[str, _NumberRule] = {
    "attempts": ("int", 0, True),
    "backoff_base_s": ("float", 0, True),
    "backoff_max_s": ("float", 0, True),
    "budget_percent": ("float", 0, True),
    "min_retries_per_s": ("float", 0, True),
}
_HEDGE_KEYS = (
    "delay_s", "delay", "percentile", "min_delay_s", "max_delay_s", "cold_delay_s",
    "budget_percent", "max_attempts",
)  # fmt: skip
_HEDGE_RULES: dict[str, _NumberRule] = {
    "delay_s": ("float", 0, False),
    "percentile": ("float", 0, False),
    "min_delay_s": ("float", 0, True),
    "max_delay_s": ("float", 0, False),
    "cold_delay_s": ("float", 0, True),
    "budget_percent": ("float", 0, True),
    "max_attempts": ("int", 2, True),
}
_OUTLIER_RULES: dict[str, _NumberRule] = {
    "consecutive_5xx": ("int", 0, True),
    "consecutive_gateway_failure": ("int", 0, True),
    "base_ejection_time_s": ("float", 0, False),
    "max_ejection_time_s": ("float", 0, False),
    "max_ejection_percent": ("int", 0, True),
}
_HEALTH_RULES: dict[str, _NumberRule] = {
    "interval_s": ("float", 0, False),
    "timeout_s": ("float", 0, False),
    "healthy_threshold": ("int", 1, True),
    "unhealthy_threshold": ("int", 1, True),
}
_CAP_RULES: dict[str, _NumberRule] = {
    "max_in_flight": ("int", 0, True),
    "max_in_flight_per_identity": ("int", 0, True),
    "max_queued": ("int", 0, True),
    "queue_timeout_s": ("float", 0, False),
    "retry_after_max_s": ("float", 0, True),
}
_HASH_ON_RE = re.compile(r"(identity|header:[!#$%&'*+\-.^_`|~0-9A-Za-z]+)\Z")
# 0 s drain is allowed: stop at once on SIGTERM.
_DRAIN_RULE: _NumberRule = ("float", 0, True)
# A share; values over 1 are reported by _audit.
_SAMPLE_RULE: _NumberRule = ("float", 0, True)

# Names appear in metrics labels, logs and key paths: keep them plain.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+\Z")
# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(\.{_LABEL})*\Z")
_DOTTED_DIGITS_RE = re.compile(r"[0-9.]+\Z")
_TOML_POS_RE = re.compile(
    r"^(?P<msg>.*) \(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$", re.S
)
_PATH_PREFIX_BAD_RE = re.compile(r"[\x00-\x20\x7f?#]")
_TARGET_BAD_RE = re.compile(r"[\x00-\x20\x7f#]")
# A Via value is a header field value: visible ASCII and spaces (RFC 9110 5.5, 7.6.3).
_FIELD_VALUE_RE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?\Z")


# --- public entry points -------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read the TOML file at ``path`` and the files it includes into a GatewayConfig.

    Raises ConfigError with every problem found (never only the first). Any other
    exception escaping is a bug.
    """
    display = os.fspath(path)
    builder = _Builder()
    data = builder.read_toml(display, display, "")
    if data is not None:
        builder.enter_root(display)
        builder.add_file(display, os.path.dirname(os.path.abspath(display)), data, root=True)
    return builder.finish(os.path.abspath(display))


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> GatewayConfig:
    """Validate a dict shaped like the TOML schema (for programs that embed fastgw).

    Relative file paths, includes among them, resolve against the current directory.
    ``source`` names the dict in messages. Raises ConfigError like ``load_config``.
    """
    builder = _Builder()
    if isinstance(data, Mapping):
        builder.add_file(source, os.getcwd(), dict(data), root=True)
    else:
        builder.problem(source, "", f"expected a table (dict), got {_type_name(data)}")
    return builder.finish(source)


def parse_address(text: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` / ``"[::1]:0"`` / ``"localhost:80"`` -> (host, port).

    IPv6 hosts come back without brackets. Raises ValueError saying what is wrong.
    """
    if text.startswith("["):
        m = re.fullmatch(r"\[([^\]]*)\]:([^:]*)", text)
        if m is None:
            raise ValueError(f"{_q(text)} is not [IPV6]:PORT, e.g. [::1]:8080")
        host, port_text = m.group(1), m.group(2)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_q(host)} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{_q(text)} has no port; expected HOST:PORT, e.g. 127.0.0.1:8080")
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets, e.g. [{host}]:{port_text}")
        if not host:
            raise ValueError("missing host; use 0.0.0.0 or [::] to listen on all addresses")
        _check_host(host)
    if not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"port {_q(port_text)} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return host, port


def parse_endpoint(url: str) -> Endpoint:
    """``"https://fn.example.com/prefix"`` -> Endpoint. Raises ValueError saying why not."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError("URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ValueError(f"not a valid URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        got = _q(parts.scheme) if parts.scheme else "none"
        raise ValueError(f"URL scheme must be http or https, got {got}")
    if "@" in parts.netloc:
        raise ValueError(
            "URL must not contain user info (user:password@); "
            "upstream credentials are configured apart from the URL"
        )
    if "?" in url:
        raise ValueError("URL must not have a query (?...)")
    if "#" in url:
        raise ValueError("URL must not have a fragment (#...)")
    host = parts.hostname
    if not host:
        raise ValueError("URL has no host")
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_q(host)} is not an IPv6 address") from None
    else:
        _check_host(host)
    try:
        port = parts.port
    except ValueError:
        raise ValueError("URL port is not a number in 1-65535") from None
    if port is None:
        port = 443 if scheme == "https" else 80
    elif port == 0:
        raise ValueError("URL port must be 1-65535, got 0")
    return Endpoint(
        url=url,
        scheme=scheme,
        host=host,
        port=port,
        path_prefix=parts.path.rstrip("/"),
    )


def _check_host(host: str) -> None:
    if _DOTTED_DIGITS_RE.match(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{_q(host)} is not an IPv4 address") from None
    elif len(host) > 253 or not _HOSTNAME_RE.match(host):
        raise ValueError(f"{_q(host)} is not a valid host name")


# --- the builder ---------------------------------------------------------------------


@dataclass
class _Named:
    """A listener, backend or route as read, kept for the cross-file checks even when
    the object itself could not be built (so one bad route does not cascade)."""

    name: str | None
    file: str
    path: str
    obj: Any  # ListenerConfig | BackendConfig | RouteConfig | None when invalid
    backend: str | None = None  # routes: the backend named, checked even if the route is bad


class _Builder:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.gateway: dict[str, Any] = {}
        self.limits = Limits()
        self.listeners: list[_Named] = []
        self.backends: list[_Named] = []
        self.routes: list[_Named] = []
        self.identity: dict[str, Any] = {}
        self.issuers: list[tuple[str, str, Any]] = []  # (file, key path, Issuer)
        self.api_keys: list[Any] = []
        self.api_key_header = "X-Api-Key"
        self.policies: list[tuple[str, str, PolicyConfig]] = []
        self.rate_limits: list[tuple[str, str, RateLimitConfig]] = []
        self.budgets: list[tuple[str, str, BudgetConfig]] = []
        # (file, key path, map) of path_map routes: the backends they name must exist.
        self.map_backends: list[tuple[str, str, Any]] = []
        self._seen_files: set[str] = set()  # realpaths of files read
        self._stack: list[tuple[str, str]] = []  # (realpath, display) of files being read
        self.root: str | None = None  # the root file's name, once it was read
        self.unread = False  # some included file could not be read or parsed
        self.saw_listeners = False  # some file has a malformed "listeners" key

    def enter_root(self, display: str) -> None:
        """Make the root file the bottom of the include stack, for cycle detection."""
        real = os.path.realpath(display)
        self._stack.append((real, display))
        self._seen_files.add(real)

    def problem(self, file: str, path: str, message: str) -> None:
        self.problems.append((file, path, message))

    # -- files and includes --

    def read_toml(
        self, display: str, fs_path: str, where: str, by: str = ""
    ) -> dict[str, Any] | None:
        data = self._read_toml(display, fs_path, where, by)
        if data is None:
            self.unread = True
        return data

    def _read_toml(self, display: str, fs_path: str, where: str, by: str) -> dict[str, Any] | None:
        """Parse one file; report a problem and return None if that is not possible.
        ``by``/``where`` name the including file and key, for unreadable includes."""
        try:
            with open(fs_path, "rb") as f:
                raw = f.read()
        except OSError as e:
            reason = e.strerror or str(e)
            if by:
                self.problem(by, where, f"cannot read included file {display}: {reason}")
            else:
                self.problem(display, "", f"cannot read config file: {reason}")
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            self.problem(display, f"line {line}", "invalid TOML: file is not valid UTF-8")
            return None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            m = _TOML_POS_RE.match(str(e))
            if m is None:
                self.problem(display, "", f"invalid TOML: {e}")
            elif m.group("line"):
                pos = f"line {m.group('line')}, column {m.group('col')}"
                self.problem(display, pos, f"invalid TOML: {m.group('msg')}")
            else:
                last = len(text.splitlines()) or 1
                self.problem(
                    display, f"line {last} (end of file)", f"invalid TOML: {m.group('msg')}"
                )
            return None
        return data

    def add_file(self, file: str, base_dir: str, data: dict[str, Any], *, root: bool) -> None:
        known = _ROOT_KEYS if root else _INCLUDED_KEYS
        if root:
            self.root = file
        for key in data:
            if key not in known:
                if not root and key in _ROOT_KEYS:
                    self.problem(file, key, f"[{key}] is only allowed in the main config file")
                else:
                    self.problem(file, _key(key), _unknown_key(key, known))
        if "include" in data:
            self._includes(file, base_dir, data["include"])
        if root:
            gateway = _table(self, file, "gateway", data.get("gateway", {}))
            if gateway is not None:
                self._gateway(file, base_dir, gateway)
            limits = _table(self, file, "limits", data.get("limits", {}))
            if limits is not None:
                self._limits(file, limits)
            if "admin" in data:
                admin = _table(self, file, "admin", data["admin"])
                if admin is not None:
                    self._admin(file, admin)
            if "limits_store" in data:
                store = _table(self, file, "limits_store", data["limits_store"])
                if store is not None:
                    self._limits_store(file, base_dir, store)
            if "audit" in data:  # no [audit] table: no audit log
                audit = _table(self, file, "audit", data["audit"])
                if audit is not None:
                    self._audit(file, base_dir, audit)
        if not isinstance(data.get("listeners", []), list):
            self.saw_listeners = True  # malformed, reported: "no listeners" would only add noise
        listeners = _array_of_tables(self, file, "listeners", data.get("listeners", []))
        for i, item in enumerate(listeners):
            if item is not None:
                self._listener(file, base_dir, f"listeners[{i}]", item)
        backends = _table(self, file, "backends", data.get("backends", {}))
        for name, item in (backends or {}).items():
            path = f"backends.{_key(name)}"
            table = _table(self, file, path, item)
            if table is not None:
                self._backend(file, base_dir, path, name, table)
            else:
                self.backends.append(_Named(name, file, path, None))
        routes = _array_of_tables(self, file, "routes", data.get("routes", []))
        for i, item in enumerate(routes):
            if item is not None:
                self._route(file, base_dir, f"routes[{i}]", item)
        if root and "identity" in data:
            ident = _table(self, file, "identity", data["identity"])
            if ident is not None:
                self._identity(file, ident)
        issuers = _table(self, file, "issuers", data.get("issuers", {}))
        for name, item in (issuers or {}).items():
            table = _table(self, file, f"issuers.{_key(name)}", item)
            if table is not None:
                self._issuer(file, base_dir, name, table)
        if "api_keys" in data:
            keys = _table(self, file, "api_keys", data["api_keys"])
            if keys is not None:
                self._api_keys(file, keys)
        limits_ = _array_of_tables(self, file, "rate_limits", data.get("rate_limits", []))
        for i, item in enumerate(limits_):
            if item is not None:
                self._rate_limit(file, f"rate_limits[{i}]", item, base_dir)
        budgets = _array_of_tables(self, file, "budgets", data.get("budgets", []))
        for i, item in enumerate(budgets):
            if item is not None:
                self._budget(file, f"budgets[{i}]", item)
        policies = _array_of_tables(self, file, "policies", data.get("policies", []))
        for i, item in enumerate(policies):
            if item is not None:
                self._policy(file, f"policies[{i}]", item)

    def _includes(self, file: str, base_dir: str, value: Any) -> None:
        if not isinstance(value, list):
            self.problem(file, "include", f"expected array of file names, got {_type_name(value)}")
            return
        for i, name in enumerate(value):
            where = f"include[{i}]"
            if not isinstance(name, str):
                self.problem(file, where, f"expected string (a file name), got {_type_name(name)}")
                continue
            if not name:
                self.problem(file, where, "must not be empty")
                continue
            fs_path = os.path.join(base_dir, name)
            display = os.path.normpath(os.path.join(os.path.dirname(file), name))
            real = os.path.realpath(fs_path)
            chain = [d for r, d in self._stack]
            if any(r == real for r, _ in self._stack):
                start = next(i for i, (r, _) in enumerate(self._stack) if r == real)
                cycle = " -> ".join([*chain[start:], display])
                self.problem(file, where, f"include cycle: {cycle}")
                continue
            if real in self._seen_files:
                continue
            data = self.read_toml(display, fs_path, where, by=file)
            if data is None:
                continue
            self._seen_files.add(real)
            self._stack.append((real, display))
            try:
                self.add_file(display, os.path.dirname(os.path.abspath(fs_path)), data, root=False)
            finally:
                self._stack.pop()

    # -- sections --

    def _gateway(self, file: str, base_dir: str, t: dict[str, Any]) -> None:
        r = _Reader(self, file, "gateway", t, _GATEWAY_KEYS, base_dir)
        if "via" in t:
            via = t["via"]
            if via is False:
                self.gateway["via"] = None
            elif isinstance(via, str):
                if _FIELD_VALUE_RE.match(via):
                    self.gateway["via"] = via
                elif not via:
                    r.bad("via", "must not be empty; use via = false to turn Via off")
                else:
                    r.bad("via", "must be visible ASCII (a header value), without line breaks")
            else:
                r.bad("via", f"expected string or false, got {_describe(via)}")
        xff = r.get_bool("xff_append")
        if xff is not None:
            self.gateway["xff_append"] = xff
        drain = r.get_number("drain_timeout_s", _DRAIN_RULE)
        if drain is not None:
            self.gateway["drain_timeout_s"] = drain
        env = r.get_str("environment")
        if env is not None:
            if _NAME_RE.match(env):
                self.gateway["environment"] = env
            else:
                r.bad("environment", _bad_name(env))
        state_dir = r.get_str("state_dir")
        if state_dir is not None:
            path = os.path.abspath(os.path.join(base_dir, os.path.expanduser(state_dir)))
            if not state_dir:
                r.bad("state_dir", "must not be empty; leave it out to keep state in memory")
            elif not os.path.isdir(path):
                r.bad("state_dir", f"not a directory: {path}")
            elif not os.access(path, os.W_OK | os.X_OK):
                r.bad("state_dir", f"not writable: {path}")
            else:
                self.gateway["state_dir"] = path
        max_bk = r.get_number("max_budget_keys", ("int", 1, True))
        if max_bk is not None:
            if max_bk > 1 << 28:
                r.bad("max_budget_keys", f"must be at most {1 << 28}, got {max_bk}")
            else:
                self.gateway["max_budget_keys"] = max_bk

    # -- security: identity, issuers, API keys, policies --

    def _identity(self, file: str, t: dict[str, Any]) -> None:
        r = _Reader(self, file, "identity", t, _IDENTITY_KEYS, "")
        kw: dict[str, Any] = {}
        realm = r.get_str("realm")
        if realm is not None:
            if re.fullmatch(r"[\x21\x23-\x5b\x5d-\x7e ]{1,64}", realm):
                kw["realm"] = realm
            else:
                r.bad("realm", "must be 1-64 visible ASCII characters without quotes or \\")
        prefix = r.get_str("header_prefix")
        if prefix is not None:
            if _TOKEN_RE.match(prefix) and len(prefix) >= 3:
                kw["header_prefix"] = prefix
            else:
                r.bad("header_prefix", "must be a header name prefix such as X-Fastgw-")
        auth = r.get_choice("authorization", ("pass", "remove", "move"))
        if auth is not None:
            kw["authorization"] = auth
        claims = _str_list(
            r,
            "claim_headers",
            lambda c: None if _TOKEN_RE.match(c) else f"{_q(c)} is not usable in a header name",
        )
        if claims:
            kw["claim_headers"] = tuple(claims)
        size = r.get_number("token_cache_size", ("int", 0, True))
        if size is not None:
            kw["token_cache_size"] = size
        self.identity.update(kw)

    def _issuer(self, file: str, base_dir: str, name: str, t: dict[str, Any]) -> None:
        from fastgw.identity import IdentityConfigError, Issuer, KeyFile

        path = f"issuers.{_key(name)}"
        r = _Reader(self, file, path, t, _ISSUER_KEYS, base_dir)
        if not _NAME_RE.match(name):
            self.problem(file, path, _bad_name(name))
            return
        kw: dict[str, Any] = {"name": name}
        for key in ("issuer", "discovery_url", "jwks_url", "hmac_kid"):
            v = r.get_str(key)
            if v is not None:
                kw[key] = v
        for key in ("audiences", "algorithms", "required_claims"):
            if key in t:
                kw[key] = tuple(_str_list(r, key, lambda _v: None))
        for key in (
            "leeway_s",
            "fetch_timeout_s",
            "min_refresh_s",
            "max_refresh_s",
            "refetch_interval_s",
        ):
            v = r.get_number(key, ("float", 0, key == "leeway_s"))
            if v is not None:
                kw[key] = v
        v = r.get_number("max_token_bytes", ("int", 0, False))
        if v is not None:
            kw["max_token_bytes"] = v
        ca = r.get_file("ca_file")
        if ca is not None:
            kw["ca_file"] = ca
        files = r._get("key_files", False)
        if files is not None:
            kf = []
            items = files if isinstance(files, list) else [files]
            for i, item in enumerate(items):
                p, kid = (
                    (item, None)
                    if isinstance(item, str)
                    else (
                        (item.get("path"), item.get("kid"))
                        if isinstance(item, dict)
                        else (None, None)
                    )
                )
                if not isinstance(p, str) or (kid is not None and not isinstance(kid, str)):
                    r.bad_path(
                        f"key_files[{i}]", 'expected a file name or { path = "...", kid = "..." }'
                    )
                    continue
                full = os.path.join(base_dir, p)
                if not os.path.isfile(full):
                    r.bad_path(f"key_files[{i}]", f"file not found: {full}")
                    continue
                kf.append(KeyFile(os.path.abspath(full), kid))
            kw["key_files"] = tuple(kf)
        secret_file = r.get_file("hmac_secret_file")
        secret_env = r.get_str("hmac_secret_env")
        if secret_file is not None:
            with open(secret_file, "rb") as f:
                kw["hmac_secret"] = f.read().strip()
        elif secret_env is not None:
            value = os.environ.get(secret_env)
            if value is None:
                r.bad("hmac_secret_env", f"environment variable {secret_env} is not set")
            else:
                kw["hmac_secret"] = value.encode()
        if not r.ok:
            return
        try:
            issuer = Issuer(**kw)
        except IdentityConfigError as e:
            for field_name, message in e.problems:
                self.problem(file, f"{path}.{field_name}" if field_name else path, message)
            return
        except TypeError as e:  # a missing required field
            self.problem(file, path, str(e))
            return
        if not issuer.fetches_keys and issuer.key_files:
            from fastgw.identity import load_static_keys

            try:
                load_static_keys(issuer)
            except IdentityConfigError as e:
                for field_name, message in e.problems:
                    self.problem(file, f"{path}.{field_name}" if field_name else path, message)
                return
        self.issuers.append((file, path, issuer))

    def _api_keys(self, file: str, t: dict[str, Any]) -> None:
        from fastgw.identity import ApiKey, IdentityConfigError

        r = _Reader(self, file, "api_keys", t, ("header", "keys"), "")
        header = r.get_str("header")
        if header is not None:
            if _TOKEN_RE.match(header):
                self.api_key_header = header
            else:
                r.bad("header", f"{_q(header)} is not a header field name")
        for i, item in enumerate(_array_of_tables(self, file, "api_keys.keys", t.get("keys", []))):
            if item is None:
                continue
            kr = _Reader(
                self, file, f"api_keys.keys[{i}]", item, ("name", "sha256", "attributes"), ""
            )
            name = kr.get_name()
            digest = kr.get_str("sha256", required=True)
            attrs = kr._get("attributes", False) or {}
            if not isinstance(attrs, dict) or not all(isinstance(v, str) for v in attrs.values()):
                kr.bad("attributes", "expected a table of name = string")
                continue
            if name is None or digest is None or not kr.ok:
                continue
            try:
                self.api_keys.append(ApiKey(name, digest, dict(attrs)))
            except (IdentityConfigError, ValueError) as e:
                problems = getattr(e, "problems", [("sha256", str(e))])
                for field_name, message in problems:
                    kr.bad(field_name or "sha256", message)

    def _rate_limit(self, file: str, path: str, t: dict[str, Any], base_dir: str = "") -> None:
        r = _Reader(self, file, path, t, _LIMIT_KEYS, base_dir)
        name = r.get_name()
        rate = r.get_number("rate_per_s", ("float", 0, False))
        burst = r.get_number("burst", ("float", 0, False))
        tier = r.get_str("tier")
        tiered = "tier" in t or "tiers" in t or "tier_map" in t
        if tiered:
            for k in ("rate_per_s", "burst"):
                if k in t:
                    r.bad(k, "not with tiers: set it per tier ([rate_limits.tiers.<name>])")
        else:
            if "rate_per_s" not in t:
                r.bad("rate_per_s", "missing (required)")
            if "burst" not in t:
                r.bad("burst", "missing (required)")
        tier_fields: dict[str, Any] = {}
        if tiered:
            tier_fields = self._tiers(r, tier)
        key = r.get_str("key") or "identity"
        if not _LIMIT_KEY_RE.match(key):
            r.bad(
                "key", f"must be identity, ip, route, header:<name> or claim:<name>, got {_q(key)}"
            )
        routes = _str_list(r, "routes", lambda _v: None)
        mode = r.get_choice("mode", ("enforce", "shadow")) or "enforce"
        if tier_fields and r.ok and name is not None:
            default = next((x for x in tier_fields["tiers"] if x.name == "default"), None)
            rate = default.rate_per_s if default is not None else 0.0
            burst = default.burst if default is not None else 0.0
        if r.ok and name is not None and rate is not None and burst is not None:
            self.rate_limits.append(
                (
                    file,
                    path,
                    RateLimitConfig(
                        name, float(rate), float(burst), key, tuple(routes), mode, **tier_fields
                    ),
                )
            )

    def _tiers(self, r: _Reader, tier: str | None) -> dict[str, Any]:
        """``tier``, ``tier_map`` and ``[rate_limits.tiers.<name>]`` of one limit."""
        if tier is None and "tier" not in r.t:
            r.bad(
                "tier",
                'missing (required with tiers): the claim naming the tier, e.g. "claim:plan"',
            )
        elif tier is not None and not _TIER_RE.match(tier):
            r.bad("tier", f"must be claim:<name> (a claim or API key attribute), got {_q(tier)}")
        tiers: list[LimitTier] = []
        raw = r._get("tiers", False)
        if raw is None:
            r.bad("tiers", "missing (required with tier): at least one [rate_limits.tiers.<name>]")
        elif not isinstance(raw, dict) or not raw:
            r.bad("tiers", "expected a table of tiers: [rate_limits.tiers.<name>]")
        else:
            for tname, item in raw.items():
                tpath = f"{r.path}.tiers.{_key(tname)}"
                if not _NAME_RE.match(tname):
                    r.bad_path(f"tiers.{_key(tname)}", _bad_name(tname))
                    continue
                table = _table(self, r.file, tpath, item)
                if table is None:
                    r.ok = False
                    continue
                tr = _Reader(self, r.file, tpath, table, ("rate_per_s", "burst"), "")
                t_rate = tr.get_number("rate_per_s", ("float", 0, False))
                t_burst = tr.get_number("burst", ("float", 0, False))
                for k in ("rate_per_s", "burst"):
                    if k not in table:
                        tr.bad(k, "missing (required)")
                if not tr.ok or t_rate is None or t_burst is None:
                    r.ok = False
                    continue
                tiers.append(LimitTier(tname, float(t_rate), float(t_burst)))
        map_file = r.get_file("tier_map")
        map_obj = None
        if map_file is not None:
            map_obj = self._load_map(r, map_file, "str")
            if map_obj is not None and raw is not None and r.ok:
                names = {x.name for x in tiers}
                for i in range(len(map_obj)):
                    value = map_obj.entry(i)[1].decode("utf-8", "replace")
                    if value not in names:
                        src, line = map_obj.location(i)
                        self.problem(
                            src,
                            line,
                            f"value {_q(value)} is not a tier of {r.path} (map used by "
                            f"{r.file}: {r.at('tier_map')}); "
                            + _unknown_name("tier", value, sorted(names)),
                        )
                        r.ok = False
        return {
            "tier": tier,
            "tier_map": map_file,
            "tiers": tuple(tiers),
            "tier_map_obj": map_obj,
        }

    def _limits_store(self, file: str, base_dir: str, t: dict[str, Any]) -> None:
        r = _Reader(self, file, "limits_store", t, _STORE_KEYS, base_dir)
        kind = r.get_choice("type", ("local", "redis")) or "local"
        address = r.get_str("address")
        kw: dict[str, Any] = {"type": kind}
        if kind == "redis":
            if address is None and "address" not in t:
                r.bad("address", 'missing (required with type = "redis"): host:port or unix:/path')
        elif address is not None or "address" in t:
            r.bad("address", 'only with type = "redis"')
        if address is not None and kind == "redis":
            if address.startswith("unix:"):
                if len(address) <= 5:
                    r.bad("address", "unix: needs a socket path, e.g. unix:/run/redis.sock")
                else:
                    kw["address"] = "unix:" + os.path.join(base_dir, address[5:])
            else:
                try:
                    parse_address(address)
                except ValueError as e:
                    r.bad("address", f"{e}; use host:port or unix:/path")
                else:
                    kw["address"] = address
        db = r.get_number("database", ("int", 0, True))
        if db is not None:
            kw["database"] = db
        prefix = r.get_str("prefix")
        if prefix is not None:
            if prefix and all(0x21 <= ord(c) < 0x7F for c in prefix):
                kw["prefix"] = prefix
            else:
                r.bad("prefix", 'must be visible ASCII without spaces, e.g. "fastgw:"')
        timeout = r.get_number("timeout_s", ("float", 0, False))
        if timeout is not None:
            kw["timeout_s"] = timeout
        on_failure = r.get_choice("on_failure", ("local", "open", "closed"))
        if on_failure is not None:
            kw["on_failure"] = on_failure
        username = r.get_str("username")
        pw_file = r.get_file("password_file")
        pw_env = r.get_str("password_env")
        if pw_file is not None and pw_env is not None:
            r.bad("password_env", "set password_file or password_env, not both")
        elif pw_file is not None:
            with open(pw_file, "rb") as f:
                kw["password"] = f.read().strip().decode("utf-8", "replace")
            if not kw["password"]:
                r.bad("password_file", f"{pw_file} is empty")
        elif pw_env is not None:
            value = os.environ.get(pw_env)
            if not value:
                r.bad("password_env", f"environment variable {pw_env} is not set")
            else:
                kw["password"] = value
        if username is not None:
            if "password" not in kw:
                r.bad("username", "a Redis username needs password_file or password_env")
            kw["username"] = username
        if kind == "local":
            for k in _STORE_KEYS[1:]:
                if k in t and k != "address":
                    r.bad(k, 'only with type = "redis"')
        if r.ok:
            self.gateway["limits_store"] = LimitsStoreConfig(**kw)

    def _budget(self, file: str, path: str, t: dict[str, Any]) -> None:
        r = _Reader(self, file, path, t, _BUDGET_KEYS, "")
        name = r.get_name()
        requests = r.get_number("requests", ("int", 1, True))
        if "requests" not in t:
            r.bad("requests", "missing (required): the units a key may spend per window")
        elif requests is not None and requests >= 1 << 62:
            r.bad("requests", f"must be under {1 << 62}, got {requests}")
        window = r.get_choice("window", ("hour", "day", "month")) or "day"
        tz = r.get_str("time_zone") or "UTC"
        if "time_zone" in t and isinstance(t["time_zone"], str):
            import zoneinfo

            try:
                zoneinfo.ZoneInfo(tz)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                r.bad(
                    "time_zone",
                    f'unknown time zone {_q(tz)}; use an IANA name such as "Europe/Berlin" '
                    'or "UTC"',
                )
        key = r.get_str("key") or "identity"
        if not _LIMIT_KEY_RE.match(key):
            r.bad(
                "key", f"must be identity, ip, route, header:<name> or claim:<name>, got {_q(key)}"
            )
        routes = _str_list(r, "routes", lambda _v: None)
        mode = r.get_choice("mode", ("enforce", "shadow")) or "enforce"
        cost_header = r.get_str("cost_header")
        if cost_header is not None and not _TOKEN_RE.match(cost_header):
            r.bad("cost_header", f"must be a header field name, got {_q(cost_header)}")
        max_cost = r.get_number("max_cost", ("int", 1, True))
        if max_cost is not None and cost_header is None:
            r.bad("max_cost", "only with cost_header (without it every request costs 1)")
        store = r.get_choice("store", ("local", "redis")) or "local"
        if r.ok and name is not None and requests is not None:
            self.budgets.append(
                (
                    file,
                    path,
                    BudgetConfig(
                        name,
                        requests,
                        window,
                        tz,
                        key,
                        tuple(routes),
                        mode,
                        cost_header,
                        max_cost if max_cost is not None else 1000,
                        store,
                    ),
                )
            )

    def _policy(self, file: str, path: str, t: dict[str, Any]) -> None:
        r = _Reader(self, file, path, t, _POLICY_KEYS, "")
        name = r.get_name()
        routes = _str_list(r, "routes", lambda _v: None)
        if "routes" not in t:
            r.bad("routes", "missing (required): the routes this policy guards")
        mode = r.get_choice("mode", ("enforce", "shadow")) or "enforce"
        envs = _str_list(r, "environments", lambda v: None if _NAME_RE.match(v) else _bad_name(v))
        anon = r.get_bool("allow_anonymous")
        rules = []
        for i, item in enumerate(_array_of_tables(self, file, f"{path}.rules", t.get("rules", []))):
            if item is not None:
                rule = self._rule(file, f"{path}.rules[{i}]", item)
                if rule is not None:
                    rules.append(rule)
        if not t.get("rules"):
            r.bad("rules", "missing (required): at least one [[policies.rules]]")
        if r.ok and name is not None:
            self.policies.append(
                (
                    file,
                    path,
                    PolicyConfig(name, tuple(routes), tuple(rules), mode, tuple(envs), bool(anon)),
                )
            )

    def _rule(self, file: str, path: str, t: dict[str, Any]) -> PolicyRule | None:
        r = _Reader(self, file, path, t, _RULE_KEYS, "")
        effect = r.get_choice("effect", ("allow", "deny"))
        if effect is None and "effect" not in t:
            r.bad("effect", 'missing (required): "allow" or "deny"')
        kinds = _str_list(
            r,
            "kinds",
            lambda v: (
                None
                if v in ("jwt", "apikey", "mtls", "anonymous")
                else f"{_q(v)} is not one of jwt, apikey, mtls, anonymous"
            ),
        )
        issuers = _str_list(r, "issuers", lambda _v: None)
        subjects = _str_list(r, "subjects", lambda _v: None)
        sans = _str_list(r, "cert_sans", lambda _v: None)
        claims: list[ClaimCondition] = []
        raw = r._get("claims", False) or {}
        if not isinstance(raw, dict):
            r.bad("claims", "expected a table of claim = { op = value }")
            raw = {}
        for claim, cond in raw.items():
            where = f"claims.{_key(claim)}"
            if cond is True:
                claims.append(ClaimCondition(claim, "present"))
                continue
            if not isinstance(cond, dict) or len(cond) != 1:
                r.bad_path(
                    where, f"expected {{ op = value }} with op one of {', '.join(_CLAIM_OPS)}"
                )
                continue
            ((op, value),) = cond.items()
            if op not in _CLAIM_OPS:
                r.bad_path(where, _unknown_key(op, _CLAIM_OPS))
            elif op in ("one_of", "all_of") and not isinstance(value, list):
                r.bad_path(f"{where}.{op}", "expected an array")
            else:
                claims.append(
                    ClaimCondition(claim, op, tuple(value) if isinstance(value, list) else value)
                )
        attrs = r._get("key_attributes", False) or {}
        if not isinstance(attrs, dict) or not all(isinstance(v, str) for v in attrs.values()):
            r.bad("key_attributes", "expected a table of name = string")
            attrs = {}
        if not r.ok or effect is None:
            return None
        return PolicyRule(
            effect, tuple(kinds), tuple(issuers), tuple(subjects), tuple(claims),
            tuple(attrs.items()), tuple(sans),
        )  # fmt: skip

    def _admin(self, file: str, t: dict[str, Any]) -> None:
        r = _Reader(self, file, "admin", t, _ADMIN_KEYS, "")
        address = r.get_str("address")
        if address is None:
            self.gateway["admin"] = AdminConfig()
            return
        try:
            host, port = parse_address(address)
        except ValueError as e:
            r.bad("address", str(e))
            return
        self.gateway["admin"] = AdminConfig(host=host, port=port)

    def _audit(self, file: str, base_dir: str, t: dict[str, Any]) -> None:
        r = _Reader(self, file, "audit", t, _AUDIT_KEYS, base_dir)
        enabled = r.get_bool("enabled")
        path = r.get_str("path")
        if path is not None and path != "-":
            full = os.path.join(base_dir, path)
            parent = os.path.dirname(os.path.abspath(full))
            if not os.path.isdir(parent):
                r.bad("path", f"directory {_q(parent)} does not exist")
            path = os.path.abspath(full)
        sample = r.get_number("sample_success", _SAMPLE_RULE)
        if sample is not None and sample > 1:
            r.bad("sample_success", f"must be a share between 0 and 1, got {sample:g}")
            sample = None
        self.gateway["audit"] = AuditConfig(
            enabled=True if enabled is None else enabled,
            path=None if path in (None, "-") else path,
            sample_success=1.0 if sample is None else float(sample),
        )

    def _limits(self, file: str, t: dict[str, Any]) -> None:
        r = _Reader(self, file, "limits", t, tuple(_LIMIT_RULES), "")
        values = {
            k: v for k, rule in _LIMIT_RULES.items() if (v := r.get_number(k, rule)) is not None
        }
        self.limits = Limits(**values)

    def _listener(self, file: str, base_dir: str, path: str, t: dict[str, Any]) -> None:
        r = _Reader(self, file, path, t, _LISTENER_KEYS, base_dir)
        name = r.get_name()
        address = r.get_str("address", required=True)
        host_port: tuple[str, int] | None = None
        if address is not None:
            try:
                host_port = parse_address(address)
            except ValueError as e:
                r.bad("address", str(e))
        cert = r.get_file("tls_cert_file")
        key = r.get_file("tls_key_file")
        ca = r.get_file("client_ca_file")
        mode = r.get_choice("client_cert", _CLIENT_CERT_MODES)
        if "tls_key_file" in t and "tls_cert_file" not in t:
            r.bad("tls_key_file", "tls_key_file without tls_cert_file; set both for TLS")
        if "client_ca_file" in t and "tls_cert_file" not in t:
            r.bad("client_ca_file", "client certificates need TLS: set tls_cert_file too")
        if mode in ("optional", "required") and "client_ca_file" not in t:
            r.bad("client_cert", f"client_cert = {_q(mode)} needs client_ca_file")
        if (
            "client_ca_file" in t
            and "tls_cert_file" in t
            and t.get("client_cert", "none") == "none"
        ):
            r.bad(
                "client_ca_file",
                'client_ca_file is set but client_cert is "none"; '
                'set client_cert = "required" or "optional"',
            )
        if cert is not None and r.ok_key("tls_key_file"):
            r.check_cert_chain("tls_cert_file", cert, "tls_key_file", key, ssl.PROTOCOL_TLS_SERVER)
        if ca is not None:
            r.check_ca("client_ca_file", ca)
        obj = None
        if r.ok and name is not None and host_port is not None:
            obj = ListenerConfig(
                name=name,
                host=host_port[0],
                port=host_port[1],
                tls_cert_file=cert,
                tls_key_file=key,
                client_ca_file=ca,
                client_cert=mode or "none",
            )
        self.listeners.append(_Named(name, file, path, obj))

    def _backend(self, file: str, base_dir: str, path: str, name: str, t: dict[str, Any]) -> None:
        r = _Reader(self, file, path, t, _BACKEND_KEYS, base_dir)
        if not _NAME_RE.match(name):
            self.problem(file, path, _bad_name(name))
            r.ok = False
        endpoints: list[Endpoint] = []
        raw = t.get("endpoints")
        if "endpoints" not in t:
            r.bad("endpoints", "missing (required): a backend needs at least one endpoint URL")
        elif not isinstance(raw, list):
            r.bad("endpoints", f"expected array of URLs, got {_describe(raw)}")
        elif not raw:
            r.bad("endpoints", "must list at least one endpoint URL")
        else:
            for i, url in enumerate(raw):
                where = f"endpoints[{i}]"
                if isinstance(url, dict):
                    ep = self._endpoint_table(r, where, url)
                    if ep is not None:
                        endpoints.append(ep)
                    continue
                if not isinstance(url, str):
                    got = _describe(url)
                    r.bad(where, f"expected string (a URL) or table {{url = ...}}, got {got}")
                    continue
                try:
                    endpoints.append(parse_endpoint(url))
                except ValueError as e:
                    r.bad(where, str(e))
        ca = r.get_file("ca_file")
        cert = r.get_file("client_cert_file")
        key = r.get_file("client_key_file")
        server_name = r.get_str("server_name")
        if server_name is not None:
            try:
                _check_host(server_name)
            except ValueError as e:
                r.bad("server_name", str(e))
        numbers = {
            k: v for k, rule in _BACKEND_RULES.items() if (v := r.get_number(k, rule)) is not None
        }
        if "client_key_file" in t and "client_cert_file" not in t:
            r.bad("client_key_file", "client_key_file without client_cert_file; set both")
        if cert is not None and r.ok_key("client_key_file"):
            r.check_cert_chain(
                "client_cert_file", cert, "client_key_file", key, ssl.PROTOCOL_TLS_CLIENT
            )
        if ca is not None:
            r.check_ca("ca_file", ca)
        if (
            endpoints
            and len(endpoints) == len(raw or ())
            and all(e.scheme == "http" for e in endpoints)
        ):
            for k in ("ca_file", "client_cert_file", "client_key_file", "server_name"):
                if k in t:
                    r.bad(k, f"{k} has no effect: no endpoint of this backend uses https")
        obj = None
        if r.ok:
            total = numbers.get("total_timeout_s", _default(BackendConfig, "total_timeout_s"))
            first = numbers.get(
                "first_byte_timeout_s", _default(BackendConfig, "first_byte_timeout_s")
            )
            if first > total:
                which = "first_byte_timeout_s" if "first_byte_timeout_s" in t else "total_timeout_s"
                r.bad(
                    which,
                    f"first_byte_timeout_s ({first:g} s) is longer than "
                    f"total_timeout_s ({total:g} s)",
                )
        balance = r.get_choice("balance", ("least_outstanding", "round_robin", "weighted", "hash"))
        balancing = self._backend_balancing(r, t, balance)
        warm_path = r.get_str("keep_warm_path")
        if warm_path is not None:
            if not warm_path.startswith("/") or _TARGET_BAD_RE.search(warm_path):
                r.bad("keep_warm_path", f"must be a path starting with /, got {_q(warm_path)}")
            else:
                numbers["keep_warm_path"] = warm_path
        credential = self._credential(r, t, endpoints)
        if r.ok:
            obj = BackendConfig(
                name=name,
                endpoints=tuple(endpoints),
                credential=credential,
                balance=balance or "least_outstanding",
                **balancing,
                ca_file=ca,
                client_cert_file=cert,
                client_key_file=key,
                server_name=server_name,
                **numbers,
            )
        self.backends.append(_Named(name, file, path, obj))

    def _credential(
        self, r: _Reader, t: dict[str, Any], endpoints: list[Endpoint]
    ) -> CredentialConfig | None:
        """``[backends.NAME.credential]``: the upstream credential, or None (absent, or
        its problems reported). Files must be readable now; environment variables set."""
        raw = t.get("credential")
        if raw is None:
            return None
        where = r.at("credential")
        if not isinstance(raw, dict):
            r.bad("credential", f"expected a table, got {_describe(raw)}")
            return None
        kind = raw.get("type")
        if kind not in _CREDENTIAL_KEYS:
            r.bad_path(
                "credential.type",
                "missing (required): one of " + ", ".join(map(_q, _CREDENTIAL_KEYS))
                if kind is None
                else f"must be one of {', '.join(map(_q, _CREDENTIAL_KEYS))}, got {_q(kind)}",
            )
            return None
        cr = _Reader(self, r.file, where, raw, ("type", *_CREDENTIAL_KEYS[kind]), r.base_dir)
        kw: dict[str, Any] = {"type": kind}
        if kind == "google_id_token":
            source = cr.get_choice("source", ("metadata", "service_account_file"))
            kw["source"] = source or "metadata"
            if kw["source"] == "service_account_file":
                if "key_file" not in raw:
                    cr.bad("key_file", 'missing (required with source = "service_account_file")')
                kw["key_file"] = cr.get_file("key_file")
                for k in ("metadata_url", "service_account"):
                    if k in raw:
                        cr.bad(k, f'{k} applies only to source = "metadata"')
            else:
                for k in ("key_file", "token_url"):
                    if k in raw:
                        cr.bad(k, f'{k} applies only to source = "service_account_file"')
                sa = cr.get_str("service_account")
                if sa is not None:
                    if re.fullmatch(r"[A-Za-z0-9@._-]{1,256}", sa):
                        kw["service_account"] = sa
                    else:
                        cr.bad("service_account", "must be 'default' or an account email")
            for k in ("metadata_url", "token_url"):
                url = cr.get_str(k)
                if url is not None:
                    problem = _credential_url_problem(url)
                    if problem:
                        cr.bad(k, problem)
                    else:
                        kw[k] = url
            audience = cr.get_str("audience")
            if audience is not None:
                if _CREDENTIAL_VALUE_RE.fullmatch(audience):
                    kw["audience"] = audience
                else:
                    cr.bad("audience", "must be 1-2048 visible ASCII characters (a URL)")
            header = cr.get_choice("header", ("authorization", "x-serverless-authorization"))
            if header is not None:
                kw["header"] = header
        elif kind == "aws_sigv4":
            source = cr.get_choice(
                "source", ("default", "env", "shared_file", "container", "instance")
            )
            kw["source"] = source or "default"
            region = cr.get_str("region")
            if region is not None:
                if re.fullmatch(r"[a-z0-9-]{1,64}", region):
                    kw["region"] = region
                else:
                    cr.bad("region", f"must be an AWS region such as us-east-1, got {_q(region)}")
            elif "region" not in raw:
                from fastgw.upstream.sigv4 import region_from_host

                for ep in endpoints:
                    if region_from_host(ep.host) is None:
                        cr.bad(
                            "region",
                            f"missing: endpoint {ep.url} is not a Lambda function URL "
                            "(<id>.lambda-url.<region>.on.aws), so the region cannot be "
                            "taken from it; set region",
                        )
                        break
            service = cr.get_str("service")
            if service is not None:
                if re.fullmatch(r"[a-z0-9-]{1,64}", service):
                    kw["service"] = service
                else:
                    cr.bad("service", f"must be an AWS service name (lambda), got {_q(service)}")
            profile = cr.get_str("profile")
            if profile is not None:
                kw["profile"] = profile
            if "credentials_file" in raw:
                kw["credentials_file"] = cr.get_file("credentials_file")
            for k, applies in (
                ("profile", ("default", "shared_file")),
                ("credentials_file", ("default", "shared_file")),
                ("endpoint_url", ("container", "instance")),
            ):
                if k in raw and kw["source"] not in applies:
                    cr.bad(k, f"{k} applies only to source = " + " or ".join(map(_q, applies)))
            url = cr.get_str("endpoint_url")
            if url is not None:
                problem = _credential_url_problem(url)
                if problem:
                    cr.bad("endpoint_url", problem)
                else:
                    kw["endpoint_url"] = url
            if kw["source"] == "env":
                for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    if not os.environ.get(var):
                        cr.bad("source", f'source = "env" but {var} is not set')
                        break
            if kw["source"] == "container" and url is None:
                from fastgw.upstream.aws import container_url_from_env

                if not container_url_from_env():
                    cr.bad(
                        "source",
                        'source = "container" but neither AWS_CONTAINER_CREDENTIALS_FULL_URI '
                        "nor AWS_CONTAINER_CREDENTIALS_RELATIVE_URI is set; set endpoint_url",
                    )
        elif kind == "azure_function_key":
            if ("key_file" in raw) == ("key_env" in raw):
                cr.bad("key_file", "set exactly one of key_file and key_env")
            elif "key_file" in raw:
                kw["key_file"] = cr.get_file("key_file")
            else:
                env = cr.get_str("key_env")
                if env is not None:
                    if not os.environ.get(env, "").strip():
                        cr.bad("key_env", f"environment variable {env} is not set or empty")
                    else:
                        kw["key_env"] = env
        else:  # bearer_file
            if "path" not in raw:
                cr.bad("path", "missing (required): the file holding the token")
            kw["path"] = cr.get_file("path")
        if not cr.ok:
            r.ok = False
            return None
        return CredentialConfig(**kw)

    def _endpoint_table(self, r: _Reader, where: str, t: dict[str, Any]) -> Endpoint | None:
        """``{url, region, priority, weight, max_in_flight}`` -> Endpoint, or None (the
        problems reported under ``where``)."""
        er = _Reader(self, r.file, r.at(where), t, _ENDPOINT_KEYS, r.base_dir)
        url = er.get_str("url", required=True)
        region = er.get_str("region")
        priority = er.get_number("priority", ("int", 0, True))
        weight = er.get_number("weight", ("int", 1, True))
        cap = er.get_number("max_in_flight", ("int", 0, True))
        ep = None
        if url is not None:
            try:
                ep = parse_endpoint(url)
            except ValueError as e:
                er.bad("url", str(e))
        if not er.ok or ep is None:
            r.ok = False
            return None
        return dataclasses.replace(
            ep,
            region=region or "",
            priority=priority or 0,
            weight=1 if weight is None else weight,
            max_in_flight=cap or 0,
        )

    def _backend_balancing(
        self, r: _Reader, t: dict[str, Any], balance: str | None
    ) -> dict[str, Any]:
        """hash_on, caps and queue, Retry-After, [health_check] and [outlier] of a
        backend, as BackendConfig keyword arguments (only those given)."""
        out: dict[str, Any] = {
            k: v for k, rule in _CAP_RULES.items() if (v := r.get_number(k, rule)) is not None
        }
        hash_on = r.get_str("hash_on")
        if hash_on is not None:
            if balance != "hash":
                r.bad("hash_on", 'hash_on has no effect unless balance = "hash"')
            elif not _HASH_ON_RE.match(hash_on):
                r.bad("hash_on", f'must be "identity" or "header:<name>", got {_q(hash_on)}')
            else:
                out["hash_on"] = hash_on
        if "queue_timeout_s" in t and not t.get("max_queued"):
            r.bad("queue_timeout_s", "queue_timeout_s has no effect without max_queued")
        # An HTTP/1.1 request in flight holds a connection: a cap over the pool's size
        # would never be reached (the pool's own wait answers first).
        pool_max = t.get("pool_max_size", _default(BackendConfig, "pool_max_size"))
        raw = t.get("endpoints")
        if isinstance(raw, list) and isinstance(pool_max, int):
            for i, e in enumerate(raw):
                cap = e.get("max_in_flight") if isinstance(e, dict) else None
                if isinstance(cap, int) and not isinstance(cap, bool) and cap > pool_max:
                    r.bad_path(
                        f"endpoints[{i}].max_in_flight",
                        f"max_in_flight ({cap}) is over pool_max_size ({pool_max}), the "
                        "connections this endpoint may have; raise pool_max_size",
                    )
        hc = self._health_check(r, t)
        if hc is not None:
            out["health_check"] = hc
        if "outlier" in t:
            ot = _table(self, r.file, r.at("outlier"), t["outlier"])
            if ot is None:
                r.ok = False
                return out
            orr = _Reader(self, r.file, r.at("outlier"), ot, tuple(_OUTLIER_RULES), r.base_dir)
            kw = {
                k: v
                for k, rule in _OUTLIER_RULES.items()
                if (v := orr.get_number(k, rule)) is not None
            }
            pct = kw.get("max_ejection_percent")
            if pct is not None and pct > 100:
                orr.bad("max_ejection_percent", f"must be 0-100, got {pct}")
            base = kw.get("base_ejection_time_s", _default(OutlierConfig, "base_ejection_time_s"))
            top = kw.get("max_ejection_time_s", _default(OutlierConfig, "max_ejection_time_s"))
            if base > top:
                orr.bad(
                    "base_ejection_time_s",
                    f"base_ejection_time_s ({base:g} s) is longer than "
                    f"max_ejection_time_s ({top:g} s)",
                )
            if orr.ok:
                out["outlier"] = OutlierConfig(**kw)
            else:
                r.ok = False
        return out

    def _health_check(self, r: _Reader, t: dict[str, Any]) -> HealthCheckConfig | None:
        if "health_check" not in t:
            return None
        hc = _table(self, r.file, r.at("health_check"), t["health_check"])
        if hc is None:
            r.ok = False
            return None
        hr = _Reader(self, r.file, r.at("health_check"), hc, _HEALTH_KEYS, r.base_dir)
        kw: dict[str, Any] = {
            k: v for k, rule in _HEALTH_RULES.items() if (v := hr.get_number(k, rule)) is not None
        }
        path = hr.get_str("path")
        if path is not None:
            if not path.startswith("/") or any(c.isspace() or ord(c) < 0x20 for c in path):
                hr.bad("path", f"must start with / and have no spaces, got {_q(path)}")
            else:
                kw["path"] = path
        statuses = hc.get("expected_statuses")
        if statuses is not None:
            if not isinstance(statuses, list):
                got = _describe(statuses)
                hr.bad("expected_statuses", f"expected array of status codes, got {got}")
            else:
                for i, x in enumerate(statuses):
                    if isinstance(x, bool) or not isinstance(x, int) or not 100 <= x <= 599:
                        shown = str(x) if isinstance(x, int) else _describe(x)
                        hr.bad(f"expected_statuses[{i}]", f"not a status code 100-599: {shown}")
                if hr.ok:
                    kw["expected_statuses"] = tuple(statuses)
        interval = kw.get("interval_s", _default(HealthCheckConfig, "interval_s"))
        timeout = kw.get("timeout_s", _default(HealthCheckConfig, "timeout_s"))
        if timeout > interval:
            hr.bad(
                "timeout_s", f"timeout_s ({timeout:g} s) is longer than interval_s ({interval:g} s)"
            )
        if not hr.ok:
            r.ok = False
            return None
        return HealthCheckConfig(**kw)

    def _route(self, file: str, base_dir: str, path: str, t: dict[str, Any]) -> None:
        r = _Reader(self, file, path, t, _ROUTE_KEYS, base_dir)
        name = r.get_name()
        backend = r.get_str("backend")
        prefix = r.get_str("path_prefix")
        if prefix is not None:
            if not prefix.startswith("/"):
                r.bad("path_prefix", f"must start with /, got {_q(prefix)}")
            elif _PATH_PREFIX_BAD_RE.search(prefix):
                r.bad("path_prefix", "must not contain spaces, control characters, '?' or '#'")
        exact = r.get_str("path")
        if exact is not None and (not exact.startswith("/") or _PATH_PREFIX_BAD_RE.search(exact)):
            r.bad("path", f"must be a path starting with / (no query), got {_q(exact)}")
        path_re = r.get_str("path_regex")
        if path_re is not None:
            _check_regex(r, "path_regex", path_re)
        map_file = r.get_file("path_map")
        map_type = r.get_choice("path_map_type", _MAP_TYPES)
        given = [k for k in ("path_prefix", "path", "path_regex", "path_map") if k in t]
        if len(given) > 1:
            r.bad(given[1], f"a route has one path condition; {given[0]} is set already")
        if map_type is not None and "path_map" not in t:
            r.bad("path_map_type", "only with path_map")
        map_obj = None
        if map_file is not None:
            map_obj = self._load_map(r, map_file, map_type or "beg")
        if backend is None and map_file is None and "path_map" not in t:
            r.bad("backend", "missing (required unless path_map names the backend)")
        hosts = _str_list(r, "hosts", _check_host_pattern)
        methods = _str_list(r, "methods", _check_method)
        headers = self._route_header_conditions(r)
        strip = r.get_bool("strip_prefix")
        replace = r.get_str("replace_prefix")
        if replace is not None and not replace.startswith("/"):
            r.bad("replace_prefix", f"must start with /, got {_q(replace)}")
        rewrite = self._rewrite_regex(r)
        rewrites = [k for k in ("strip_prefix", "replace_prefix", "rewrite_regex") if t.get(k)]
        if len(rewrites) > 1:
            r.bad(rewrites[1], f"a route has one path rewrite; {rewrites[0]} is set already")
        if (strip or replace is not None) and "path_prefix" not in t:
            key = "strip_prefix" if strip else "replace_prefix"
            r.bad(key, "only with path_prefix (the part it replaces)")
        req_h = self._header_actions(r, "request_headers")
        resp_h = self._header_actions(r, "response_headers")
        fb = r.get_number("first_byte_timeout_s", ("float", 0, False))
        total = r.get_number("total_timeout_s", ("float", 0, False))
        max_body = r.get_number("max_body_bytes", ("int", 0, True))
        idempotent = r.get_bool("idempotent")
        replay = r.get_number("replay_buffer_bytes", ("int", 0, True))
        retry = self._route_retry(r)
        hedge = self._route_hedge(r)
        obj = None
        if r.ok and name is not None:
            obj = RouteConfig(
                name=name,
                backend=backend,
                path_prefix=prefix if prefix is not None else "/",
                strip_prefix=bool(strip),
                path=exact,
                path_regex=path_re,
                path_map=map_file,
                path_map_type=map_type or "beg",
                hosts=tuple(h.lower() for h in hosts),
                methods=tuple(methods),
                headers=headers,
                replace_prefix=replace,
                rewrite_regex=rewrite,
                request_headers=req_h,
                response_headers=resp_h,
                first_byte_timeout_s=fb,
                total_timeout_s=total,
                max_body_bytes=max_body,
                path_map_obj=map_obj,
                idempotent=bool(idempotent),
                retry=retry,
                hedge=hedge,
                replay_buffer_bytes=replay
                if replay is not None
                else _default(RouteConfig, "replay_buffer_bytes"),
            )
        self.routes.append(_Named(name, file, path, obj, backend))
        if map_obj is not None:
            # Every backend the map names must exist: checked in finish().
            self.map_backends.append((r.file, r.at("path_map"), map_obj))

    # -- [routes.retry] and [routes.hedge] (fastgw/upstream/retry.py) ---------------------

    def _sub_reader(self, r: _Reader, key: str, known: tuple[str, ...]) -> _Reader | None:
        raw = r._get(key, False)
        if raw is None:
            return None
        if not isinstance(raw, dict):
            r.bad(key, f"expected a table, got {_describe(raw)}")
            return None
        sub = _Reader(self, r.file, r.at(key), raw, known, r.base_dir)
        if not sub.ok:
            r.ok = False
        return sub

    def _route_retry(self, r: _Reader) -> RetryConfig | None:
        sub = self._sub_reader(r, "retry", _RETRY_KEYS)
        if sub is None:
            return None
        numbers = {
            k: v for k, rule in _RETRY_RULES.items() if (v := sub.get_number(k, rule)) is not None
        }
        on: tuple[str, ...] | None = None
        raw_on = sub._get("on", False)
        if raw_on is not None:
            if not isinstance(raw_on, list) or not all(isinstance(x, str) for x in raw_on):
                sub.bad("on", f"expected an array of strings, got {_describe(raw_on)}")
            else:
                for x in raw_on:
                    if x not in ("timeout", "reset", "429") and not (
                        len(x) == 3 and x.isdigit() and x.startswith("5")
                    ):
                        sub.bad(
                            "on",
                            f"{_q(x)} is not a retry condition: a 5xx status such as "
                            '"503", "429", "timeout" or "reset"',
                        )
                        break
                else:
                    on = tuple(raw_on)
        base = numbers.get("backoff_base_s", _default(RetryConfig, "backoff_base_s"))
        top = numbers.get("backoff_max_s", _default(RetryConfig, "backoff_max_s"))
        if base > top:
            which = "backoff_base_s" if "backoff_base_s" in sub.t else "backoff_max_s"
            sub.bad(which, f"backoff_base_s ({base:g} s) is over backoff_max_s ({top:g} s)")
        if numbers.get("budget_percent", 0) > 100:
            sub.bad("budget_percent", f"must be 100 or less, got {numbers['budget_percent']:g}")
        if not sub.ok:
            r.ok = False
            return None
        if on is not None:
            numbers["on"] = on
        return RetryConfig(**numbers)

    def _route_hedge(self, r: _Reader) -> HedgeConfig | None:
        sub = self._sub_reader(r, "hedge", _HEDGE_KEYS)
        if sub is None:
            return None
        numbers = {
            k: v for k, rule in _HEDGE_RULES.items() if (v := sub.get_number(k, rule)) is not None
        }
        learned = sub.get_choice("delay", ("learned",)) == "learned"
        if learned and "delay_s" in sub.t:
            sub.bad("delay_s", 'fixed (delay_s) or learned (delay = "learned"), not both')
        elif not learned and "delay_s" not in sub.t and sub.ok_key("delay"):
            sub.bad("delay_s", 'missing: set delay_s (seconds) or delay = "learned"')
        if not learned:
            for k in ("percentile", "min_delay_s", "max_delay_s"):
                if k in sub.t:
                    sub.bad(k, 'only with delay = "learned"')
        pct = numbers.get("percentile")
        if pct is not None and pct >= 100:
            sub.bad("percentile", f"must be under 100, got {pct:g}")
        lo = numbers.get("min_delay_s", _default(HedgeConfig, "min_delay_s"))
        hi = numbers.get("max_delay_s", _default(HedgeConfig, "max_delay_s"))
        if lo > hi:
            sub.bad("min_delay_s", f"min_delay_s ({lo:g} s) is over max_delay_s ({hi:g} s)")
        if numbers.get("budget_percent", 0) > 100:
            sub.bad("budget_percent", f"must be 100 or less, got {numbers['budget_percent']:g}")
        if not sub.ok:
            r.ok = False
            return None
        return HedgeConfig(learned=learned, **numbers)

    def _load_map(self, r: _Reader, path: str, kind: str) -> Any:
        from fastgw._core.acl import load_map_file

        try:
            return load_map_file(path, kind)
        except ConfigError as e:
            for f, k, msg in e.problems:
                self.problem(f, k, msg)
            r.ok = False
            return None

    def _route_header_conditions(self, r: _Reader) -> tuple[tuple[str, str | None], ...]:
        raw = r._get("headers", False)
        if raw is None:
            return ()
        if not isinstance(raw, dict):
            r.bad("headers", f"expected a table of name = value or true, got {_describe(raw)}")
            return ()
        out: list[tuple[str, str | None]] = []
        for k, v in raw.items():
            if not _TOKEN_RE.match(k):
                r.bad("headers", f"{_q(k)} is not a header field name")
            elif v is True:
                out.append((k.lower(), None))
            elif isinstance(v, str) and _FIELD_VALUE_RE.match(v):
                out.append((k.lower(), v))
            else:
                r.bad_path(
                    f"headers.{_key(k)}", "expected a header value (string) or true (present)"
                )
        return tuple(out)

    def _header_actions(self, r: _Reader, key: str) -> HeaderActions:
        raw = r._get(key, False)
        if raw is None:
            return HeaderActions()
        if not isinstance(raw, dict):
            r.bad(key, f"expected a table with set and/or remove, got {_describe(raw)}")
            return HeaderActions()
        sets: list[tuple[str, str]] = []
        removes: list[str] = []
        for k in raw:
            if k not in ("set", "remove"):
                r.bad_path(f"{key}.{_key(k)}", _unknown_key(k, ("set", "remove")))
        s = raw.get("set", {})
        if not isinstance(s, dict):
            r.bad_path(f"{key}.set", f"expected a table of name = value, got {_describe(s)}")
        else:
            for k, v in s.items():
                if not _TOKEN_RE.match(k):
                    r.bad_path(f"{key}.set", f"{_q(k)} is not a header field name")
                elif not isinstance(v, str) or not _FIELD_VALUE_RE.match(v):
                    r.bad_path(f"{key}.set.{_key(k)}", "expected a header value (visible ASCII)")
                elif k.lower() in _FRAMING_FIELDS:
                    r.bad_path(f"{key}.set.{_key(k)}", "fastgw writes this field itself")
                else:
                    sets.append((k, v))
        rm = raw.get("remove", [])
        if not isinstance(rm, list) or not all(isinstance(x, str) for x in rm):
            r.bad_path(f"{key}.remove", "expected an array of header field names")
        else:
            for x in rm:
                if not _TOKEN_RE.match(x):
                    r.bad_path(f"{key}.remove", f"{_q(x)} is not a header field name")
                else:
                    removes.append(x.lower())
        return HeaderActions(set=tuple(sets), remove=tuple(removes))

    def _rewrite_regex(self, r: _Reader) -> tuple[str, str] | None:
        raw = r._get("rewrite_regex", False)
        if raw is None:
            return None
        if not isinstance(raw, list) or len(raw) != 2 or not all(isinstance(x, str) for x in raw):
            r.bad("rewrite_regex", 'expected ["pattern", "replacement"]')
            return None
        pattern, repl = raw
        compiled = _check_regex(r, "rewrite_regex", pattern)
        if compiled is not None:
            try:
                compiled.sub(repl, "/")
            except (re.error, IndexError) as e:
                r.bad("rewrite_regex", f"bad replacement {_q(repl)}: {e}")
                return None
        return pattern, repl

    # -- across files --

    def finish(self, source: str) -> GatewayConfig:
        for kind, items in (
            ("listener", self.listeners),
            ("backend", self.backends),
            ("route", self.routes),
        ):
            first: dict[str, _Named] = {}
            for item in items:
                if item.name is None:
                    continue
                if item.name in first:
                    prev = first[item.name]
                    where = prev.path if prev.file == item.file else f"{prev.path} in {prev.file}"
                    path = item.path if kind == "backend" else f"{item.path}.name"
                    self.problem(
                        item.file, path, f"duplicate {kind} name {_q(item.name)} (first at {where})"
                    )
                else:
                    first[item.name] = item
        known_backends = {b.name for b in self.backends}
        addresses: dict[tuple[str, int], _Named] = {}
        for item in self.listeners:
            obj = item.obj
            if isinstance(obj, ListenerConfig) and obj.port != 0:
                addr = (obj.host, obj.port)
                if addr in addresses:
                    prev = addresses[addr]
                    self.problem(
                        item.file,
                        f"{item.path}.address",
                        f"same address as listener {_q(prev.name)}",
                    )
                else:
                    addresses[addr] = item
        # A route whose conditions equal an earlier route's can never match.
        seen: dict[tuple, _Named] = {}
        for item in self.routes:
            # A file that could not be read may define the backend: do not guess then.
            if item.backend is not None and item.backend not in known_backends and not self.unread:
                self.problem(
                    item.file,
                    f"{item.path}.backend",
                    _unknown_name("backend", item.backend, sorted(n for n in known_backends if n)),
                )
            if isinstance(item.obj, RouteConfig):
                o = item.obj
                key = (
                    o.path_prefix, o.path, o.path_regex, o.path_map, o.path_map_type,
                    frozenset(o.hosts), frozenset(o.methods), frozenset(o.headers),
                )  # fmt: skip
                if key in seen:
                    self.problem(
                        item.file,
                        item.path,
                        f"same conditions as route {_q(seen[key].name)}; "
                        "this route would never match",
                    )
                else:
                    seen[key] = item
        if not self.unread:
            for file, where, m in self.map_backends:
                for i in range(len(m)):
                    _, value = m.entry(i)
                    name = value.decode("utf-8", "replace")
                    if name not in known_backends:
                        src, line = m.location(i)
                        self.problem(
                            src,
                            line,
                            f"value {_q(name)} is not a backend (map used by {file}: {where}); "
                            + _unknown_name(
                                "backend", name, sorted(n for n in known_backends if n)
                            ),
                        )
        if (
            self.root is not None
            and not self.listeners
            and not self.unread
            and not self.saw_listeners
        ):
            self.problem(
                self.root, "listeners", "no listeners: add at least one [[listeners]] table"
            )
        route_names = {i.name for i in self.routes if i.name}
        issuer_names = {iss.name for _, _, iss in self.issuers}
        seen_iss: dict[str, str] = {}
        for file, path, iss in self.issuers:
            if iss.issuer in seen_iss:
                self.problem(file, f"{path}.issuer", f"same issuer as {seen_iss[iss.issuer]}")
            seen_iss[iss.issuer] = path
        seen_lim: set[str] = set()
        for file, path, lim in self.rate_limits:
            if lim.name in seen_lim:
                self.problem(file, f"{path}.name", f"duplicate rate limit name {_q(lim.name)}")
            seen_lim.add(lim.name)
            for i, rname in enumerate(lim.routes):
                if rname not in route_names and not self.unread:
                    self.problem(
                        file,
                        f"{path}.routes[{i}]",
                        _unknown_name("route", rname, sorted(n for n in route_names if n)),
                    )
        seen_bud: set[str] = set()
        store = self.gateway.get("limits_store")
        for file, path, bud in self.budgets:
            if bud.name in seen_bud:
                self.problem(file, f"{path}.name", f"duplicate budget name {_q(bud.name)}")
            seen_bud.add(bud.name)
            if bud.store == "redis" and (store is None or store.type != "redis"):
                self.problem(
                    file,
                    f"{path}.store",
                    'store = "redis" needs [limits_store] with type = "redis" and an address',
                )
            for i, rname in enumerate(bud.routes):
                if rname not in route_names and not self.unread:
                    self.problem(
                        file,
                        f"{path}.routes[{i}]",
                        _unknown_name("route", rname, sorted(n for n in route_names if n)),
                    )
        seen_pol: set[str] = set()
        for file, path, pol in self.policies:
            if pol.name in seen_pol:
                self.problem(file, f"{path}.name", f"duplicate policy name {_q(pol.name)}")
            seen_pol.add(pol.name)
            for i, rname in enumerate(pol.routes):
                if rname not in route_names and not self.unread:
                    self.problem(
                        file,
                        f"{path}.routes[{i}]",
                        _unknown_name("route", rname, sorted(n for n in route_names if n)),
                    )
            for j, rule in enumerate(pol.rules):
                for k, iname in enumerate(rule.issuers):
                    if iname not in issuer_names and not self.unread:
                        self.problem(
                            file,
                            f"{path}.rules[{j}].issuers[{k}]",
                            _unknown_name("issuer", iname, sorted(issuer_names)),
                        )
        api_keys = None
        if self.api_keys:
            from fastgw.identity import ApiKeys

            try:
                api_keys = ApiKeys(self.api_keys, header=self.api_key_header)
            except Exception as e:  # duplicate names or hashes
                self.problem(self.root or source, "api_keys", str(e))
        if self.problems:
            raise ConfigError(self.problems)
        self.gateway["identity"] = IdentityConfig(
            **self.identity,
            issuers=tuple(iss for _, _, iss in self.issuers),
            api_keys=api_keys,
        )
        self.gateway["policies"] = tuple(p for _, _, p in self.policies)
        self.gateway["rate_limits"] = tuple(x for _, _, x in self.rate_limits)
        self.gateway["budgets"] = tuple(x for _, _, x in self.budgets)
        return GatewayConfig(
            listeners=tuple(i.obj for i in self.listeners),
            backends={i.obj.name: i.obj for i in self.backends},
            routes=tuple(i.obj for i in self.routes),
            limits=self.limits,
            source=source,
            **self.gateway,
        )


class _Reader:
    """Reads one table: reports unknown keys on creation, then typed values on request.
    Every getter returns None when the key is absent or its value is bad (``ok`` goes
    False then), so a builder can pass on only what it got."""

    def __init__(
        self,
        builder: _Builder,
        file: str,
        path: str,
        table: dict[str, Any],
        known: tuple[str, ...],
        base_dir: str,
    ) -> None:
        self.b = builder
        self.file = file
        self.path = path
        self.t = table
        self.base_dir = base_dir
        self.ok = True
        self._bad_keys: set[str] = set()
        for key in table:
            if key not in known:
                self.b.problem(file, self.at(key), _unknown_key(key, known))
                self.ok = False

    def at(self, key: str) -> str:
        if not key:
            return self.path
        if key.endswith("]"):  # "endpoints[1]"
            return f"{self.path}.{key}"
        return f"{self.path}.{_key(key)}"

    def bad(self, key: str, message: str) -> None:
        self.b.problem(self.file, self.at(key), message)
        self._bad_keys.add(key)
        self.ok = False

    def bad_path(self, subpath: str, message: str) -> None:
        """Like ``bad`` for a dotted path below this table whose parts are already
        quoted as needed (``request_headers.set.X-A``)."""
        self.b.problem(self.file, f"{self.path}.{subpath}", message)
        self.ok = False

    def ok_key(self, key: str) -> bool:
        """True when ``key`` is absent or was read without a problem."""
        return key not in self._bad_keys

    def _get(self, key: str, required: bool) -> Any:
        if key not in self.t:
            if required:
                self.bad(key, "missing (required)")
            return None
        return self.t[key]

    def get_str(self, key: str, *, required: bool = False) -> str | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, str):
            self.bad(key, f"expected string, got {_describe(value)}")
            return None
        return value

    def get_name(self) -> str | None:
        name = self.get_str("name", required=True)
        if name is not None and not _NAME_RE.match(name):
            self.bad("name", _bad_name(name))
            return None
        return name

    def get_bool(self, key: str) -> bool | None:
        value = self._get(key, False)
        if value is None:
            return None
        if not isinstance(value, bool):
            self.bad(key, f"expected boolean (true or false), got {_describe(value)}")
            return None
        return value

    def get_choice(self, key: str, choices: tuple[str, ...]) -> str | None:
        value = self.get_str(key)
        if value is not None and value not in choices:
            self.bad(key, f"must be one of {', '.join(map(_q, choices))}, got {_q(value)}")
            return None
        return value

    def get_number(self, key: str, rule: _NumberRule) -> Any:
        value = self._get(key, False)
        if value is None:
            return None
        kind, low, low_ok = rule
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            self.bad(key, f"expected integer, got {_describe(value)}")
            return None
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                self.bad(key, f"expected number (seconds), got {_describe(value)}")
                return None
            if not math.isfinite(value):
                self.bad(key, f"must be a finite number, got {value}")
                return None
            value = float(value)
        if value < low or (value == low and not low_ok):
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            if low_ok:
                self.bad(key, f"must be {low} or more, got {shown}")
            else:
                self.bad(key, f"must be greater than {low}, got {shown}")
            return None
        return value

    def get_file(self, key: str) -> str | None:
        """A file path: resolved against this file's directory, must be readable."""
        value = self.get_str(key)
        if value is None:
            return None
        if not value:
            self.bad(key, "must not be empty")
            return None
        path = os.path.abspath(os.path.join(self.base_dir, os.path.expanduser(value)))
        try:
            with open(path, "rb"):
                pass
        except FileNotFoundError:
            self.bad(key, f"file not found: {path}")
            return None
        except IsADirectoryError:
            self.bad(key, f"is a directory, not a file: {path}")
            return None
        except OSError as e:
            self.bad(key, f"cannot read {path}: {e.strerror or e}")
            return None
        return path

    def check_cert_chain(
        self, cert_key: str, cert: str, key_key: str, keyfile: str | None, protocol: int
    ) -> None:
        """Load a certificate (+ key) the way the server or client will. The PEM markers
        are looked at first because OpenSSL says only "PEM lib" for most mistakes."""
        cert_pem = _read_latin1(cert)
        if _PEM_CERT not in cert_pem:
            self.bad(cert_key, f"no PEM certificate in {cert}")
        elif keyfile is None and _PEM_KEY not in cert_pem:
            self.bad(cert_key, f"no private key in {cert}; set {key_key} or add the key to it")
        elif keyfile is not None and _PEM_KEY not in _read_latin1(keyfile):
            self.bad(key_key, f"no PEM private key in {keyfile}")
        else:
            ctx = ssl.SSLContext(protocol)
            try:
                ctx.load_cert_chain(cert, keyfile, password=_no_password)
            except _EncryptedKey:
                where = key_key if keyfile else cert_key
                self.bad(
                    where, "private key is encrypted; passphrase-protected keys are not supported"
                )
            except ssl.SSLError as e:
                self.bad(cert_key, f"cannot load certificate and key: {_ssl_reason(e)}")

    def check_ca(self, key: str, path: str) -> None:
        if _PEM_CERT not in _read_latin1(path):
            self.bad(key, f"no PEM certificate in {path}")
            return
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            ctx.load_verify_locations(cafile=path)
        except ssl.SSLError as e:
            self.bad(key, f"cannot load CA certificates: {_ssl_reason(e)}")


_PEM_CERT = "-----BEGIN CERTIFICATE-----"
_PEM_KEY = "PRIVATE KEY-----"  # "BEGIN PRIVATE KEY", "BEGIN RSA PRIVATE KEY", "BEGIN EC ..."


def _credential_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a metadata, token or credential endpoint (None: it can)."""
    from fastgw._fetch import check_url
    from fastgw.upstream.aws import CONTAINER_HTTP_HOSTS, IMDS_HTTP_HOSTS
    from fastgw.upstream.google import METADATA_HTTP_HOSTS

    return check_url(url, METADATA_HTTP_HOSTS | CONTAINER_HTTP_HOSTS | IMDS_HTTP_HOSTS)


def _check_regex(r: _Reader, key: str, pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error as e:
        r.bad(key, f"bad regular expression {_q(pattern)}: {e}")
        return None


def _check_host_pattern(value: str) -> str | None:
    if not _HOST_PATTERN_RE.match(value):
        return f"{_q(value)} is not a host name or *.domain pattern"
    return None


def _check_method(value: str) -> str | None:
    if not _METHOD_RE.match(value):
        return f"{_q(value)} is not an HTTP method (upper case, e.g. GET)"
    return None


def _str_list(r: _Reader, key: str, check: Any) -> list[str]:
    """A string or an array of strings, each checked; [] when absent or bad."""
    raw = r._get(key, False)
    if raw is None:
        return []
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        r.bad(key, f"expected a string or an array of strings, got {_describe(raw)}")
        return []
    out = []
    for i, x in enumerate(items):
        problem = check(x)
        if problem:
            r.bad(f"{key}[{i}]" if isinstance(raw, list) else key, problem)
        else:
            out.append(x)
    return out


def _read_latin1(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("latin-1")
    except OSError:
        return ""  # reported already, when the path was checked


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    # Called by OpenSSL only for an encrypted key; without this it would prompt on a tty.
    raise _EncryptedKey


def _ssl_reason(e: ssl.SSLError) -> str:
    """``KEY_VALUES_MISMATCH`` -> "key values mismatch"; drop OpenSSL's source locations."""
    if e.reason:
        return str(e.reason).replace("_", " ").lower()
    text = str(e.args[1] if len(e.args) > 1 else e)
    return re.sub(r"^\[\w+\]\s*|\s*\(_ssl\.c:\d+\)$", "", text)


# --- small helpers -------------------------------------------------------------------


def _table(b: _Builder, file: str, path: str, value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict):
        return value
    b.problem(file, path, f"expected table, got {_describe(value)}")
    return None


def _array_of_tables(b: _Builder, file: str, key: str, value: Any) -> list[dict[str, Any] | None]:
    if isinstance(value, dict):
        b.problem(file, key, f"expected array of tables ([[{key}]]), got a single table ([{key}])")
        return []
    if not isinstance(value, list):
        b.problem(file, key, f"expected array of tables ([[{key}]]), got {_describe(value)}")
        return []
    out: list[dict[str, Any] | None] = []
    for i, item in enumerate(value):
        out.append(_table(b, file, f"{key}[{i}]", item))
    return out


def _default(cls: type, name: str) -> Any:
    # slots=True dataclasses keep defaults only in their fields, not as class attributes.
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _key(name: str) -> str:
    """One key-path component, quoted the TOML way when it is not a bare key."""
    if _BARE_KEY_RE.match(name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _q(text: object) -> str:
    """Quote a value in a message the TOML way (double quotes)."""
    return f'"{text}"'


def _unknown_key(key: str, known: tuple[str, ...]) -> str:
    return _unknown_name("key", key, list(known))


def _unknown_name(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if not close and len(name) >= 3:
        # "xff" -> "xff_append", "timeout" -> the three *timeout* keys.
        close = [k for k in known if name in k][:3]
    if len(close) == 1:
        hint = f"; did you mean {_q(close[0])}?"
    elif close:
        hint = f"; did you mean one of {', '.join(map(_q, close))}?"
    elif kind != "key" and known:
        hint = f" (known: {', '.join(known)})"
    elif kind != "key":
        hint = f" (no {kind}s are defined)"
    else:
        hint = ""
    return f"unknown {kind} {_q(name)}{hint}"


def _bad_name(name: str) -> str:
    return (
        f"invalid name {_q(name)}: use letters, digits, '-', '_' and '.', "
        "starting with a letter or digit"
    )


_TYPE_NAMES: dict[type, str] = {
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "float",
    list: "array",
    dict: "table",
}


def _type_name(value: Any) -> str:
    for t, name in _TYPE_NAMES.items():
        if isinstance(value, t):
            return name
    return type(value).__name__  # datetime, date, time


def _describe(value: Any) -> str:
    """``string "10"``, ``integer 3``, ``table``: the type, and the value when short."""
    name = _TYPE_NAMES.get(type(value)) or _type_name(value)
    if isinstance(value, list | dict):
        return name
    if isinstance(value, str):
        shown = _q(value)
    elif isinstance(value, bool):
        shown = "true" if value else "false"
    else:
        shown = str(value)
    if len(shown) > 40:
        return name
    return f"{name} {shown}"
