"""A function endpoint for the retry and hedging tests: a small trio HTTP/1.1 server on
127.0.0.1, port 0, whose behaviour a test sets per request: answer (after a delay),
answer with a status (and Retry-After), hang, or close without answering. It can play
a scale-to-zero function: the first request after ``cold_after_idle_s`` without any
request waits ``cold_start_s`` more (a cold start)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from fastgw._core.http import parse_request_head


@dataclass
class Seen:
    method: bytes
    target: bytes
    rid: bytes
    body: bytes
    headers: dict[bytes, bytes]


@dataclass
class Act:
    """What to do with one request: ``status`` (with ``headers``), after ``delay_s``;
    ``hang`` never answers; ``close`` closes the connection without a byte."""

    status: int = 200
    delay_s: float = 0.0
    headers: bytes = b""
    hang: bool = False
    close: bool = False


@dataclass
class FnEndpoint:
    name: bytes
    delay_s: float = 0.0
    # Decides per request (the default answers 200 after delay_s).
    act: Callable[[Seen], Act] | None = None
    cold_after_idle_s: float | None = None
    cold_start_s: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    cold_starts: int = 0
    # Requests whose connection the gateway closed while they were being handled
    # (a hedge's loser, cancelled).
    abandoned: int = 0
    port: int = 0
    _last_active: float = float("-inf")

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        lsock = trio.socket.socket()
        try:
            await lsock.bind(("127.0.0.1", 0))
            lsock.listen(128)
            self.port = lsock.getsockname()[1]
            async with trio.open_nursery() as n:
                task_status.started(self.port)
                while True:
                    s, _ = await lsock.accept()
                    n.start_soon(self._conn, s)
        finally:
            lsock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, method: bytes) -> int:
        return sum(1 for r in self.seen if r.method == method)

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
                    data = await s.recv(65536)
                    if not data:
                        return
                    buf += data
                req = Seen(
                    head.method,
                    head.target,
                    head.get(b"x-request-id") or b"",
                    buf[head.head_len : body_end],
                    {k.lower(): v for k, v in head.headers},
                )
                buf = buf[body_end:]
                self.seen.append(req)
                act = self.act(req) if self.act is not None else Act(delay_s=self.delay_s)
                delay = act.delay_s
                now = trio.current_time()
                window = self.cold_after_idle_s
                if window is not None and now - self._last_active > window:
                    self.cold_starts += 1
                    delay += self.cold_start_s
                self._last_active = now
                if act.close:
                    return
                # Wait out the delay, noticing if the gateway gives up on us meanwhile.
                with trio.move_on_after(float("inf") if act.hang else delay):
                    if not await s.recv(1):
                        self.abandoned += 1
                        return
                    raise AssertionError("a pipelined request while one is in flight")
                self._last_active = trio.current_time()
                body = self.name
                await s.send(
                    b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n%s"
                    % (act.status, len(body), act.headers, body)
                )
        except OSError:
            return
        finally:
            s.close()
