"""An endpoint dies mid-run: GETs are retried on the survivor and all answered 200;
POSTs in flight on the dead endpoint get 502 and never reach the survivor twice; a
refused connection moves any request to the other endpoint; the dead endpoint is
ejected for a while."""

from __future__ import annotations

import socket

import pytest
import trio

from fastgw._core.http import parse_request_head
from fastgw.config.model import HedgeConfig, RetryConfig, RouteConfig
from fastgw.gateway import Gateway
from tests.e2e.helpers import Client, make_config


class Killable:
    """A minimal HTTP/1.1 endpoint that answers after ``delay_s`` and can be killed:
    every connection reset at once, the listener closed (later connects refused)."""

    def __init__(self, name: bytes, delay_s: float = 0.0) -> None:
        self.name = name
        self.delay_s = delay_s
        self.seen: list[tuple[bytes, bytes]] = []  # (method, X-Request-Id)
        # Requests read and not yet answered, by X-Request-Id; ``changed`` fires on
        # every arrival (a test waits for a moment with requests in flight).
        self.in_flight: dict[bytes, bytes] = {}
        self.changed = trio.Event()
        self.socks: set[trio.socket.SocketType] = set()
        self.scope = trio.CancelScope()
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        lsock = trio.socket.socket()
        try:
            with self.scope:
                await lsock.bind(("127.0.0.1", 0))
                lsock.listen(128)
                self.port = lsock.getsockname()[1]
                async with trio.open_nursery() as n:
                    task_status.started(self.port)
                    while True:
                        s, _ = await lsock.accept()
                        self.socks.add(s)
                        n.start_soon(self._conn, s)
        finally:
            lsock.close()

    async def _conn(self, s: trio.socket.SocketType) -> None:
        buf = b""
        try:
            while True:
                head = parse_request_head(buf) if buf else None
                if head is None:
                    data = await s.recv(65536)
                    if not data:
                        return
                    buf += data
                    continue
                body_end = head.head_len + (head.content_length if head.body_kind == 1 else 0)
                while len(buf) < body_end:
                    buf += await s.recv(65536)
                buf = buf[body_end:]
                rid = head.get(b"x-request-id") or b""
                self.seen.append((head.method, rid))
                self.in_flight[rid] = head.method
                self.changed.set()
                self.changed = trio.Event()
                await trio.sleep(self.delay_s)
                body = self.name
                await s.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                self.in_flight.pop(rid, None)
        except (OSError, trio.ClosedResourceError):
            return
        finally:
            s.close()

    def kill(self) -> None:
        """Reset every connection (SO_LINGER 0, closed as the tasks unwind) and stop
        listening: what the gateway sees when a function instance dies."""
        for s in self.socks:
            try:
                s.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            except OSError:
                pass
        self.scope.cancel()


@pytest.mark.parametrize(
    "route",
    [
        RouteConfig(name="all", backend="fn"),
        # The same through the retry/hedge path (fastgw/upstream/retry.py).
        RouteConfig(name="all", backend="fn", retry=RetryConfig(), hedge=HedgeConfig(delay_s=1.0)),
    ],
    ids=["default", "retry-and-hedge"],
)
async def test_endpoint_killed_mid_run(nursery: trio.Nursery, route: RouteConfig) -> None:
    """Steady GET and POST load over two endpoints; mid-run, at a moment when endpoint
    A has both a GET and a POST in flight, A dies (connections reset, listener gone).
    Every GET is answered 200 (those in flight on A are retried on B); the POSTs in
    flight on A get 502 and never reach B; no POST reaches B twice."""
    a, b = Killable(b"A", delay_s=0.03), Killable(b"B", delay_s=0.03)
    pa = await nursery.start(a.serve)
    pb = await nursery.start(b.serve)
    gw = Gateway(make_config([f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"], routes=[route]))
    port = (await nursery.start(gw.serve))[0][1]
    status: dict[bytes, int] = {}  # X-Request-Id -> status answered
    at_kill: dict[bytes, bytes] = {}  # what A had in flight when it died
    killed = trio.Event()

    async def client(method: bytes, n: int) -> None:
        c = await Client.open(port)
        for i in range(40):
            rid = b"%s-%d-%d" % (method, n, i)
            hs = [(b"X-Request-Id", rid)]
            if method == b"POST":
                r = await c.request(b"POST", b"/p", headers=hs, body=b"x")
            else:
                r = await c.request(b"GET", b"/g", headers=hs)
            status[rid] = r.status  # a 502 keeps the connection: carry on

    async def killer() -> None:
        # Mid-run (both endpoints have answered a while), with GETs and POSTs on A.
        while not (
            len(status) >= 60 and b"GET" in a.in_flight.values() and b"POST" in a.in_flight.values()
        ):
            await a.changed.wait()
        at_kill.update(a.in_flight)
        a.kill()
        killed.set()

    nursery.start_soon(killer)  # waits (until the test ends) if the moment never comes
    async with trio.open_nursery() as clients:
        for n in range(8):
            clients.start_soon(client, b"GET", n)
        for n in range(4):
            clients.start_soon(client, b"POST", n)
    assert killed.is_set(), "A never had a GET and a POST in flight at once"
    gets = {rid: st for rid, st in status.items() if rid.startswith(b"GET")}
    posts = {rid: st for rid, st in status.items() if rid.startswith(b"POST")}
    assert len(gets) == 320 and len(posts) == 160
    assert set(gets.values()) == {200}, [rid for rid, st in gets.items() if st != 200]
    assert set(posts.values()) <= {200, 502}
    # Both endpoints carried the steady load before the kill, B all of it after.
    a_gets = {rid for m, rid in a.seen if m == b"GET"}
    b_gets = [rid for m, rid in b.seen if m == b"GET"]
    assert a_gets and b_gets
    assert len(b_gets) == len(set(b_gets))
    # The GETs in flight on A were retried on B and answered.
    lost_gets = [rid for rid, m in at_kill.items() if m == b"GET"]
    assert lost_gets and set(lost_gets) <= set(b_gets)
    # The POSTs in flight on A got 502 and never reached B; no POST reached B twice.
    lost_posts = [rid for rid, m in at_kill.items() if m == b"POST"]
    assert lost_posts and all(posts[rid] == 502 for rid in lost_posts)
    b_posts = [rid for m, rid in b.seen if m == b"POST"]
    assert len(b_posts) == len(set(b_posts))
    a_posts = {rid for m, rid in a.seen if m == b"POST"}
    assert not (a_posts & set(b_posts))  # a POST that A saw is never sent to B
    # (a reset on a reused connection counts as a dead pooled connection: the replay
    # tries a fresh connection first, refused, then the other endpoint)
    replays = gw.errors["retried"] + gw.errors["dead_pooled_connection"]
    assert replays >= len(lost_gets), dict(gw.errors)
    # The dead endpoint was ejected after its refused connects.
    pool_a = gw.state.backends["fn"].pools[0]
    assert pool_a.ejections >= 1


async def test_refused_connect_goes_to_the_other_endpoint(nursery: trio.Nursery) -> None:
    b = Killable(b"B")
    pb = await nursery.start(b.serve)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    gw = Gateway(make_config([f"http://127.0.0.1:{dead_port}", f"http://127.0.0.1:{pb}"]))
    port = (await nursery.start(gw.serve))[0][1]
    c = await Client.open(port)
    for _ in range(10):
        r = await c.request(b"POST", b"/x", body=b"1")  # never sent: safe for any method
        assert r.status == 200 and r.body == b"B"
    assert len([m for m, _ in b.seen if m == b"POST"]) == 10
