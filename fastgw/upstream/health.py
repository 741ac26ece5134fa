"""Active health checks: one trio task per backend, checking each endpoint in turn.

Strategy: every ``interval_s`` each endpoint gets ``GET <path>`` on a connection of its
own, opened through the pool's transport code (so TLS is verified exactly as for
requests, with the backend's CA, SNI and client certificate) but never taken from or
returned to the pool: a check neither consumes a warm connection nor counts as a
connect failure for ejection. The answer's status decides (``expected_statuses``, any
2xx by default); a refused connect, a timeout or a malformed answer is a failure. The
pool turns results into state (``Pool.check_result``: down after ``unhealthy_threshold``
failures in a row, up after ``healthy_threshold`` successes). Endpoints start healthy, so
a gateway serves at once after a start or a reload; the first failures take it out.

Credentials: a function behind IAM (Cloud Run or Functions with IAM, a Lambda URL with
AWS_IAM auth, an Azure function key) answers 401/403 to an unauthenticated check, so a
check carries the endpoint's upstream credential exactly as a request does (the
binding's lines: ID token, bearer, key, or a SigV4 signature over the check's own
method, target, Host and empty body). ``probe_request`` builds that request for both
health checks and keep-warm (fastgw/upstream/retry.py). While no valid credential is
at hand (the first fetch has not landed, or the token source is failing and the last
one expired) a round is skipped, not failed: the endpoint is not at fault, and requests
answer 503 ``upstream_credential_unavailable`` meanwhile anyway. ``Pool.check_state``
says what the last round saw (``"waiting for credential"`` then), for /backends. A 401
(or a 403 with ``error="invalid_token"``) to a check with a credential is a failure and
also asks for an early token refresh, as a request's would (``Pool.credential_refused``).

The checker lives as long as its Backend: the gateway starts it in the backend's
``health_scope``, and a reload that keeps the backend keeps the checker and its state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from fastgw._core.http import parse_request_head, parse_response_head
from fastgw.errors import ProtocolError
from fastgw.upstream.pool import UpstreamConnectError

if TYPE_CHECKING:
    from fastgw.config.model import HealthCheckConfig
    from fastgw.upstream.backend import Backend
    from fastgw.upstream.pool import Pool

__all__ = ["WAITING_FOR_CREDENTIAL", "check_once", "probe_request", "run_health_checks"]

# A check answer's head must fit in this (the body is not read).
_MAX_HEAD_BYTES = 16384

# ``Pool.check_state`` while rounds are skipped for want of a credential.
WAITING_FOR_CREDENTIAL = "waiting for credential"


def probe_request(
    pool: Pool, path: bytes, agent: bytes, now: float, *, close: bool
) -> bytes | None:
    """``GET path`` for ``pool``'s endpoint, a whole request head: its Host, its path
    prefix joined to ``path`` as a request's is, ``User-Agent: agent``, and the
    endpoint's upstream credential when it has one (SigV4: signed for this head and an
    empty body). None when the endpoint has a credential and no valid one is at hand
    (nothing worth sending). ``now`` is on trio's clock (the cache's)."""
    prefix = pool.path_prefix
    target = (
        prefix + (path[1:] if path == b"/" or path.startswith(b"/?") else path) if prefix else path
    )
    raw = b"GET " + target + b" HTTP/1.1\r\nHost: " + pool.host_header
    raw += b"\r\nUser-Agent: " + agent + b"\r\n"
    if close:
        raw += b"Connection: close\r\n"
    binding = pool.credential
    if binding is not None:
        head = parse_request_head(raw + b"\r\n")
        lines = binding.lines(head, target, pool.host_header, now, payload_hash=None)
        if lines is None:
            return None
        raw += lines
    return raw + b"\r\n"


async def run_health_checks(backend: Backend) -> None:
    """Check ``backend``'s endpoints forever (cancel the caller's scope to stop).
    Endpoints are checked concurrently so one slow endpoint does not delay the rest."""
    hc = backend.config.health_check
    if hc is None:
        return
    async with trio.open_nursery() as nursery:
        for pool in backend.pools:
            nursery.start_soon(_check_loop, pool, hc)


async def _check_loop(pool: Pool, hc: HealthCheckConfig) -> None:
    while not pool.closed:
        problem = await check_once(pool, hc)
        if problem != WAITING_FOR_CREDENTIAL:
            pool.check_result(problem is None, hc.healthy_threshold, hc.unhealthy_threshold)
        pool.check_state = problem or "ok"
        await trio.sleep(hc.interval_s)


async def check_once(pool: Pool, hc: HealthCheckConfig) -> str | None:
    """One check of ``pool``'s endpoint: None when the answer's status is expected,
    else what went wrong (``WAITING_FOR_CREDENTIAL`` when nothing was sent because
    the endpoint's credential is not at hand: not a failure)."""
    request = probe_request(
        pool, hc.path.encode("ascii"), b"fastgw-health", trio.current_time(), close=True
    )
    if request is None:
        return WAITING_FOR_CREDENTIAL
    with trio.move_on_after(hc.timeout_s):
        try:
            transport = await pool._connect()
        except UpstreamConnectError as e:
            return e.reason
        except OSError as e:
            return f"connect failed: {e}"
        try:
            await transport.send_all(request)
            buf = b""
            while True:
                data = await transport.recv()
                if not data:
                    return "closed without an answer"
                buf += data
                rh = parse_response_head(buf, 0)
                if rh is not None:
                    if rh.status < 200:  # interim (1xx): wait for the final answer
                        buf = buf[rh.head_len :]
                        continue
                    status = rh.status
                    if hc.expected_statuses:
                        ok = status in hc.expected_statuses
                    else:
                        ok = 200 <= status < 300
                    if ok:
                        return None
                    if status == 401 or status == 403:
                        pool.credential_refused(status, rh)  # no-op without a credential
                    return f"status {status}"
                if len(buf) > _MAX_HEAD_BYTES:
                    return f"answer head over {_MAX_HEAD_BYTES} bytes"
        except OSError as e:
            return f"connection failed: {e}"
        except ProtocolError as e:
            return f"malformed answer: {e}"
        finally:
            transport.close()
    return f"no answer within {hc.timeout_s:g} s"
