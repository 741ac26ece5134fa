"""Upstream credentials: the token or key fastgw attaches to a request to a function.

Strategy. A *source* (``CredentialSource``) knows how to get one credential, slowly:
a metadata server, a token endpoint, a file. A *cache* (``CredentialCache``) holds the
credential for one (source, audience) pair and is the only thing that ever calls its
source: one background trio task per cache fetches, installs and schedules the next
fetch. The hot path never awaits and never fetches; it asks ``cache.current(now)``,
which is one attribute read and one float comparison, and gets the credential or None
(the caller answers 503). So, by construction:

- one fetch at a time per audience (single-flight): only the cache's task fetches, and
  a thousand requests arriving at once all read the same attribute;
- refresh ahead of expiry: at ``refresh_at_fraction`` (75 %) of the lifetime, less up to
  ``jitter_fraction`` (5 %) of it at random, so gateways started together spread their
  fetches over the last stretch before the 75 % mark instead of hitting the token
  endpoint in the same second;
- a failed refresh keeps the old credential until it expires and retries with
  exponential backoff and jitter (1 s doubling to 60 s, each delay drawn from its upper
  half), but while the old credential lives never waits more than half its remaining
  time (nor less than 1 s), so retries still land before it expires;
- never handed out once expired: ``current`` compares against ``expires_at`` less a
  margin (5 s, at most a tenth of the lifetime), which covers the gateway's coarse clock
  lagging by a watchdog tick, a request's time in flight and a little clock skew
  between us and the function's verifier.

Time. ``now`` everywhere is trio's clock (``trio.current_time()``, the domain of the
gateway's ``gw.now``), so tests drive the schedule with ``MockClock``. Credentials carry
wall-clock expiries (JWT ``exp``, AWS ``Expiration``); sources convert them to trio's
clock when they fetch, using an injectable ``wall`` function (``time.time`` by default),
and take the smaller of "exp minus our wall clock" and "exp minus iat" when both exist,
so a fast or slow local clock cannot stretch a credential's life.

Rendering. Token credentials become header lines for the core serializer:
``BearerHeader.render(cred, caller_authorization)`` gives the ``extra=`` bytes for
``build_request_head`` and ``BearerHeader.strip_names`` the names to add to its
``StripSet`` (the caller's own copies of the fields we set must never reach the
function). SigV4 lives in ``fastgw.upstream.sigv4`` (signer) and ``fastgw.upstream.aws``
(its credential sources); Google ID tokens in ``fastgw.upstream.google``.

Plugging into the data path (sketch)::

    cache = registry.get_or_create(key, lambda: CredentialCache(source, audience))
    ...
    cred = cache.current(gw.now)          # hot path: no await
    if cred is None:                      # nothing valid: 503 (or, cold start only,
        ...                               # await cache.wait_current() under a timeout)
    extra = header.render(cred, head.get(b"authorization") if header.forwards else None)
    up_head = build_request_head(head, ..., extra=extra + route.req_extra,
                                 strip=strip_for_route_and_backend)

Counters: ``statistics(now)`` (refreshes ok/failed, consecutive failures, credential
age, time to expiry, last error); ``fastgw.metrics`` reads them at scrape time.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

import trio

__all__ = [
    "BearerHeader",
    "Credential",
    "CredentialCache",
    "CredentialError",
    "CredentialRegistry",
    "CredentialSource",
    "CredentialStatistics",
    "FileTokenSource",
    "FileWatch",
    "RefreshPolicy",
    "StaticTokenSource",
    "TokenCredential",
    "azure_function_key_header",
    "checked_token",
    "expires_at_from_claims",
    "google_header",
    "unverified_claims",
]

log = logging.getLogger("fastgw.upstream.credentials")

# 8 KiB per credential value: Google ID tokens are ~1 KiB, AWS session tokens up to
# ~2 KiB; 8 KiB is nginx's default large_client_header_buffers size, past which a
# function's front end may refuse the header anyway.
MAX_TOKEN_CHARS = 8192
# Visible ASCII only (RFC 9110 5.5 field-vchar without obs-text): no space, CR, LF or NUL
# can reach a header line we build, whatever a file or a server handed us.
_TOKEN_RE = re.compile(r"[\x21-\x7e]+\Z")
# RFC 9110 5.1 field-name (token).
_FIELD_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Files are checked at most once a second: a stat per second per file costs nothing,
# and a rotated secret is picked up within a second (Kubernetes itself takes up to a
# minute to project an updated Secret into a pod).
FILE_POLL_INTERVAL_S = 1.0


class CredentialError(Exception):
    """A source could not produce a credential; ``str(e)`` says why, without secrets."""


@dataclass(frozen=True, slots=True, eq=False)
class Credential:
    """What a source produced. Times are on trio's clock; ``expires_at`` is ``math.inf``
    for credentials that do not expire (keys, static tokens). Compared by identity:
    a cache hands out the same object until the next refresh, so renderers memoise
    per object."""

    obtained_at: float
    expires_at: float

    @property
    def lifetime_s(self) -> float:
        return self.expires_at - self.obtained_at


@dataclass(frozen=True, slots=True, eq=False)
class TokenCredential(Credential):
    """A bearer token or key sent as a header value (Google ID token, Azure function
    key, static bearer token)."""

    token: str

    def __repr__(self) -> str:  # never print the secret
        return f"TokenCredential(obtained_at={self.obtained_at}, expires_at={self.expires_at})"


C = TypeVar("C", bound=Credential)
C_co = TypeVar("C_co", bound=Credential, covariant=True)
T = TypeVar("T")


class CredentialSource(Protocol[C_co]):
    """Gets a credential, on the cold path.

    ``refresh(now)`` returns a credential obtained at ``now`` (trio's clock) or raises
    ``CredentialError``; it may take as long as the network takes (the cache bounds it
    with ``fetch_timeout_s``). A source whose credential can change without expiring
    (a file) sets ``poll_interval_s`` and returns the *same object* when nothing
    changed; others set it to None."""

    @property
    def kind(self) -> str: ...
    @property
    def poll_interval_s(self) -> float | None: ...
    async def refresh(self, now: float) -> C_co: ...


def checked_token(value: str, what: str) -> str:
    """``value`` when it is fit to put in a header (visible ASCII, 1..8192 chars);
    raises CredentialError naming ``what`` otherwise (never echoing the value)."""
    if not value:
        raise CredentialError(f"{what} is empty")
    if len(value) > MAX_TOKEN_CHARS:
        raise CredentialError(f"{what} is over {MAX_TOKEN_CHARS} characters")
    if not _TOKEN_RE.match(value):
        raise CredentialError(f"{what} contains characters not allowed in a header value")
    return value


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, *not verified*. Raises CredentialError when it is not one.

    We only read ``exp``/``iat``/``aud`` to schedule refreshes and to check that a
    token is for the audience we asked: the token came over verified TLS straight from
    the issuer (or from a file the operator put there), and the function verifies its
    signature; checking it here would need the issuer's keys and prove nothing more."""
    import jwt  # here, not at import: a gateway without JWT-shaped credentials or
    # token issuers never loads PyJWT and cryptography (about 12 MiB of RSS)

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as e:
        raise CredentialError(f"not a JWT ({e})") from None
    return claims


def _number(claims: dict[str, Any], name: str) -> float | None:
    v = claims.get(name)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def expires_at_from_claims(claims: dict[str, Any], now: float, wall: Callable[[], float]) -> float:
    """``exp`` converted to trio's clock: ``now`` plus the smaller of ``exp - wall()``
    and ``exp - iat``. Raises CredentialError when there is no numeric ``exp``."""
    exp = _number(claims, "exp")
    if exp is None:
        raise CredentialError("token has no numeric exp claim")
    remaining = exp - wall()
    iat = _number(claims, "iat")
    if iat is not None and iat <= exp:
        remaining = min(remaining, exp - iat)
    return now + remaining


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    """When a cache fetches. Defaults, and where they come from:

    - ``refresh_at_fraction`` 0.75: the issue's default (Google's libraries refresh a
      1 h token 3m45s early; botocore 15 min early: both well inside the last quarter);
    - ``jitter_fraction`` 0.05: refresh between 70 % and 75 % of the lifetime;
    - ``expiry_margin_s`` 5: see the module docstring; never more than a tenth of
      the lifetime, so a 10 s credential stays usable for 9 s;
    - ``backoff_initial_s`` 1 and ``backoff_max_s`` 60: google-auth's retry starts at
      1 s and doubles; a 60 s cap still gives a 1 h token ~15 retries in its last
      quarter, and a 10 s credential a first retry within its lifetime;
    - ``fetch_timeout_s`` 10: metadata servers answer in milliseconds, token endpoints
      well under a second; 10 s is far above both and far below any refresh margin;
    - ``min_refresh_interval_s`` 1: floor between successful fetches, so a source
      handing out nearly expired credentials cannot make the cache spin;
    - ``forced_refresh_interval_s`` 30: ``request_refresh`` (the function answered 401
      to our credential, see ``Pool.credential_refused``) fetches early at most this
      often, so a function that always answers 401 costs at most two extra fetches a
      minute per credential, not one per request. The first refusal is acted on at
      once, so a token the function stopped accepting (a rotated key) is replaced
      within one fetch; 30 s is the gap before a second try, long enough for a token
      source's own caches (a metadata server's, a file being rotated) to settle.
    """

    refresh_at_fraction: float = 0.75
    jitter_fraction: float = 0.05
    expiry_margin_s: float = 5.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    fetch_timeout_s: float = 10.0
    min_refresh_interval_s: float = 1.0
    forced_refresh_interval_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0.0 < self.refresh_at_fraction < 1.0:
            raise ValueError("refresh_at_fraction must be between 0 and 1 (exclusive)")
        if not 0.0 <= self.jitter_fraction < self.refresh_at_fraction:
            raise ValueError("jitter_fraction must be >= 0 and below refresh_at_fraction")
        for name in ("backoff_initial_s", "fetch_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        for name in ("expiry_margin_s", "min_refresh_interval_s", "forced_refresh_interval_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0")


@dataclass(frozen=True, slots=True)
class CredentialStatistics:
    kind: str
    audience: str
    refreshes_ok: int
    refreshes_failed: int
    consecutive_failures: int
    usable: bool
    age_s: float | None  # since the current credential was obtained; None without one
    expires_in_s: float | None  # inf for credentials that do not expire
    next_attempt_in_s: float | None
    last_error: str | None


class CredentialCache(Generic[C]):
    """The credential for one (source, audience), kept fresh by ``run``.

    ``current(now)`` is the hot path. ``run`` is the one task that fetches; start it
    with ``await nursery.start(cache.run)`` (it reports started at once, so a slow or
    dead token endpoint does not hold up the gateway's start). ``wait_current`` is for
    the cold start: it waits for the task's next attempt, never fetches itself."""

    __slots__ = (
        "_attempted",
        "_cred",
        "_failures",
        "_fetching",
        "_last_forced",
        "_next_attempt_at",
        "_rng",
        "_running",
        "_usable_until",
        "_wake",
        "audience",
        "last_error",
        "policy",
        "refreshes_failed",
        "refreshes_ok",
        "source",
    )

    def __init__(
        self,
        source: CredentialSource[C],
        audience: str = "",
        policy: RefreshPolicy | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.source = source
        self.audience = audience
        self.policy = policy or RefreshPolicy()
        self._rng = rng or random.Random()
        self._cred: C | None = None
        self._usable_until = -math.inf
        self._next_attempt_at = -math.inf
        self._failures = 0
        self._fetching = False
        self._running = False
        self._last_forced = -math.inf
        self._attempted = trio.Event()
        self._wake = trio.Event()
        self.refreshes_ok = 0
        self.refreshes_failed = 0
        self.last_error: str | None = None

    # --- hot path -----------------------------------------------------------------

    def current(self, now: float) -> C | None:
        """The credential to send now, or None when there is no unexpired one (the
        caller answers 503). Never blocks, never fetches."""
        if now < self._usable_until:
            return self._cred
        return None

    # --- cold path ----------------------------------------------------------------

    async def wait_current(self) -> C:
        """The credential, waiting for the refresh task's attempts until one yields a
        usable credential. Never fetches itself (so a burst of callers at a cold start
        causes one fetch); never gives up: bound it with a timeout. Waits forever if
        ``run`` is not running."""
        while True:
            cred = self.current(trio.current_time())
            if cred is not None:
                return cred
            await self._attempted.wait()

    def request_refresh(self, now: float) -> bool:
        """Ask for an early refresh (the function rejected the credential). Honoured at
        most once per ``forced_refresh_interval_s`` and not while a fetch is in flight
        (that fetch is the refresh). Returns whether it was honoured."""
        if self._fetching or now - self._last_forced < self.policy.forced_refresh_interval_s:
            return False
        self._last_forced = now
        self._next_attempt_at = now
        self._wake.set()
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fetch, install, sleep until the next refresh or retry; forever. Cancel the
        enclosing scope to stop it. Raises RuntimeError if already running."""
        if self._running:
            raise RuntimeError("this credential cache is already running")
        self._running = True
        try:
            task_status.started()
            while True:
                await self._attempt()
                if not self._wake.is_set():
                    with trio.move_on_at(self._next_attempt_at):
                        await self._wake.wait()
                self._wake = trio.Event()
        finally:
            self._running = False

    async def _attempt(self) -> None:
        policy = self.policy
        now = trio.current_time()
        self._fetching = True
        self._wake = trio.Event()
        reason: str | None = None
        cred: C | None = None
        try:
            with trio.fail_after(policy.fetch_timeout_s):
                cred = await self.source.refresh(now)
        except trio.TooSlowError:
            reason = f"no credential within {policy.fetch_timeout_s:g} s"
        except CredentialError as e:
            reason = str(e) or "refresh failed"
        except Exception as e:  # a source bug must not take the gateway down: keep the
            # old credential, count it, say what happened.
            reason = f"{type(e).__name__}: {e}"
        finally:
            self._fetching = False
        end = trio.current_time()
        if cred is not None:
            reason = self._install(cred, end)
        if reason is not None:
            self._failed(reason, end)
        done, self._attempted = self._attempted, trio.Event()
        done.set()

    def _install(self, cred: C, end: float) -> str | None:
        """Install ``cred`` and schedule the next attempt; or say why it is unusable."""
        policy = self.policy
        lifetime = cred.lifetime_s
        if math.isinf(cred.expires_at):
            usable_until = math.inf
        else:
            usable_until = cred.expires_at - min(policy.expiry_margin_s, lifetime * 0.1)
        if not usable_until > end:
            return f"{self.source.kind} returned a credential that has expired or is about to"
        if cred is not self._cred:
            self.refreshes_ok += 1
        self._cred = cred
        self._usable_until = usable_until
        self._failures = 0
        self.last_error = None
        if math.isinf(usable_until):
            nxt = math.inf
        else:
            frac = policy.refresh_at_fraction - policy.jitter_fraction * self._rng.random()
            nxt = max(cred.obtained_at + lifetime * frac, end + policy.min_refresh_interval_s)
        poll = self.source.poll_interval_s
        if poll is not None:
            nxt = min(nxt, end + poll)
        self._next_attempt_at = nxt
        return None

    def _failed(self, reason: str, end: float) -> None:
        policy = self.policy
        self._failures += 1
        self.refreshes_failed += 1
        self.last_error = reason
        cap = min(policy.backoff_max_s, policy.backoff_initial_s * 2.0 ** (self._failures - 1))
        delay = cap * (0.5 + 0.5 * self._rng.random())
        usable = end < self._usable_until
        if usable:
            # While the old credential lives, the next try lands before it expires:
            # at most half the time left (but not sooner than the initial backoff).
            delay = min(delay, max(policy.backoff_initial_s, (self._usable_until - end) / 2))
        poll = self.source.poll_interval_s
        if poll is not None:  # a file: look for the fix once per poll interval
            delay = poll
        self._next_attempt_at = end + delay
        log.warning(
            "%s credential refresh failed (%s)%s; retrying in %.1f s",
            self.source.kind,
            reason,
            " (still using the previous one)" if usable else "",
            delay,
        )

    def statistics(self, now: float) -> CredentialStatistics:
        cred = self._cred
        return CredentialStatistics(
            kind=self.source.kind,
            audience=self.audience,
            refreshes_ok=self.refreshes_ok,
            refreshes_failed=self.refreshes_failed,
            consecutive_failures=self._failures,
            usable=now < self._usable_until,
            age_s=None if cred is None else now - cred.obtained_at,
            expires_in_s=None if cred is None else cred.expires_at - now,
            next_attempt_in_s=(
                None if math.isinf(self._next_attempt_at) else self._next_attempt_at - now
            ),
            last_error=self.last_error,
        )


class CredentialRegistry:
    """One cache per key, shared by every endpoint that needs the same credential,
    and the task that runs them all. Keys are what makes two credentials the same:
    e.g. ``("google_id_token", "metadata", metadata_url, audience)``. A reload calls
    ``get_or_create`` for the new config's keys (existing caches, and their tokens,
    carry over) and then ``retain`` to stop the rest."""

    def __init__(self) -> None:
        self._caches: dict[Hashable, CredentialCache[Any]] = {}
        self._scopes: dict[Hashable, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None

    def get_or_create(
        self, key: Hashable, make: Callable[[], CredentialCache[C]]
    ) -> CredentialCache[C]:
        cache = self._caches.get(key)
        if cache is None:
            cache = self._caches[key] = make()
            if self._nursery is not None:
                self._start(key, cache)
        return cast(CredentialCache[C], cache)

    def retain(self, keys: Iterable[Hashable]) -> None:
        """Stop and forget every cache whose key is not in ``keys``."""
        keep = set(keys)
        for key in [k for k in self._caches if k not in keep]:
            del self._caches[key]
            scope = self._scopes.pop(key, None)
            if scope is not None:
                scope.cancel()

    def caches(self) -> dict[Hashable, CredentialCache[Any]]:
        return dict(self._caches)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for key, cache in self._caches.items():
                    self._start(key, cache)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def _start(self, key: Hashable, cache: CredentialCache[Any]) -> None:
        assert self._nursery is not None
        scope = self._scopes[key] = trio.CancelScope()

        async def runner() -> None:
            with scope:
                await cache.run()

        self._nursery.start_soon(runner)


# --- rendering ----------------------------------------------------------------------


class BearerHeader:
    """Renders a ``TokenCredential`` as header lines for ``build_request_head(extra=)``.

    ``name``/``scheme``: ``Authorization: Bearer <token>`` (the default),
    ``X-Serverless-Authorization: Bearer <token>``, ``x-functions-key: <key>``
    (``scheme=None``). With ``forward_caller_as`` set (only for ``Authorization``), the
    caller's own Authorization value is moved to that field (Google's convention is
    ``X-Forwarded-Authorization``); with it None the caller's value is dropped.

    ``strip_names``: lowercase names the serializer must strip from the caller's
    request (our field, and the forward field so a caller cannot forge it). Add them
    to the route's ``StripSet``. ``forwards`` says whether ``render`` wants the
    caller's Authorization value (look it up only then).

    Per request ``render`` is one identity check and, when forwarding, one
    concatenation: the line for a credential is built once and memoised."""

    __slots__ = ("_fwd_prefix", "_memo_cred", "_memo_line", "_prefix", "forwards", "strip_names")

    def __init__(
        self,
        name: str = "Authorization",
        *,
        scheme: str | None = "Bearer",
        forward_caller_as: str | None = "X-Forwarded-Authorization",
    ) -> None:
        for n in (name, forward_caller_as):
            if n is not None and not _FIELD_NAME_RE.match(n):
                raise ValueError(f"not a valid header field name: {n!r}")
        if scheme is not None and not _FIELD_NAME_RE.match(scheme):
            raise ValueError(f"not a valid authentication scheme: {scheme!r}")
        if forward_caller_as is not None and name.lower() != "authorization":
            raise ValueError("forward_caller_as applies only when the field is Authorization")
        self._prefix = (name + ": " + (scheme + " " if scheme else "")).encode("ascii")
        self._fwd_prefix = (
            None if forward_caller_as is None else (forward_caller_as + ": ").encode("ascii")
        )
        self.forwards = forward_caller_as is not None
        names = [name.lower()]
        if forward_caller_as is not None:
            names.append(forward_caller_as.lower())
        self.strip_names: tuple[bytes, ...] = tuple(n.encode("ascii") for n in names)
        self._memo_cred: TokenCredential | None = None
        self._memo_line = b""

    def render(self, cred: TokenCredential, caller_authorization: bytes | None = None) -> bytes:
        """Header lines (each ending CRLF) carrying ``cred`` and, when forwarding, the
        caller's Authorization value (already validated by the request parser)."""
        if cred is not self._memo_cred:
            self._memo_line = self._prefix + cred.token.encode("ascii") + b"\r\n"
            self._memo_cred = cred
        if caller_authorization is not None and self._fwd_prefix is not None:
            return self._memo_line + self._fwd_prefix + caller_authorization + b"\r\n"
        return self._memo_line


def google_header(mode: str = "authorization") -> BearerHeader:
    """Where a Google ID token goes: ``"authorization"`` (caller's value moved to
    X-Forwarded-Authorization) or ``"x-serverless-authorization"`` (caller's
    Authorization passes untouched; Cloud Run checks this field first)."""
    if mode == "authorization":
        return BearerHeader("Authorization")
    if mode == "x-serverless-authorization":
        return BearerHeader("X-Serverless-Authorization", forward_caller_as=None)
    raise ValueError(f"unknown header mode {mode!r}")


def azure_function_key_header() -> BearerHeader:
    """``x-functions-key: <key>``; a caller's own x-functions-key is stripped."""
    return BearerHeader("x-functions-key", scheme=None, forward_caller_as=None)


# --- static and file-backed tokens ------------------------------------------------------


class StaticTokenSource:
    """A token that never changes (from an environment variable, resolved by the
    config loader). Never expires, never polled."""

    poll_interval_s: float | None = None

    def __init__(self, token: str, *, kind: str = "bearer_token", what: str = "token") -> None:
        self.kind = kind
        self._token = checked_token(token.strip(), what)
        self._cred: TokenCredential | None = None

    async def refresh(self, now: float) -> TokenCredential:
        if self._cred is None:
            self._cred = TokenCredential(obtained_at=now, expires_at=math.inf, token=self._token)
        return self._cred


class FileWatch(Generic[T]):
    """A value parsed from a file, re-read when the file changes, looked at at most once
    per ``FILE_POLL_INTERVAL_S``: a stat() whose (device, inode, size, mtime) differs
    from the last one means "read and parse it again". An atomic replace (rename,
    Kubernetes' symlink swap) changes the inode; an in-place rewrite the size or mtime
    (nanoseconds). The outcome, value or error, is kept until the file changes, so a
    broken file keeps failing (and a good one keeps its object) between changes.

    The stat and the read are plain blocking calls on the event loop: secret files are
    small and local (a Kubernetes secret volume is tmpfs) and this runs once a second
    at most."""

    __slots__ = (
        "_checked_at",
        "_error",
        "_parse",
        "_sig",
        "_value",
        "max_chars",
        "path",
        "reads",
        "stats",
    )

    def __init__(self, path: str, parse: Callable[[str, float], T], max_chars: int) -> None:
        self.path = path
        self.max_chars = max_chars
        self._parse = parse
        self._sig: tuple[int, int, int, int] | None = None
        self._value: T | None = None
        self._error: str | None = None
        self._checked_at = -math.inf
        self.stats = 0  # stat() calls (tests)
        self.reads = 0  # reads of the file (tests)

    def get(self, now: float) -> T:
        """The parsed value. Raises CredentialError (unreadable, or what ``parse``
        raised for the file's current contents)."""
        if now - self._checked_at >= FILE_POLL_INTERVAL_S or (
            self._value is None and self._error is None
        ):
            self._checked_at = now
            self._check(now)
        if self._error is not None:
            raise CredentialError(self._error)
        assert self._value is not None
        return self._value

    def _check(self, now: float) -> None:
        self.stats += 1
        try:
            st = os.stat(self.path)
        except OSError as e:
            self._sig = self._value = None
            self._error = f"{self.path}: {e.strerror or e}"
            return
        sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if sig == self._sig:
            return
        self._sig = sig
        self._value = None
        self.reads += 1
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read(self.max_chars + 1)
        except (OSError, UnicodeDecodeError) as e:
            self._error = f"{self.path}: {getattr(e, 'strerror', None) or e}"
            return
        if len(text) > self.max_chars:
            self._error = f"{self.path}: over {self.max_chars} characters"
            return
        try:
            self._value = self._parse(text, now)
            self._error = None
        except CredentialError as e:
            self._error = str(e)


class FileTokenSource:
    """A token (Azure function key, static bearer token) read from a file and re-read
    when the file changes (``FileWatch``: at most one stat() a second); leading and
    trailing whitespace is stripped. Unchanged, ``refresh`` returns the same credential
    object.

    With ``jwt_expiry`` (bearer files), a token that is a JWT with an ``exp`` claim
    expires then (read unverified, see ``unverified_claims``): a Kubernetes projected
    service-account token is rotated in the file and never sent past its ``exp``.
    Anything else never expires.

    Raises CredentialError (missing, unreadable, empty, too long, bad characters); an
    expired JWT comes back as a credential the cache refuses."""

    poll_interval_s: float | None = FILE_POLL_INTERVAL_S

    def __init__(
        self,
        path: str,
        *,
        kind: str = "bearer_file",
        jwt_expiry: bool = True,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.kind = kind
        self.path = path
        self.jwt_expiry = jwt_expiry
        self._wall = wall
        self.watch: FileWatch[TokenCredential] = FileWatch(path, self._parse, MAX_TOKEN_CHARS)

    def _parse(self, text: str, now: float) -> TokenCredential:
        token = checked_token(text.strip(), f"token in {self.path}")
        expires_at = math.inf
        if self.jwt_expiry and token.count(".") == 2:
            try:
                claims = unverified_claims(token)
            except CredentialError:
                claims = {}
            if "exp" in claims:
                expires_at = expires_at_from_claims(claims, now, self._wall)
        return TokenCredential(obtained_at=now, expires_at=expires_at, token=token)

    async def refresh(self, now: float) -> TokenCredential:
        return self.watch.get(now)
