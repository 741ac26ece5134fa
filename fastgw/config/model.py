"""Frozen configuration objects: what the loader produces and the gateway consumes.

Every number that is a limit says where its default came from. Times are seconds
(``*_s``), sizes bytes (``*_bytes``). Objects are immutable so a reload can swap one
``GatewayConfig`` for another atomically; requests in flight keep the one they began with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Limits:
    """Downstream (client-side) limits."""

    # 32 KiB: the default; HAProxy's tune.bufsize is 16 KiB, nginx allows 4x8 KiB.
    max_head_bytes: int = 32768
    # 100 fields: HAProxy's default tune.http.maxhdr is 101.
    max_header_fields: int = 100
    # 8 KiB: RFC 9112 3 recommends supporting request-lines of at least 8000 octets.
    max_target_bytes: int = 8192
    # 10 MiB: Cloud Functions' own request limit is 32 MiB (HTTP), Lambda URLs 6 MiB;
    # 10 MiB is a middle that operators raise per route. 0 means no limit.
    max_body_bytes: int = 10 * 1024 * 1024
    # 10 s to send a whole head: nginx's client_header_timeout is 60 s, HAProxy's
    # recommended "timeout http-request" is 10 s. Slow-header clients get 408.
    head_timeout_s: float = 10.0
    # 60 s idle keep-alive: between nginx's 75 s and HAProxy's common 1-10 s; short enough
    # to bound idle sockets, long enough for browsers and SDK pools.
    idle_timeout_s: float = 60.0
    # 30 s without progress while reading a request body, or writing to a client.
    body_timeout_s: float = 30.0
    # 10000 connections per worker: well under the default fd limit raised by serve.
    max_connections: int = 10000


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    host: str
    port: int
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # mTLS callers: CA bundle to verify client certificates against, and whether a
    # certificate is "required" or "optional".
    client_ca_file: str | None = None
    client_cert: str = "none"  # "none" | "optional" | "required"

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream endpoint, parsed from a URL like https://host:443/prefix."""

    url: str
    scheme: str  # "http" | "https"
    host: str
    port: int
    path_prefix: str  # "" or "/prefix" without a trailing slash
    # The table form ({url, region, priority, weight, max_in_flight}) sets these; a bare
    # URL string keeps the defaults. Priority 0 is tried first; a higher level takes
    # traffic only while every endpoint of the levels before it is unavailable
    # (unhealthy, ejected, paused by Retry-After, or at its in-flight cap).
    region: str = ""
    priority: int = 0
    weight: int = 1
    # Requests in flight at once (a function's max instances x its per-instance
    # concurrency); 0 = no cap beyond the pool's connections.
    max_in_flight: int = 0

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        # IPv6 literals are stored bare (for connecting) and bracketed here (RFC 3986 3.2.2).
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == default:
            return host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class CredentialConfig:
    """The credential fastgw attaches to every request to a backend's endpoints
    (``[backends.NAME.credential]``). ``type`` picks the kind; the other fields apply to
    some kinds only (the loader refuses the rest). Secrets are never held here: only
    the files and environment variable names they come from.

    - ``google_id_token``: ``source`` "metadata" (``metadata_url``,
      ``service_account``) or "service_account_file" (``key_file``, ``token_url``);
      ``audience`` (None: each endpoint's URL origin, one token per endpoint);
      ``header`` "authorization" or "x-serverless-authorization".
    - ``aws_sigv4``: ``region`` (None: from each endpoint's Lambda URL host),
      ``service`` ("lambda"), ``source`` "default" (the SDKs' order), "env",
      "shared_file" (``credentials_file``, ``profile``), "container" or "instance"
      (``endpoint_url`` overrides where those are fetched from).
    - ``azure_function_key``: ``key_file`` or ``key_env``; sent as x-functions-key.
    - ``bearer_file``: ``path``, re-read when it changes; sent as Authorization.
    """

    type: str
    source: str | None = None
    audience: str | None = None
    header: str = "authorization"
    key_file: str | None = None
    key_env: str | None = None
    metadata_url: str | None = None
    service_account: str = "default"
    token_url: str | None = None
    region: str | None = None
    service: str = "lambda"
    profile: str | None = None
    credentials_file: str | None = None
    endpoint_url: str | None = None
    path: str | None = None


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str
    endpoints: tuple[Endpoint, ...]
    # TLS to the upstream: verified always; ca_file replaces the system CAs.
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    server_name: str | None = None  # SNI / verification name override
    # 5 s connect: Envoy's default connect_timeout is 5 s.
    connect_timeout_s: float = 5.0
    # 60 s to the first response byte: Cloud Functions cold starts can take tens of
    # seconds; the hedging issue adds a separate, shorter one for warm endpoints.
    first_byte_timeout_s: float = 60.0
    # 300 s for a whole exchange: Cloud Functions' default function timeout is 60 s,
    # the maximum for HTTP functions 3600 s; 300 s is Envoy's order of magnitude for
    # long calls and a sane stop for stuck streams.
    total_timeout_s: float = 300.0
    # 128 idle+busy connections per endpoint; 30 s idle expiry (under the 60 s idle
    # timeouts common on function front ends, so we close before they do).
    pool_max_size: int = 128
    pool_idle_timeout_s: float = 30.0
    # "least_outstanding": the less busy of two endpoints picked at random (the power
    # of two choices: Envoy's default LEAST_REQUEST); "round_robin"; "weighted" (smooth
    # weighted round robin over the endpoints' weights); "hash" (weighted rendezvous
    # hashing on ``hash_on``: a caller sticks to one endpoint while it is available).
    balance: str = "least_outstanding"
    # The upstream credential (ID token, SigV4, function key, bearer file); None: none.
    credential: CredentialConfig | None = None
    # "identity" (the verified caller, the client address for anonymous ones) or
    # "header:<name>"; only with balance = "hash".
    hash_on: str = "identity"
    health_check: HealthCheckConfig | None = None
    outlier: OutlierConfig = field(default_factory=lambda: OutlierConfig())
    # Requests in flight across the backend (0 = no cap); per caller (0 = no cap).
    max_in_flight: int = 0
    max_in_flight_per_identity: int = 0
    # Requests waiting (FIFO) for a slot when the caps are full; 0 = answer 503 at once.
    max_queued: int = 0
    # 5 s in the queue at most: a little over a warm function's typical latency; the
    # caller then gets 503 with Retry-After rather than an open-ended wait.
    queue_timeout_s: float = 5.0
    # An upstream 429/503 with Retry-After pauses that endpoint for that long, at most
    # this (60 s: Retry-After values past a minute are usually "come back much later",
    # and an endpoint that recovers sooner is found by the next pause). 0 disables.
    retry_after_max_s: float = 60.0
    # Cold starts (scale to zero). An endpoint idle longer than ``cold_after_idle_s``
    # (the platform's scale-to-zero window; None: never judged cold by idleness) is
    # "likely cold", as is one reached on a fresh connection or whose last first byte
    # came far over its norm. A likely-cold endpoint gets ``cold_first_byte_timeout_s``
    # (None: the ordinary first_byte_timeout_s) and hedging starts earlier for it.
    cold_after_idle_s: float | None = None
    cold_first_byte_timeout_s: float | None = None
    # Keep-warm: a GET to ``keep_warm_path`` on every endpoint idle for this long
    # (None: off). Costs the function an invocation per interval per endpoint.
    keep_warm_interval_s: float | None = None
    keep_warm_path: str = "/"

    @property
    def gated(self) -> bool:
        """Whether requests pass the async admission step (caps, queue, hashing)."""
        return bool(
            self.max_in_flight
            or self.max_in_flight_per_identity
            or self.max_queued
            or self.balance == "hash"
            or any(e.max_in_flight for e in self.endpoints)
        )


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Active checks: GET ``path`` on each endpoint every ``interval_s`` over its own
    connection (not a pooled one). An endpoint is marked down after
    ``unhealthy_threshold`` failures in a row and up after ``healthy_threshold``
    successes (HAProxy's fall 3 / rise 2 defaults). ``expected_statuses`` empty means
    any 2xx."""

    path: str = "/"
    # 10 s: a check is a function invocation (billed, and it keeps an instance warm);
    # HAProxy's 2 s default suits long-lived servers more than functions.
    interval_s: float = 10.0
    timeout_s: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    expected_statuses: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Passive ejection, with Envoy's outlier-detection defaults (consecutive_5xx 5,
    consecutive_gateway_failure 5, base_ejection_time 30 s, max_ejection_time 300 s,
    max_ejection_percent 10 % but at least one endpoint). An ejection lasts
    ``base_ejection_time_s`` x the endpoint's ejection count, at most
    ``max_ejection_time_s``. 0 for a consecutive count disables that kind."""

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    base_ejection_time_s: float = 30.0
    max_ejection_time_s: float = 300.0
    max_ejection_percent: int = 10


@dataclass(frozen=True, slots=True)
class HeaderActions:
    """Fields to set (replacing any the message had) and to remove, by name."""

    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """``[routes.retry]``: when a request that may have reached the function is sent
    again (see fastgw/upstream/retry.py for what is safe). A request that never reached
    it (refused connect, dead pooled connection) is always retried once elsewhere."""

    # 1 retry: most transient failures clear on the first retry; more multiplies load
    # exactly when an upstream is struggling.
    attempts: int = 1
    # Outcomes that are retried: response statuses and "timeout" (no first byte within
    # the first-byte timeout), "reset" (the connection ended with no response).
    on: tuple[str, ...] = ("502", "503", "504", "timeout", "reset")
    # Full jitter: sleep uniform(0, min(max, base * 2^n)) before retry n+1.
    backoff_base_s: float = 0.025
    backoff_max_s: float = 0.25
    # Retries may be at most this share of the route's requests (Envoy's retry budget
    # default is 20% of active requests), plus ``min_retries_per_s`` for quiet routes.
    budget_percent: float = 20.0
    min_retries_per_s: float = 3.0


@dataclass(frozen=True, slots=True)
class HedgeConfig:
    """``[routes.hedge]``: when no first byte came within the delay, send the same
    (retryable) request to another endpoint; the first answer wins."""

    # Fixed delay, or None with ``learned`` True: the ``percentile`` of the endpoint's
    # recent first-byte latencies, within [min_delay_s, max_delay_s].
    delay_s: float | None = None
    learned: bool = False
    percentile: float = 95.0
    min_delay_s: float = 0.005
    max_delay_s: float = 1.0
    # Delay for an endpoint judged likely cold; None: a quarter of the delay.
    cold_delay_s: float | None = None
    # Hedges at most this share of the route's requests. 10%: hedging at the p95 costs
    # about 5% more load (Dean and Barroso, "The Tail at Scale", CACM 2013); the rest
    # leaves room for cold endpoints, which are hedged earlier.
    budget_percent: float = 10.0
    max_attempts: int = 2


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One route. Conditions (all must hold; first matching route in order wins):
    ``hosts`` (exact names or ``*.example.com``; the port is ignored), one path condition
    (``path_prefix`` whole segments, ``path`` exact, ``path_regex``, or ``path_map``: an
    HAProxy map file whose value for the path names the backend), ``methods``, and
    ``headers`` (name -> exact value, or None for "present"). Actions: the backend, one
    path rewrite (``strip_prefix``, ``replace_prefix``, ``rewrite_regex``), header
    actions both ways, and overrides of timeouts and the body limit."""

    name: str
    backend: str | None  # None when path_map names the backend
    path_prefix: str = "/"
    strip_prefix: bool = False
    path: str | None = None
    path_regex: str | None = None
    path_map: str | None = None
    path_map_type: str = "beg"
    hosts: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    headers: tuple[tuple[str, str | None], ...] = ()
    replace_prefix: str | None = None
    rewrite_regex: tuple[str, str] | None = None
    request_headers: HeaderActions = field(default_factory=HeaderActions)
    response_headers: HeaderActions = field(default_factory=HeaderActions)
    first_byte_timeout_s: float | None = None
    total_timeout_s: float | None = None
    max_body_bytes: int | None = None
    # Retries and hedging (fastgw/upstream/retry.py). ``idempotent``: every method on
    # this route may be repeated safely (as if RFC 9110 9.2.2 idempotent).
    idempotent: bool = False
    retry: RetryConfig | None = None
    hedge: HedgeConfig | None = None
    # A body up to this size is read whole before sending on a route that may retry it
    # (so it can be sent again); a larger one is streamed and never retried once sent.
    # 64 KiB: one read of the gateway's stream buffer.
    replay_buffer_bytes: int = 65536
    # The loaded map (a fastgw._core.acl.Map), built while loading the config so that a
    # reload parses it off the event loop and ``fastgw check`` validates it.
    path_map_obj: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin listener: /metrics, /healthz, /readyz, /config. Loopback by default:
    it tells whoever can reach it how the gateway is configured (secrets redacted)."""

    host: str = "127.0.0.1"
    port: int = 9901


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """One JSON line per request. ``path`` None or "-" means stdout."""

    enabled: bool = False
    path: str | None = None
    # Share of successful (2xx/3xx) exchanges logged; denials and errors always are.
    sample_success: float = 1.0


@dataclass(frozen=True, slots=True)
class ClaimCondition:
    """``claim`` (a dotted path into the token's claims) ``op`` ``value``: ``equals``
    (the claim equals value), ``one_of`` (the claim is one of the values), ``contains``
    (a list claim, or a space-separated string such as ``scope``, contains value),
    ``all_of`` (it contains every one of the values), ``present``."""

    claim: str
    op: str
    value: Any = None


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One rule: every condition given must hold for the rule to match."""

    effect: str  # "allow" | "deny"
    kinds: tuple[str, ...] = ()  # identity kinds: jwt, apikey, mtls, anonymous; () = any
    issuers: tuple[str, ...] = ()  # issuer names (config), for jwt identities
    subjects: tuple[str, ...] = ()
    claims: tuple[ClaimCondition, ...] = ()
    key_attributes: tuple[tuple[str, str], ...] = ()  # API-key attributes that must equal
    cert_sans: tuple[str, ...] = ()  # mTLS: any of these DNS/URI/email names


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Who may call the routes named. Rules are tried in order; the first that matches
    decides (allow or deny); when none matches the request is denied. ``shadow``: the
    decision is logged and counted but not enforced. ``environments``: the policy only
    applies when the gateway runs in one of them."""

    name: str
    routes: tuple[str, ...]
    rules: tuple[PolicyRule, ...]
    mode: str = "enforce"  # "enforce" | "shadow"
    environments: tuple[str, ...] = ()
    allow_anonymous: bool = False  # no credential at all is let through to the rules


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    realm: str = "fastgw"
    # Every client field starting with this is removed before any route's own header
    # actions: the identity namespace belongs to the gateway.
    header_prefix: str = "X-Fastgw-"
    # The client's Authorization header upstream: "pass", "remove", or "move" (to
    # X-Forwarded-Authorization, so the gateway can send its own credential).
    authorization: str = "pass"
    # Claims sent as X-Fastgw-Claim-<name> headers (strings and numbers only).
    claim_headers: tuple[str, ...] = ()
    token_cache_size: int = 10000
    issuers: tuple[Any, ...] = ()  # fastgw.identity.Issuer
    api_keys: Any = None  # fastgw.identity.ApiKeys


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """A token bucket per key on the routes named (all routes when none are): ``key``
    is ``identity`` (the verified caller), ``ip`` (the client address), ``route``,
    ``header:<name>`` or ``claim:<name>`` (a claim of the caller's token or an API
    key's attribute). Over the limit: 429 with Retry-After and RateLimit headers, or in
    ``shadow`` mode only counted."""

    name: str
    rate_per_s: float
    burst: float
    key: str = "identity"
    routes: tuple[str, ...] = ()
    mode: str = "enforce"
    # Tiers: ``tier`` is ``claim:<name>`` (a token claim or an API key's attribute,
    # dotted for nested claims) whose value names the caller's tier, through the map
    # ``tier_map`` (value -> tier name) when one is given. A caller gets its tier's
    # rate and burst; one without a known tier gets the tier named "default", or a 403
    # when there is none. With tiers, ``rate_per_s``/``burst`` are the default tier's
    # (0 when there is none).
    tier: str | None = None
    tier_map: str | None = None
    tiers: tuple[LimitTier, ...] = ()
    tier_map_obj: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class LimitTier:
    name: str
    rate_per_s: float
    burst: float


@dataclass(frozen=True, slots=True)
class LimitsStoreConfig:
    """Where rate-limit buckets live: ``local`` (this process's core table) or
    ``redis`` (shared by every instance using the same Redis and prefix; see
    fastgw/policy/redis_limits.py for the failure policies)."""

    type: str = "local"
    address: str = ""  # host:port or unix:/path
    database: int = 0
    prefix: str = "fastgw:"
    # 50 ms: a loopback or LAN round trip is 0.1-0.5 ms; this only trips when Redis is
    # stalled or gone, and bounds what a stall adds to a request.
    timeout_s: float = 0.05
    on_failure: str = "local"
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """So many requests (or cost units) per key per calendar window (``hour``, ``day``,
    ``month`` of ``time_zone``) on the routes named (all when none are); ``key`` as for
    rate limits. Over it: 429 with Retry-After until the window ends, or in ``shadow``
    mode only counted. ``cost_header``: the request's declared cost (1..``max_cost``;
    absent: 1). ``store``: "local" (the gateway's table, a file in
    ``gateway.state_dir`` when set) or "redis" (the ``[limits_store]`` Redis)."""

    name: str
    requests: int
    window: str = "day"  # "hour" | "day" | "month"
    time_zone: str = "UTC"
    key: str = "identity"
    routes: tuple[str, ...] = ()
    mode: str = "enforce"
    cost_header: str | None = None
    # 1000 units: a cap on what one request may declare; raise it with the unit's size.
    max_cost: int = 1000
    store: str = "local"


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    listeners: tuple[ListenerConfig, ...]
    backends: dict[str, BackendConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    limits: Limits = field(default_factory=Limits)
    # Value appended to Via in both directions; None disables it.
    via: str | None = "1.1 fastgw"
    # Trust a client's X-Forwarded-For and append to it (true), or replace it (false).
    xff_append: bool = True
    # SIGTERM/SIGINT: stop accepting, finish in-flight requests for up to this long.
    # 10 s: Kubernetes gives 30 s by default before SIGKILL; leave room for the rest.
    drain_timeout_s: float = 10.0
    admin: AdminConfig | None = None
    audit: AuditConfig = field(default_factory=AuditConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    policies: tuple[PolicyConfig, ...] = ()
    rate_limits: tuple[RateLimitConfig, ...] = ()
    # Buckets kept in memory (one per key per limit); idle full buckets are evicted
    # first, which loses nothing. 1M keys take about 80 MB.
    max_limit_keys: int = 1_000_000
    limits_store: LimitsStoreConfig = field(default_factory=LimitsStoreConfig)
    budgets: tuple[BudgetConfig, ...] = ()
    # Where state that outlives the process is kept (budgets.bin); None: in memory only,
    # so budgets start over at a restart.
    state_dir: str | None = None
    # Budget counters kept (one per key per budget; a file of 64 bytes each, plus a
    # 4-byte lock per 8): 100k keys is 6.5 MB. Past it, counters of past windows go
    # first, then the least recently used.
    max_budget_keys: int = 100_000
    # Which environment's policies apply ("dev", "prod", ...); FASTGW_ENV overrides it.
    environment: str = "default"
    source: str = "<objects>"  # the file it was loaded from, for messages
