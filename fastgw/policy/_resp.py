"""A small RESP2 client for Redis over trio streams: one long-lived pipelined connection.

Strategy. ``RespClient`` keeps one TCP connection to one Redis and shares it among every
task that calls it: a caller appends its encoded command(s) to an output buffer and
queues a waiter; a writer task sends whatever the buffer holds in one ``send_all``
(so the commands of concurrent callers go out together: pipelining); a reader task
parses replies as they arrive and hands them to the waiters in FIFO order, which is
the order Redis answers in (RESP2 without pub/sub, https://redis.io/docs/latest/develop/
reference/protocol-spec/ "Pipelining"). Nothing is opened per call.

Failures. A caller waits at most ``timeout_s`` for its reply. A reply that does not come
in time, a closed or reset connection, or bytes that are not RESP2 all end the
connection: its pending callers fail at once with ``RedisUnavailable`` (``RedisTimeout``
for the one that timed out), and until a new connection is up every call fails at once
without I/O, so a dead or stalled Redis costs a caller at most one timeout, not one per
call. A supervisor task reconnects with exponential backoff and jitter, runs AUTH,
SELECT and an optional hook (e.g. SCRIPT LOAD) on the new connection before any caller
may use it, and then publishes it. An error reply (``-ERR ...``) is an answer, not a
failure of the connection: ``call`` raises it as ``RespError``.

Bounds. A reply may hold at most ``max_reply_bytes`` (1 MiB by default: the replies this
client asks for are a few hundred bytes; Redis itself would send up to 512 MB, its
``proto-max-bulk-len``, which a gateway must never buffer), nest at most 8 arrays deep
and put at most 64 KiB on one line; the output buffer holds at most 1 MiB and at most
65536 callers may wait at once, after which a call fails as if Redis were down.

Errors raised: ``RedisUnavailable`` (connection lost, over a bound) and its subclasses
``RedisNotConnected`` (no connection up: nothing sent) and ``RedisTimeout`` (no reply
within the timeout), ``RespError`` (the server's error reply).
Anything else escaping from here is a bug.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import trio

# Replies this client asks for are small; see the module docstring.
MAX_REPLY_BYTES = 1 << 20
# Arrays in arrays: EVAL may return nested tables; 8 is far more than any reply we use.
MAX_DEPTH = 8
# A status, error or integer line; Redis's error messages are well under 1 KiB.
MAX_LINE_BYTES = 1 << 16
# Unsent commands and waiting callers: past either, Redis is not keeping up.
MAX_OUT_BYTES = 1 << 20
MAX_PENDING = 65536
# One receive: a socket buffer's worth; replies are tiny, a full read rarely happens.
RECV_BYTES = 65536


class RespError(Exception):
    """An error reply from the server, e.g. ``NOSCRIPT No matching script``."""

    @property
    def kind(self) -> str:
        """The error's first word (``ERR``, ``NOSCRIPT``, ``WRONGPASS``, ...)."""
        return str(self).split(" ", 1)[0]


class RespProtocolError(Exception):
    """Bytes that are not a RESP2 reply, or a reply over a bound."""


class RedisUnavailable(Exception):
    """No answer: not connected, the connection was lost, or a bound was hit."""


class RedisTimeout(RedisUnavailable):
    """No reply within the call's timeout."""


class RedisNotConnected(RedisUnavailable):
    """No connection is up (the background loop is reconnecting): nothing was sent."""


Reply: TypeAlias = "bytes | int | list[Reply] | RespError | None"


