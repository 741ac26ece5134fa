"""Credentials on the data path: from ``[backends.NAME.credential]`` to header lines.

Strategy. A ``CredentialBinding`` is what one endpoint (one ``Pool``) sends: the
``CredentialCache`` that keeps its credential fresh (shared through the gateway's
``CredentialRegistry`` by every endpoint and config that needs the same credential: a
reload that keeps a (type, source, audience) key keeps its cache, its token and its
schedule) and how to render it (a ``BearerHeader`` or a ``SigV4Signer``). Bindings are
built once per config (``build_bindings``) into ``GatewayState.credentials``, a dict
keyed by pool; a gateway without credentials has an empty dict there and pays one
truthiness test per request.

Per request (``CredentialBinding.lines``): the cache's usable-until time against the
gateway's coarse clock (the cache's expiry margin covers the clock's lag), and the
header line, which is rendered once per installed credential (an identity check per
request) plus, when forwarding, the caller's Authorization moved aside. SigV4 signs
per request (one SHA-256 and one HMAC; the key is derived once a day per credential).
Nothing is fetched here and nothing awaits: no valid credential means ``None``, and
the caller waits for the first fetch (cold start only) or answers 503
``upstream_credential_unavailable``. An expired credential is never sent.

Refusals: an endpoint with a credential reports 401 and 403 answers to
``Pool.outcome`` (``Pool.report_from`` is 401 there, 429 elsewhere: the request path's
one compare stays one compare). A 401, or a 403 with ``error="invalid_token"``, asks
the cache for an early refresh (at most one per ``forced_refresh_interval_s``, 30 s)
and counts in ``fastgw_upstream_credential_rejected_total``. The refused request is
not retried: the new token arrives after a fetch, and the next request carries it.
Health checks and keep-warm send the credential too (``health.probe_request``).

Strip sets: a caller must not set a field the gateway sets (our Authorization,
X-Forwarded-Authorization, X-Serverless-Authorization, x-functions-key, X-Amz-*). The
route's strip set is extended with the binding's names, once per (binding, route),
memoised on the binding (bounded by the routes of one config).

SigV4 needs the payload hash: a request with a body to a SigV4 backend is read whole
first (``MAX_SIGNED_BODY_BYTES``, Lambda's limit; 413 above it) and hashed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from fastgw._core.http import StripSet
from fastgw.config.model import BackendConfig, CredentialConfig, Endpoint, GatewayConfig
from fastgw.upstream.credentials import (
    BearerHeader,
    CredentialCache,
    CredentialRegistry,
    CredentialSource,
    FileTokenSource,
    StaticTokenSource,
    azure_function_key_header,
    google_header,
)
from fastgw.upstream.sigv4 import EMPTY_SHA256, SigV4Signer, region_from_host

if TYPE_CHECKING:
    from fastgw.upstream.backend import Backend

__all__ = [
    "MAX_SIGNED_BODY_BYTES",
    "CredentialBinding",
    "build_bindings",
    "credential_audience",
    "endpoint_origin",
]

# 6 MiB: Lambda's payload limit for a synchronous invocation, request and response
# (Lambda API reference, Invoke: "For synchronous invocations, the maximum payload size
# is 6 MB"; function URLs in the default BUFFERED mode invoke synchronously). A signed
# body is held in memory whole, so this also bounds what one request can pin.
MAX_SIGNED_BODY_BYTES = 6 * 1024 * 1024


def endpoint_origin(ep: Endpoint) -> str:
    """``scheme://authority`` of an endpoint (default port omitted): the default ID
    token audience. Cloud Run checks ``aud`` against the service's URL (its origin, or a
    configured custom audience); a different audience is set with ``audience``."""
    return f"{ep.scheme}://{ep.authority}"


def credential_audience(cfg: CredentialConfig, ep: Endpoint) -> str:
    return cfg.audience if cfg.audience is not None else endpoint_origin(ep)


class CredentialBinding:
    """One endpoint's credential: its cache and how it becomes header lines.

    ``forward`` says whether the caller's Authorization is moved to
    X-Forwarded-Authorization here (only when the gateway passes the caller's
    Authorization through; ``identity.authorization = "move"`` moves it already and
    "remove" drops it). ``signs_body`` is True for SigV4: the request body must be read
    whole and hashed before the head is built."""

    __slots__ = (
        "_cred",
        "_line",
        "backend_name",
        "cache",
        "forward",
        "header",
        "kind",
        "names",
        "signer",
        "signs_body",
        "strips",
        "wait_s",
    )

    def __init__(
        self,
        cache: CredentialCache[Any],
        *,
        backend_name: str,
        kind: str,
        header: BearerHeader | None = None,
        signer: SigV4Signer | None = None,
        forward: bool,
        wait_s: float,
    ) -> None:
        self.cache = cache
        self.backend_name = backend_name
        self.kind = kind
        self.header = header
        self.signer = signer
        self.signs_body = signer is not None
        self.forward = forward and (header or signer).forwards  # type: ignore[union-attr]
        self.wait_s = wait_s
        src = header if header is not None else signer
        assert src is not None
        self.names: tuple[bytes, ...] = src.strip_names
        # Route -> its strip set plus ours; routes hash by identity, and a binding
        # lives as long as one config's routes.
        self.strips: dict[object, StripSet] = {}
        self._cred: Any = None
        self._line = b""

    def ready(self, now: float) -> bool:
        return self.cache.current(now) is not None

    def cold(self) -> bool:
        """No fetch attempt has finished yet (the gateway just started, or this
        credential just appeared in a reload): worth waiting for."""
        c = self.cache
        return c.refreshes_ok == 0 and c.refreshes_failed == 0

    def lines(
        self, head: Any, target: bytes, host: bytes, now: float, payload_hash: bytes | None
    ) -> bytes | None:
        """The header lines for this request, or None when no unexpired credential is
        at hand. ``target`` and ``host`` are exactly what goes upstream."""
        cache = self.cache
        # CredentialCache.current, inlined (this runs per request).
        if now >= cache._usable_until:
            return None
        cred: Any = cache._cred  # not None while usable
        signer = self.signer
        if signer is None:
            if cred is not self._cred:
                # Once per installed credential: the whole line, pre-rendered.
                self._line = self.header.render(cred)  # type: ignore[union-attr]
                self._cred = cred
            if self.forward:
                auth = head.get(b"authorization")
                if auth is not None:
                    return self._line + b"X-Forwarded-Authorization: " + auth + b"\r\n"
            return self._line
        return signer.render(
            cred,
            head.method,
            target,
            host,
            time.time(),
            EMPTY_SHA256 if payload_hash is None else payload_hash,
            head.get(b"authorization") if self.forward else None,
        )

    def strip_for(self, route: Any) -> StripSet:
        """The route's strip set plus this binding's names (the request path looks in
        ``strips`` first and calls this once per route)."""
        names, prefixes = route.req_strip_spec
        s = self.strips[route] = StripSet(names=tuple(names) + self.names, prefixes=prefixes)
        return s


def _key(cfg: CredentialConfig, audience: str) -> tuple[Hashable, ...]:
    """What makes two credentials the same (and so one cache, one fetch per refresh):
    everything that selects the source, and the audience for ID tokens."""
    t = cfg.type
    if t == "google_id_token":
        return (
            t,
            cfg.source or "metadata",
            cfg.metadata_url,
            cfg.service_account,
            cfg.key_file,
            cfg.token_url,
            audience,
        )
    if t == "aws_sigv4":
        return (t, cfg.source or "default", cfg.profile, cfg.credentials_file, cfg.endpoint_url)
    if t == "azure_function_key":
        return (t, cfg.key_file, cfg.key_env)
    return (t, cfg.path)


def _source(cfg: CredentialConfig, audience: str) -> CredentialSource[Any]:
    """A new source for ``cfg``. Raises ValueError for what the loader lets through
    but cannot be built (a container endpoint without its environment variables)."""
    t = cfg.type
    if t == "google_id_token":
        from fastgw.upstream.google import (
            GoogleMetadataSource,
            GoogleServiceAccountSource,
            default_metadata_url,
        )

        if (cfg.source or "metadata") == "service_account_file":
            assert cfg.key_file is not None
            return GoogleServiceAccountSource(cfg.key_file, audience, token_url=cfg.token_url)
        return GoogleMetadataSource(
            audience,
            metadata_url=cfg.metadata_url or default_metadata_url(),
            service_account=cfg.service_account,
        )
    if t == "aws_sigv4":
        from fastgw.upstream import aws

        src = cfg.source or "default"
        if src == "env":
            return aws.AwsEnvironmentSource()
        if src == "shared_file":
            path = cfg.credentials_file or aws.default_credentials_file()
            return aws.AwsSharedFileSource(path, cfg.profile or "default")
        if src == "container":
            return aws.AwsContainerSource(cfg.endpoint_url)
        if src == "instance":
            return aws.AwsInstanceMetadataSource(cfg.endpoint_url or aws.DEFAULT_IMDS_URL)
        return aws.default_aws_source(profile=cfg.profile, credentials_file=cfg.credentials_file)
    if t == "azure_function_key":
        if cfg.key_file is not None:
            return FileTokenSource(cfg.key_file, kind=t, jwt_expiry=False)
        assert cfg.key_env is not None
        return StaticTokenSource(
            os.environ.get(cfg.key_env, ""), kind=t, what=f"environment variable {cfg.key_env}"
        )
    assert t == "bearer_file" and cfg.path is not None
    return FileTokenSource(cfg.path, kind=t)


def _renderer(
    cfg: CredentialConfig, ep: Endpoint
) -> tuple[BearerHeader | None, SigV4Signer | None]:
    t = cfg.type
    if t == "google_id_token":
        return google_header(cfg.header), None
    if t == "azure_function_key":
        return azure_function_key_header(), None
    if t == "bearer_file":
        return BearerHeader("Authorization"), None
    region = cfg.region or region_from_host(ep.host)
    if region is None:  # the loader checks this; a config built from objects may not
        raise ValueError(f"{ep.url}: not a Lambda function URL host; set the region")
    return None, SigV4Signer(region, cfg.service)


def _maker(cfg: CredentialConfig, audience: str) -> Callable[[], CredentialCache[Any]]:
    def make() -> CredentialCache[Any]:
        return CredentialCache(_source(cfg, audience), audience)

    return make


def build_bindings(
    config: GatewayConfig,
    backends: dict[str, Backend],
    registry: CredentialRegistry,
) -> tuple[dict[object, CredentialBinding], set[Hashable]]:
    """Bindings by pool for every backend with a credential, and the registry keys
    they use (for ``registry.retain`` after a reload). Caches come from ``registry``:
    an existing key keeps its cache; a new one starts fetching if the registry runs."""
    out: dict[object, CredentialBinding] = {}
    keys: set[Hashable] = set()
    forward = config.identity.authorization == "pass"
    for name, backend in backends.items():
        bcfg: BackendConfig = backend.config
        cfg = bcfg.credential
        if cfg is None:
            continue
        for pool in backend.pools:
            ep = pool.endpoint
            audience = credential_audience(cfg, ep) if cfg.type == "google_id_token" else ""
            key = _key(cfg, audience)
            keys.add(key)
            cache = registry.get_or_create(key, _maker(cfg, audience))
            header, signer = _renderer(cfg, ep)
            # Cold start: wait for the first fetch up to the connect timeout (what a
            # request would have waited for a connection anyway).
            cb = out[pool] = CredentialBinding(
                cache,
                backend_name=name,
                kind=cfg.type,
                header=header,
                signer=signer,
                forward=forward,
                wait_s=bcfg.connect_timeout_s,
            )
            # For probes (health checks, keep-warm) and refusals: the pool's own
            # pointer. A pool kept over a reload has the same credential config (a
            # backend is kept only when its config is unchanged), hence the same cache.
            pool.credential = cb
            pool.report_from = 401
    return out, keys
