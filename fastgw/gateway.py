"""The embeddable gateway: listeners, connection tasks, drain.

``Gateway`` is built from a ``GatewayConfig`` (or a file) and served inside the caller's
trio nursery::

    gw = Gateway.from_file("gateway.toml")
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(gw.serve)   # [(host, port), ...] actually bound
        ...
        nursery.cancel_scope.cancel()           # stop; or: await gw.drain()

Everything a request needs from the configuration is compiled once into a
``GatewayState`` (router with backends, strip set, Via bytes, limits). A request reads
``gateway.state`` once when it starts, so a reload can swap the state atomically while
requests in flight finish on the one they began with; backends whose configuration did
not change are carried over with their warm pools.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from fastgw._core.bucket import BucketTable
from fastgw._core.budget import BudgetTable
from fastgw.audit import AuditLog
from fastgw.config.model import GatewayConfig, ListenerConfig
from fastgw.downstream import Downstream
from fastgw.errors import ProtocolError
from fastgw.policy import route_auth
from fastgw.router import Route, Router
from fastgw.transport import PlainTransport, TLSTransport
from fastgw.upstream.backend import Backend
from fastgw.upstream.retry import maybe_keep_warm

if TYPE_CHECKING:
    # Imported where used: a gateway without an admin listener or token issuers does
    # not load prometheus-client, cryptography and PyJWT (about 12 MiB of RSS).
    from fastgw.admin import AdminServer
    from fastgw.config.model import LimitsStoreConfig
    from fastgw.identity import Verifier
    from fastgw.policy.redis_budgets import RedisBudgets
    from fastgw.policy.redis_limits import RedisBuckets
    from fastgw.upstream.credentials import CredentialRegistry

log = logging.getLogger("fastgw")

# 0.1 s: timeouts here are seconds long; a tenth of a second is well inside their
# tolerance and costs one pass over the connections ten times a second.
WATCHDOG_TICK_S = 0.1
# Connections accepted per listener wake-up before yielding (HAProxy's tune.maxaccept).
ACCEPT_BURST = 64


class GatewayState:
    """Everything compiled from one config; immutable once built."""

    __slots__ = (
        "backends",
        "budget_counts",
        "config",
        "credential_keys",
        "credentials",
        "environment",
        "has_identity",
        "iss_names",
        "limit_counts",
        "limits",
        "router",
        "verifier",
        "via",
        "xff_append",
    )

    router: Router
    limit_counts: dict[str, list[int]]
    budget_counts: dict[str, list[int]]

    def __init__(
        self,
        config: GatewayConfig,
        previous: GatewayState | None = None,
        registry: CredentialRegistry | None = None,
    ) -> None:
        self.config = config
        self.limits = config.limits
        self.environment = os.environ.get("FASTGW_ENV") or config.environment
        ident = config.identity
        # Token issuers by ``iss`` value -> their config name (what policies refer to).
        self.iss_names = {i.issuer: i.name for i in ident.issuers}
        # With any identity source configured, presented credentials are checked on
        # every route (an invalid one is refused even where none is required), and the
        # identity feeds rate-limit keys and identity headers.
        self.has_identity = bool(ident.issuers) or ident.api_keys is not None
        # The verifier (and its key fetchers and token cache) survives a reload that
        # keeps the same issuers; the gateway starts a new one's fetchers otherwise.
        self.verifier: Verifier | None = None
        if ident.issuers:
            if previous is not None and previous.config.identity.issuers == ident.issuers:
                self.verifier = previous.verifier
            else:
                from fastgw.identity import Verifier

                self.verifier = Verifier(list(ident.issuers), cache_size=ident.token_cache_size)
        self.via = config.via.encode() if config.via else None
        self.xff_append = config.xff_append
        old: dict[str, Backend] = previous.backends if previous else {}
        self.backends: dict[str, Backend] = {}
        for name, bcfg in config.backends.items():
            prev = old.get(name)
            if prev is not None and prev.config == bcfg:
                self.backends[name] = prev
            else:
                self.backends[name] = Backend(bcfg, previous=prev)
        # Upstream credentials by pool (empty without any: one truthiness test per
        # request). Their caches live in the gateway's registry, shared across reloads.
        self.credentials: dict[object, Any] = {}
        self.credential_keys: set[Any] = set()
        if any(b.credential is not None for b in config.backends.values()):
            from fastgw.upstream.binding import build_bindings
            from fastgw.upstream.credentials import CredentialRegistry

            self.credentials, self.credential_keys = build_bindings(
                config, self.backends, registry or CredentialRegistry()
            )
        old_routes = {r.name: r for r in previous.router.routes} if previous else {}
        # Rate-limit counters by limit name, shared across routes, kept over reloads.
        limit_counts: dict[str, list[int]] = previous.limit_counts if previous else {}
        self.limit_counts = limit_counts
        # Budget counters (allowed, refused, shadow_refused) by name, the same way.
        budget_counts: dict[str, list[int]] = previous.budget_counts if previous else {}
        self.budget_counts = budget_counts
        self.router = Router(
            [
                Route(
                    r,
                    self.backends[r.backend] if r.backend is not None else None,
                    config,
                    previous=old_routes.get(r.name),
                    auth=route_auth(config.policies, r.name, self.environment),
                    limit_counts=limit_counts,
                    budget_counts=budget_counts,
                )
                for r in config.routes
            ],
            self.backends,
        )


def _budget_table(config: GatewayConfig) -> BudgetTable:
    """The budget table: in ``state_dir/budgets.bin`` when set (a file that does not fit
    is replaced, and the log says why), else in memory."""
    if config.state_dir is None:
        return BudgetTable(config.max_budget_keys)
    path = os.path.join(config.state_dir, "budgets.bin")
    table = BudgetTable(config.max_budget_keys, path)
    if table.reset_reason is not None:
        log.warning("budgets: %s was reset, counters start over: %s", path, table.reset_reason)
    return table


def _listener_tls_context(lc: ListenerConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(lc.tls_cert_file, lc.tls_key_file)  # type: ignore[arg-type]
    if lc.client_ca_file:
        ctx.load_verify_locations(lc.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if lc.client_cert == "required" else ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class Gateway:
    """An embeddable fastgw instance. See the module docstring."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        reuse_port: bool = False,
        shared_buckets: tuple[str, int] | None = None,
    ) -> None:
        # Upstream credential caches, one per (type, source, audience), run in serve();
        # a reload keeps the caches of unchanged keys (no refetch) and stops the rest.
        # Made when a config first has a credential: a gateway without any never
        # loads the credential modules.
        self.credentials: CredentialRegistry | None = None
        self._serving = False
        self._need_credentials(config)
        self.state = GatewayState(config, registry=self.credentials)
        # SO_REUSEPORT only when asked (--workers N): otherwise a second gateway started
        # on the same port by mistake would silently share it instead of failing.
        self.reuse_port = reuse_port
        self.draining = False
        self.connections: set[Downstream] = set()
        self.errors: collections.Counter[str] = collections.Counter()
        # Answers to requests that matched no route (or failed before routing), by
        # status class: index 1..5 for 1xx..5xx. Routed answers count on their route.
        self.unrouted_counts = [0] * 6
        self._rid_prefix = os.urandom(6).hex().encode()
        self._rid_counter = 0
        self._no_connections = trio.Event()
        self._no_connections.set()
        self._listeners: dict[tuple, _Listener] = {}
        self._limiter = trio.CapacityLimiter(config.limits.max_connections)
        self.audit: AuditLog | None = AuditLog(config.audit) if config.audit.enabled else None
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload_ok_unix = time.time()
        self.admin_address: tuple[str, int] | None = None
        self.trio_token: trio.lowlevel.TrioToken | None = None
        self._verifier_scopes: dict[int, trio.CancelScope] = {}
        # Counters of authentication outcomes (issuer or kind, result) and policy
        # decisions (policy, decision): bounded by the config's names.
        self.auth_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.policy_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        # Per identity object: (issuer config name, identity header lines). A cached
        # token yields the same Identity object, so a repeat caller is one lookup.
        self.identity_info: dict[object, tuple[str | None, bytes]] = {}
        # Rate-limit buckets: the gateway's, not a config's, so a reload keeps them.
        # ``shared_buckets`` (path, max_keys): the table in a file that every worker of
        # ``--workers N`` maps (the supervisor makes it), so they share one bucket per key.
        self.shared_buckets = shared_buckets
        self.buckets = self._new_buckets(config) if config.rate_limits else None
        # [limits_store] type = "redis": the shared buckets, whose client runs in the
        # serve nursery (None until serve starts, and with the local store). Its
        # connection may be borrowed for other scripts (``redis_limits.client``). A
        # reload with the same store keeps it; another store replaces it.
        self.redis_limits: RedisBuckets | None = None
        self._redis_budgets: RedisBudgets | None = None
        # Budget counters: the gateway's, kept over reloads; a file in state_dir (which a
        # reload cannot move: the table opened at start stays) or memory.
        self.budget_table = _budget_table(config) if config.budgets else None
        # The wall clock budget windows are computed from (tests put theirs here).
        self.wall_clock: Callable[[], float] = time.time
        self._redis_store: LimitsStoreConfig | None = None
        self._redis_scope: trio.CancelScope | None = None
        # The clock rate limits read (trio's, so the mock clock drives the tests); bound
        # once, since trio.current_time() walks three Python calls.
        self.clock: Any = None
        # The time rate limits take at: trio's clock (serve() binds it) for a private
        # table; for a shared one CLOCK_MONOTONIC, the one time base of every process
        # on the machine (trio's clock adds a random offset per process).
        self.limit_now: Callable[[], float] = time.monotonic
        self._admin: AdminServer | None = None
        # The coarse clock every connection computes its deadlines from; the watchdog
        # advances it each tick.
        self.now = 0.0
        self.last_tick_monotonic = time.monotonic()  # read by the admin thread (/healthz)

    def redis_budgets(self) -> RedisBudgets | None:
        """The budgets' Redis store, over the rate limits' connection ([limits_store]);
        None while that client is not there (not serving yet): the local table then."""
        rl = self.redis_limits
        if rl is None:
            return None
        rb = self._redis_budgets
        if rb is None or rb.client is not rl.client:
            from fastgw.policy.redis_budgets import RedisBudgets

            store = self.state.config.limits_store
            rb = self._redis_budgets = RedisBudgets(
                rl.client,
                prefix=store.prefix.encode(),
                timeout_s=store.timeout_s,
                on_failure=store.on_failure,
                local=self.budget_table,
            )
        return rb

    def _new_buckets(self, config: GatewayConfig) -> BucketTable:
        if self.shared_buckets is not None:
            path, max_keys = self.shared_buckets
            return BucketTable(max_keys, path)
        return BucketTable(config.max_limit_keys)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Gateway:
        """Raises fastgw.errors.ConfigError naming every problem."""
        from fastgw.config.loader import load_config

        return cls(load_config(path))

    @property
    def config(self) -> GatewayConfig:
        return self.state.config

    # -- counters -----------------------------------------------------------------------

    def next_request_id(self) -> bytes:
        """A process-unique id: a random per-process prefix and a counter (cheap; the
        prefix keeps ids from different workers and restarts apart)."""
        self._rid_counter += 1
        return b"%b%010x" % (self._rid_prefix, self._rid_counter)

    def count_error(self, code: str) -> None:
        self.errors[code] += 1

    def readiness(self) -> tuple[bool, list[str]]:
        """Ready when the config is loaded, every listener is bound and accepting, every
        token issuer's keys are loaded and every upstream credential is at hand (a
        gateway serves before that, answering 503 for what is missing; readiness tells a
        load balancer to wait)."""
        why = []
        if self.draining:
            why.append("draining")
        if not self._listeners or any(lst.closed for lst in self._listeners.values()):
            why.append("listeners not bound")
        v = self.state.verifier
        if v is not None:
            for iss in self.state.config.identity.issuers:
                if not v.ready(iss.name):
                    why.append(f"issuer {iss.name}: keys not loaded")
        # Likewise an upstream credential not (or no longer) at hand: its requests get
        # 503 upstream_credential_unavailable. (Read from the admin thread: plain reads
        # of floats and references the cache's task replaces whole.)
        shown = set()
        for cb in list(self.state.credentials.values()):
            cache = cb.cache
            if id(cache) not in shown and cache.current(self.now) is None:
                shown.add(id(cache))
                aud = f" for {cache.audience}" if cache.audience else ""
                why.append(f"backend {cb.backend_name}: upstream credential{aud} not available")
        return not why, why

    def statistics(self) -> dict[str, object]:
        return {
            "connections": len(self.connections),
            "errors": dict(self.errors),
            "responses": {
                f"{i}xx": n
                for i in range(1, 6)
                if (
                    n := self.unrouted_counts[i]
                    + sum(r.status_counts[i] for r in self.state.router.routes)
                )
            },
            "draining": self.draining,
        }

    # -- serving ------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind every listener, report the bound addresses through ``task_status``, and
        serve until cancelled. Raises OSError when a listener cannot be bound."""
        listeners = self._bind_all(self.state.config.listeners, {})
        self._limiter = trio.CapacityLimiter(self.state.limits.max_connections)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._listeners = listeners
                for lst in listeners.values():
                    self._start_listener(lst)
                self.now = trio.current_time()
                self.clock = trio.lowlevel.current_clock()
                if self.shared_buckets is None:
                    self.limit_now = self.clock.current_time
                self.trio_token = trio.lowlevel.current_trio_token()
                nursery.start_soon(self._watchdog)
                self._start_health_checks(self.state)
                self._serving = True
                if self.credentials is not None:
                    await nursery.start(self.credentials.run)
                if self.audit is not None:
                    nursery.start_soon(self.audit.run)
                self._start_verifier(self.state)
                self._apply_limits_store(self.state.config)
                admin_cfg = self.state.config.admin
                if admin_cfg is not None:
                    from fastgw.admin import AdminServer

                    self._admin = AdminServer(self, admin_cfg.host, admin_cfg.port)
                    self._admin.start()
                    self.admin_address = self._admin.address
                task_status.started(self.addresses)
        finally:
            self.redis_limits = None
            self._redis_store = None
            self._redis_scope = None
            if self._admin is not None:
                self._admin.close()
                self._admin = None
            for lst in self._listeners.values():
                lst.close()
            for b in self.state.backends.values():
                b.close()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound address of each listener, in config order."""
        return [lst.address for lst in self._listeners.values()]

    def reload(self, config: GatewayConfig) -> None:
        """Swap to ``config`` atomically: requests in flight finish on the state they
        began with, new ones use the new state; listeners are added or removed (one
        whose address is unchanged keeps its socket and takes the new TLS settings);
        backends with unchanged configuration keep their warm pools; counters of routes
        and backends that keep their names carry over. Raises OSError (a new listener
        cannot be bound) or ssl.SSLError/OSError (its certificate cannot be loaded), in
        which case nothing changed."""
        fresh = self._bind_all(config.listeners, self._listeners)
        self._need_credentials(config)
        try:
            state = GatewayState(config, previous=self.state, registry=self.credentials)
        except BaseException:
            for key, lst in fresh.items():
                if key not in self._listeners:
                    lst.close()
            if self.credentials is not None:
                self.credentials.retain(self.state.credential_keys)
            raise
        if self.buckets is None and config.rate_limits:
            self.buckets = self._new_buckets(config)
        if self.budget_table is None and config.budgets:
            self.budget_table = _budget_table(config)
        old_state, old_listeners = self.state, self._listeners
        self.state = state
        if self.credentials is not None:
            self.credentials.retain(state.credential_keys)
        self._listeners = fresh
        self._limiter.total_tokens = config.limits.max_connections
        for key, lst in old_listeners.items():
            if key not in fresh:
                lst.close()
        for key, lst in fresh.items():
            if key not in old_listeners:
                self._start_listener(lst)
        kept = {id(b) for b in state.backends.values()}
        for b in old_state.backends.values():
            if id(b) not in kept:
                b.close()  # busy connections close when their exchange releases them
        self._start_health_checks(state)
        if old_state.verifier is not state.verifier:
            if old_state.verifier is not None:
                scope = self._verifier_scopes.pop(id(old_state.verifier), None)
                if scope is not None:
                    scope.cancel()
            self._start_verifier(state)
        if self._redis_scope is not None or config.limits_store.type == "redis":
            self._apply_limits_store(config)
        self.reloads_ok += 1
        self.last_reload_ok_unix = time.time()

    def _need_credentials(self, config: GatewayConfig) -> None:
        """Make (and, when serving, start) the credential registry the first time a
        config has an upstream credential."""
        if self.credentials is not None or not any(
            b.credential is not None for b in config.backends.values()
        ):
            return
        from fastgw.upstream.credentials import CredentialRegistry

        self.credentials = CredentialRegistry()
        if self._serving:
            self._nursery.start_soon(self.credentials.run)

    def _bind_all(
        self, configs: Sequence[ListenerConfig], current: dict[tuple, _Listener]
    ) -> dict[tuple, _Listener]:
        out: dict[tuple, _Listener] = {}
        try:
            for lc in configs:
                # Port 0 means "any port": such listeners are told apart by name.
                key = (lc.host, lc.port) if lc.port else (lc.host, 0, lc.name)
                ctx = _listener_tls_context(lc) if lc.tls else None
                prev = current.get(key)
                if prev is not None:
                    out[key] = prev
                    prev.update(lc, ctx)
                else:
                    out[key] = _Listener(lc, _bind(lc, self.reuse_port), ctx)
        except BaseException:
            for key, lst in out.items():
                if key not in current:
                    lst.close()
            raise
        return out

    def _apply_limits_store(self, config: GatewayConfig) -> None:
        """Open, keep or replace the Redis client of the shared rate limits (a changed
        store opens a new client, which is in place at once and answers by its failure
        policy until it has connected; the old one's connection closes)."""
        store = config.limits_store
        if store.type != "redis":
            store_or_none = None
        else:
            store_or_none = store
        if store_or_none == self._redis_store and (
            store_or_none is None or self.redis_limits is not None
        ):
            return
        if self._redis_scope is not None:
            self._redis_scope.cancel()
            self._redis_scope = None
        self.redis_limits = None
        self._redis_store = store_or_none
        if store_or_none is None:
            return
        from fastgw.policy.redis_limits import redis_buckets

        if self.buckets is None:
            self.buckets = self._new_buckets(config)
        shared = redis_buckets(
            store.address,
            password=store.password,
            username=store.username,
            db=store.database,
            prefix=store.prefix.encode(),
            timeout_s=store.timeout_s,
            on_failure=store.on_failure,
            # on_failure = "local" takes from the gateway's own table (a private one when
            # the workers share theirs: the fallback reads trio's clock, not theirs).
            local=self.buckets if self.shared_buckets is None else None,
        )
        scope = trio.CancelScope()
        self._redis_scope = scope
        self.redis_limits = shared

        async def run() -> None:
            with scope:
                await shared.client.run()

        self._nursery.start_soon(run)

    def _start_verifier(self, state: GatewayState) -> None:
        """Run the state's key fetchers (if it has a verifier not running yet) in their
        own cancel scope, so a reload that replaces the issuers can stop them."""
        v = state.verifier
        if v is None or id(v) in self._verifier_scopes:
            return
        scope = trio.CancelScope()
        self._verifier_scopes[id(v)] = scope

        async def run() -> None:
            with scope:
                await v.run()

        # Not awaited: the gateway serves while an identity provider is down (requests
        # for that issuer get 503 until its keys arrive).
        self._nursery.start_soon(run)

    def _start_health_checks(self, state: GatewayState) -> None:
        """Start the active health checker of each backend that has one configured and
        none running yet (a backend kept over a reload keeps its checker); it stops
        when the backend is closed (its scope is cancelled)."""
        for b in state.backends.values():
            if b.config.health_check is None or b.health_scope is not None:
                continue
            scope = b.health_scope = trio.CancelScope()

            async def run(b: Backend = b, scope: trio.CancelScope = scope) -> None:
                from fastgw.upstream.health import run_health_checks

                with scope:
                    await run_health_checks(b)

            self._nursery.start_soon(run)

    def _start_listener(self, lst: _Listener) -> None:
        lst.scope = trio.CancelScope()
        self._nursery.start_soon(self._accept_loop, lst)

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Stop accepting, close idle keep-alive connections, let requests in flight
        finish (their responses carry Connection: close). Returns True when every
        connection closed within ``timeout_s`` (default: the config's drain timeout)."""
        self.draining = True
        for lst in self._listeners.values():
            lst.close()
        for d in list(self.connections):
            if d.idle and d.scope is not None:
                d.scope.cancel()
        if timeout_s is None:
            timeout_s = self.state.config.drain_timeout_s
        with trio.move_on_after(timeout_s):
            await self._no_connections.wait()
            return True
        return False

    async def _watchdog(self) -> None:
        """Advance the coarse clock, cancel connections past their deadline, and once a
        second close pooled connections past their idle timeout (so sockets do not
        linger until the next request notices)."""
        ticks = 0
        while True:
            await trio.sleep(WATCHDOG_TICK_S)
            now = self.now = trio.current_time()
            self.last_tick_monotonic = time.monotonic()
            # A deadline computed from the coarse clock may be up to one tick early:
            # give it one more tick, so a timeout is never shorter than configured.
            late = now - WATCHDOG_TICK_S
            for d in self.connections:
                if d.deadline <= late and d.scope is not None:
                    d.scope.cancel()
            for b in self.state.backends.values():
                if b.queue:
                    # A pause or an ejection that ended frees capacity without any
                    # release: hand it to the waiters (upstream/backend.py).
                    b.state_changed()
                if b.config.keep_warm_interval_s is not None:
                    maybe_keep_warm(self, b, now)  # upstream/retry.py
            ticks += 1
            if ticks % 10 == 0:
                for b in self.state.backends.values():
                    b.expire_idle(now)
            if ticks % 600 == 0 and self.state.verifier is not None:
                self.state.verifier.cache_prune(time.time())  # drop expired tokens

    async def _accept_loop(self, lst: _Listener) -> None:
        """Accept in bursts: up to ACCEPT_BURST connections per wake-up without yielding
        (a yield per accept lets a thousand busy connections starve the listener; HAProxy
        accepts up to tune.maxaccept = 64 per wake-up for the same reason)."""
        lsock = lst.sock
        limiter = self._limiter
        nursery = self._nursery
        assert lst.scope is not None
        with lst.scope:
            while not self.draining and not lst.closed:
                try:
                    await trio.lowlevel.wait_readable(lsock)
                except (trio.ClosedResourceError, OSError):
                    return
                for _ in range(ACCEPT_BURST):
                    token = object()
                    try:
                        limiter.acquire_on_behalf_of_nowait(token)
                    except trio.WouldBlock:
                        await limiter.acquire_on_behalf_of(token)  # at max_connections
                    try:
                        sock, addr = lsock.accept()
                    except BlockingIOError:
                        limiter.release_on_behalf_of(token)
                        break
                    except OSError as e:
                        limiter.release_on_behalf_of(token)
                        if self.draining or lst.closed:
                            return
                        # EMFILE and friends: back off briefly rather than spin.
                        log.warning("accept failed on %s: %s", lst.config.name, e)
                        await trio.sleep(0.05)
                        break
                    nursery.start_soon(self._connection, sock, addr, lst.proto, lst.ctx, token)

    async def _connection(
        self,
        sock: socket.socket,
        addr: tuple,
        proto: bytes,
        ctx: ssl.SSLContext | None,
        token: object,
    ) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        t: PlainTransport
        if ctx is None:
            t = PlainTransport(sock)
        else:
            t = TLSTransport(sock, ctx, server_side=True)
        d = Downstream(self, t, addr[0].encode(), proto)
        self.connections.add(d)
        if self._no_connections.is_set():
            self._no_connections = trio.Event()
        try:
            with trio.CancelScope() as scope:
                d.scope = scope
                try:
                    if ctx is not None:
                        d.deadline = self.now + self.state.limits.head_timeout_s
                        try:
                            await t.handshake()  # type: ignore[attr-defined]
                        except (ssl.SSLError, OSError):
                            self.count_error("tls_handshake_failed")
                            return
                    await d.run()
                except ProtocolError as e:
                    self.count_error(f"http_{e.status}")
                    await d.send_error(
                        e.status,
                        "bad_request" if e.status == 400 else "protocol_error",
                        e.detail,
                        self.next_request_id(),
                        close=True,
                    )
                except OSError:
                    self.count_error("client_reset")
                except Exception:
                    log.exception("internal error on a client connection")
                    self.count_error("internal")
                    if not d.answered:
                        await d.send_error(
                            500, "internal_error", "internal error", d.rid, close=True
                        )
            # The admission slot goes back before the answer and the lingering close
            # (up to seconds with a slow client): the next request may have it now.
            if d.slot is not None:
                d.release_slot()
            if scope.cancelled_caught:
                with trio.move_on_after(1.0):
                    await d.answer_timeout()
            if d.upconn is not None:
                d.upconn.pool.release(d.upconn, False)
                d.upconn = None
            if d.linger:
                await _lingering_close(t)
        finally:
            if d.upconn is not None:
                d.upconn.pool.release(d.upconn, False)
                d.upconn = None
            if d.slot is not None:
                d.release_slot()
            t.close()
            self.connections.discard(d)
            self._limiter.release_on_behalf_of(token)
            if not self.connections:
                self._no_connections.set()


# Lingering close (as nginx does): after answering an error and closing, a client may
# still be sending its body; closing with unread bytes makes the kernel send a RST that
# can destroy the answer before the client reads it. Half-close, then read and drop what
# still arrives, for at most 2 s and 1 MiB (nginx: lingering_time 30 s, lingering_timeout
# 5 s; a gateway under attack should not hold sockets that long).
_LINGER_S = 2.0
_LINGER_BYTES = 1 << 20


async def _lingering_close(t: PlainTransport) -> None:
    if t.closed:
        return
    try:
        t.sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    left = _LINGER_BYTES
    with trio.move_on_after(_LINGER_S):
        try:
            while left > 0:
                data = await t.recv()
                if not data:
                    return
                left -= len(data)
        except (OSError, ssl.SSLError):
            return


class _Listener:
    """A bound listening socket and what its connections need (TLS context, proto)."""

    __slots__ = ("address", "closed", "config", "ctx", "proto", "scope", "sock")

    def __init__(
        self, config: ListenerConfig, sock: socket.socket, ctx: ssl.SSLContext | None
    ) -> None:
        self.sock = sock
        self.address: tuple[str, int] = sock.getsockname()[:2]
        self.closed = False
        self.scope: trio.CancelScope | None = None
        self.update(config, ctx)

    def update(self, config: ListenerConfig, ctx: ssl.SSLContext | None) -> None:
        self.config = config
        self.ctx = ctx
        self.proto = b"https" if ctx is not None else b"http"

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.scope is not None:
                self.scope.cancel()
            try:
                trio.lowlevel.notify_closing(self.sock)
            except RuntimeError:
                pass  # outside trio (never served)
            self.sock.close()


def _bind(lc: ListenerConfig, reuse_port: bool) -> socket.socket:
    infos = socket.getaddrinfo(lc.host, lc.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            # Lets --workers N processes share the port (the kernel spreads connections).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        # 1024: above the common net.core.somaxconn default of 4096 the kernel caps it.
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bound_urls(addresses: Sequence[tuple[str, int]], tls: Sequence[bool]) -> list[str]:
    out = []
    for (host, port), is_tls in zip(addresses, tls, strict=True):
        h = f"[{host}]" if ":" in host else host
        out.append(f"{'https' if is_tls else 'http'}://{h}:{port}")
    return out