def encode_command(args: Sequence[bytes | str | int]) -> bytes:
    """One command as a RESP2 array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            b = a.encode()
        elif isinstance(a, int):
            b = b"%d" % a
        else:
            b = a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Incomplete(Exception):
    pass


def _int(line: bytes) -> int:
    # Strict: int() would also take spaces, "+1" and "1_0".
    digits = line[1:] if line[:1] == b"-" else line
    if not (0 < len(digits) <= 19 and digits.isdigit()):
        raise RespProtocolError(f"not an integer: {line[:32]!r}")
    return int(line)


class RespReader:
    """Sans-I/O RESP2 reply parser: ``feed`` bytes, then ``next_reply`` until it says
    there is no complete reply left. Simple strings come out as bytes, errors as
    ``RespError`` objects (returned, not raised), nulls as None. Raises
    ``RespProtocolError`` on bytes that are not RESP2 or on a reply over a bound; the
    reader is then unusable (so is the connection)."""

    __slots__ = ("_buf", "_pos", "max_depth", "max_reply_bytes")

    def __init__(self, max_reply_bytes: int = MAX_REPLY_BYTES, max_depth: int = MAX_DEPTH):
        self._buf = bytearray()
        self._pos = 0
        self.max_reply_bytes = max_reply_bytes
        self.max_depth = max_depth

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data

    def next_reply(self) -> tuple[bool, Reply]:
        """(True, reply) for the next complete reply, else (False, None)."""
        buf = self._buf
        start = self._pos
        if start >= len(buf):
            return False, None
        try:
            reply, end = self._parse(start, 0)
        except _Incomplete:
            if len(buf) - start > self.max_reply_bytes:
                raise RespProtocolError(
                    f"reply over {self.max_reply_bytes} bytes and not complete"
                ) from None
            if start:
                del buf[:start]
                self._pos = 0
            return False, None
        if end - start > self.max_reply_bytes:
            raise RespProtocolError(f"reply of {end - start} bytes: at most {self.max_reply_bytes}")
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return True, reply

    def _parse(self, pos: int, depth: int) -> tuple[Reply, int]:
        buf = self._buf
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if len(buf) - pos > MAX_LINE_BYTES:
                raise RespProtocolError(f"a line over {MAX_LINE_BYTES} bytes")
            raise _Incomplete
        if eol - pos > MAX_LINE_BYTES:
            raise RespProtocolError(f"a line over {MAX_LINE_BYTES} bytes")
        kind = buf[pos]
        line = bytes(buf[pos + 1 : eol])
        nxt = eol + 2
        if kind == 0x2B:  # '+' simple string
            return line, nxt
        if kind == 0x2D:  # '-' error
            return RespError(line.decode("utf-8", "replace")), nxt
        if kind == 0x3A:  # ':' integer
            return _int(line), nxt
        if kind == 0x24:  # '$' bulk string
            n = _int(line)
            if n == -1:
                return None, nxt
            if not 0 <= n <= self.max_reply_bytes:
                raise RespProtocolError(f"bulk string of {n} bytes")
            end = nxt + n
            if len(buf) < end + 2:
                raise _Incomplete
            if buf[end : end + 2] != b"\r\n":
                raise RespProtocolError("bulk string not followed by CRLF")
            return bytes(buf[nxt:end]), end + 2
        if kind == 0x2A:  # '*' array
            n = _int(line)
            if n == -1:
                return None, nxt
            # Each element takes at least 3 bytes (":0\r\n" is 4).
            if not 0 <= n <= self.max_reply_bytes // 3:
                raise RespProtocolError(f"array of {n} elements")
            if depth >= self.max_depth:
                raise RespProtocolError(f"arrays nested over {self.max_depth} deep")
            items: list[Reply] = []
            p = nxt
            for _ in range(n):
                item, p = self._parse(p, depth + 1)
                items.append(item)
            return items, p
        raise RespProtocolError(f"unknown reply type byte {bytes([kind])!r}")


class _Waiter:
    __slots__ = ("abandoned", "error", "event", "left", "replies")

    def __init__(self, n: int) -> None:
        self.event = trio.Event()
        self.left = n
        self.replies: list[Reply] = []
        self.error: RedisUnavailable | None = None
        self.abandoned = False


class _Connection:
    """One stream, its reader and writer tasks, and the callers waiting on it."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        max_reply_bytes: int,
        on_dead: Callable[[_Connection], None],
    ) -> None:
        self.stream = stream
        self.reader = RespReader(max_reply_bytes)
        self.pending: deque[_Waiter] = deque()
        self.out = bytearray()
        self.wake = trio.Event()
        self.dead = False
        self.reason = ""
        self.scope: trio.CancelScope | None = None
        self.on_dead = on_dead
        self.writes = 0

    def submit(self, payload: bytes, n: int) -> _Waiter:
        if self.dead:
            raise RedisUnavailable(self.reason)
        if len(self.out) + len(payload) > MAX_OUT_BYTES or len(self.pending) >= MAX_PENDING:
            raise RedisUnavailable("Redis is not keeping up: send queue full")
        w = _Waiter(n)
        self.pending.append(w)
        self.out += payload
        self.wake.set()
        return w

    def die(self, reason: str) -> None:
        """End the connection now: fail every pending caller, stop both tasks."""
        if self.dead:
            return
        self.dead = True
        self.reason = reason
        err = RedisUnavailable(reason)
        pending = self.pending
        while pending:
            w = pending.popleft()
            w.error = err
            w.event.set()
        if self.scope is not None:
            self.scope.cancel()
        self.on_dead(self)

    async def write_loop(self) -> None:
        try:
            while True:
                if not self.out:
                    self.wake = trio.Event()
                    await self.wake.wait()
                    continue
                data = self.out
                self.out = bytearray()
                await self.stream.send_all(data)
                self.writes += 1
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.die(f"send failed: {e!r}")

    async def read_loop(self) -> None:
        reader = self.reader
        pending = self.pending
        try:
            while True:
                data = await self.stream.receive_some(RECV_BYTES)
                if not data:
                    self.die("connection closed by the server")
                    return
                reader.feed(data)
                while True:
                    ok, reply = reader.next_reply()
                    if not ok:
                        break
                    if not pending:
                        what = f"server said {reply}" if isinstance(reply, RespError) else ""
                        raise RespProtocolError(f"a reply nobody asked for {what}".rstrip())
                    w = pending[0]
                    w.replies.append(reply)
                    w.left -= 1
                    if w.left == 0:
                        pending.popleft()
                        w.event.set()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.die(f"receive failed: {e!r}")
        except RespProtocolError as e:
            self.die(f"protocol error: {e}")


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) into (host, port). Raises ValueError."""
    host, sep, port_s = address.rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_s)


# The hook run on each new connection before it is published: it gets a ``call`` bound
# to that connection (raising RespError on an error reply).
OnConnect: TypeAlias = Callable[[Callable[..., Awaitable[Reply]]], Awaitable[None]]


class RespClient:
    """A Redis client over one long-lived pipelined connection, reconnected in the
    background. Build it with ``open_resp_client``; safe to call from many tasks."""

    def __init__(
        self,
        address: str,
        *,
        password: str | None = None,
        username: str | None = None,
        db: int = 0,
        timeout_s: float = 0.05,
        connect_timeout_s: float = 1.0,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 5.0,
        max_reply_bytes: int = MAX_REPLY_BYTES,
        on_connect: OnConnect | None = None,
    ) -> None:
        # "unix:/path": a Unix socket (host is the path, port 0).
        self.unix = address.startswith("unix:")
        if self.unix:
            if len(address) <= 5:
                raise ValueError(f"{address!r} is not unix:/path")
            self.host, self.port = address[5:], 0
        else:
            self.host, self.port = parse_address(address)
        if username is not None and password is None:
            raise ValueError("a Redis username needs a password")
        if not 0 <= db <= 1 << 20:
            raise ValueError(f"db={db}: not a database number")
        for name, v in (
            ("timeout_s", timeout_s),
            ("connect_timeout_s", connect_timeout_s),
            ("backoff_min_s", backoff_min_s),
            ("backoff_max_s", backoff_max_s),
        ):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v!r}: a positive number of seconds")
        # Defaults: connect_timeout_s 1 s, far above a LAN handshake, short enough that
        # a stopped Redis (its kernel still accepts) is given up on quickly;
        # backoff_min_s 0.1 s, so a restarted Redis is used again within about that;
        # backoff_max_s 5 s, so a long outage costs each instance one attempt per 5 s.
        self.password = password
        self.username = username
        self.db = db
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = max(backoff_max_s, backoff_min_s)
        self.max_reply_bytes = max_reply_bytes
        self.on_connect = on_connect
        self._conn: _Connection | None = None
        self._up = trio.Event()
        self.last_error = ""
        self._n_connects = 0
        self._n_connect_failures = 0
        self._n_disconnects = 0
        self._n_timeouts = 0
        self._n_writes_done = 0

    # -----------------------------------------------------------------------------------
    # Calls

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def wait_connected(self) -> None:
        """Return once a connection is up (at once when one is)."""
        while self._conn is None:
            await self._up.wait()

    async def call(self, *args: bytes | str | int, timeout_s: float | None = None) -> Reply:
        """One command; its reply. Raises RespError on an error reply, RedisTimeout,
        RedisUnavailable."""
        (reply,) = await self.call_encoded(encode_command(args), 1, timeout_s)
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def pipeline(
        self, commands: Sequence[Sequence[bytes | str | int]], *, timeout_s: float | None = None
    ) -> list[Reply]:
        """Several commands sent together; their replies, error replies included as
        RespError objects. Raises RedisTimeout, RedisUnavailable."""
        payload = b"".join(encode_command(c) for c in commands)
        return await self.call_encoded(payload, len(commands), timeout_s)

    async def call_encoded(self, payload: bytes, n: int, timeout_s: float | None) -> list[Reply]:
        """``n`` commands already encoded in ``payload``; their ``n`` replies (error
        replies included as RespError objects). The hot path of the callers that
        encode their own commands. Raises RedisTimeout, RedisUnavailable."""
        conn = self._conn
        if conn is None:
            raise RedisNotConnected(f"not connected to Redis ({self.last_error or 'starting'})")
        t = self.timeout_s if timeout_s is None else timeout_s
        return await self._roundtrip(conn, payload, n, t)

    async def eval_cached(
        self, script: bytes, sha1: bytes, keys_and_args: Sequence[bytes], timeout_s: float
    ) -> tuple[Reply, bool]:
        """Run a Lua script by EVALSHA; when Redis answers NOSCRIPT (its cache was
        flushed, or it restarted), by EVAL, which caches it again; both within one
        ``timeout_s``. ``keys_and_args``: numkeys, the keys, the arguments. The reply
        (an error reply as a RespError) and whether NOSCRIPT came. Raises as
        ``call_encoded``."""
        deadline = trio.current_time() + timeout_s
        (reply,) = await self.call_encoded(
            encode_command((b"EVALSHA", sha1, *keys_and_args)), 1, timeout_s
        )
        if not (isinstance(reply, RespError) and reply.kind == "NOSCRIPT"):
            return reply, False
        (reply,) = await self.call_encoded(
            encode_command((b"EVAL", script, *keys_and_args)),
            1,
            max(0.0, deadline - trio.current_time()),
        )
        return reply, True

    async def _roundtrip(
        self, conn: _Connection, payload: bytes, n: int, timeout_s: float
    ) -> list[Reply]:
        w = conn.submit(payload, n)
        try:
            with trio.move_on_after(timeout_s):
                await w.event.wait()
        except BaseException:
            w.abandoned = True  # cancelled from outside: the reader drops the reply
            raise
        if w.error is not None:
            raise w.error
        if w.left:
            # A stalled Redis is treated as a dead one: see the module docstring.
            w.abandoned = True
            self._n_timeouts += 1
            conn.die("timeout")
            raise RedisTimeout(f"no reply from Redis within {timeout_s} s")
        return w.replies

    # -----------------------------------------------------------------------------------
    # The connection's life

    def statistics(self) -> dict[str, int]:
        """connected (0/1), connects, connect_failures, disconnects, timeouts, writes
        (send_all calls: fewer than commands when callers were pipelined), pending."""
        conn = self._conn
        return {
            "connected": int(conn is not None),
            "connects": self._n_connects,
            "connect_failures": self._n_connect_failures,
            "disconnects": self._n_disconnects,
            "timeouts": self._n_timeouts,
            "writes": self._n_writes_done + (conn.writes if conn is not None else 0),
            "pending": len(conn.pending) if conn is not None else 0,
        }

    def _on_dead(self, conn: _Connection) -> None:
        self._n_writes_done += conn.writes
        if self._conn is conn:
            self._conn = None
            self._up = trio.Event()
            self._n_disconnects += 1
            self.last_error = conn.reason

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection up until cancelled (``open_resp_client`` runs this)."""
        task_status.started()
        delay = self.backoff_min_s
        while True:
            was_up = await self._connect_and_serve()
            if was_up:
                delay = self.backoff_min_s
            # Full jitter on the upper half: instances that lost Redis together do not
            # all come back in the same millisecond.
            await trio.sleep(delay * random.uniform(0.5, 1.0))
            if not was_up:
                delay = min(delay * 2, self.backoff_max_s)

    async def _connect_and_serve(self) -> bool:
        """One connection from open to close; True if it was published."""
        try:
            with trio.fail_after(self.connect_timeout_s):
                stream: trio.abc.Stream = (
                    await trio.open_unix_socket(self.host)
                    if self.unix
                    else await trio.open_tcp_stream(self.host, self.port)
                )
        except (OSError, trio.TooSlowError) as e:
            self._n_connect_failures += 1
            self.last_error = f"connect to {self._where()}: {e!r}"
            return False
        conn = _Connection(stream, self.max_reply_bytes, self._on_dead)
        published = False
        try:
            async with trio.open_nursery() as nursery:
                conn.scope = nursery.cancel_scope
                nursery.start_soon(conn.read_loop)
                nursery.start_soon(conn.write_loop)
                try:
                    with trio.fail_after(self.connect_timeout_s):
                        await self._handshake(conn)
                except (RedisUnavailable, RespError, trio.TooSlowError) as e:
                    self._n_connect_failures += 1
                    self.last_error = f"handshake with {self._where()}: {e!r}"
                    conn.die(self.last_error)
                else:
                    self._conn = conn
                    self._n_connects += 1
                    self.last_error = ""
                    self._up.set()
                    published = True
                # The nursery ends when die() cancels it.
        finally:
            conn.die("client closed")
            await trio.aclose_forcefully(stream)
        return published

    def _where(self) -> str:
        return f"unix:{self.host}" if self.unix else f"{self.host}:{self.port}"

    async def _handshake(self, conn: _Connection) -> None:
        async def call(*args: bytes | str | int) -> Reply:
            (reply,) = await self._roundtrip(conn, encode_command(args), 1, math.inf)
            if isinstance(reply, RespError):
                raise reply
            return reply

        if self.password is not None:
            if self.username is not None:
                await call("AUTH", self.username, self.password)
            else:
                await call("AUTH", self.password)
        if self.db:
            await call("SELECT", self.db)
        if self.on_connect is not None:
            await self.on_connect(call)
        else:
            await call("PING")


@asynccontextmanager
async def open_resp_client(address: str, **kwargs: Any) -> AsyncIterator[RespClient]:
    """A ``RespClient`` (keyword arguments as its constructor's) with its connection
    kept up in the background for the duration of the block. Does not wait for the
    first connection: see ``RespClient.wait_connected``."""
    client = RespClient(address, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
