"""Byte transports over raw non-blocking sockets: plain TCP and TLS.

Strategy: the hot path never goes through trio's stream classes. Each operation first
tries the non-blocking system call and only waits (``trio.lowlevel.wait_readable`` /
``wait_writable``) when the kernel says it would block: on a busy keep-alive connection
most reads and writes complete without a trip through the scheduler. TLS is an
``ssl.SSLObject`` over two memory BIOs driven by the same raw socket calls, so plain and
TLS connections share one code path in the callers.

Both classes expose ``recv()`` (``b""`` at EOF), ``send_all(data)`` and ``close()``.
They raise ``OSError`` (reset, broken pipe) and ``ssl.SSLError`` as-is; callers decide.
Only one task may wait on a transport at a time (trio raises BusyResourceError
otherwise), which is how every caller uses them: one task per connection.
"""

from __future__ import annotations

import socket
import ssl

from trio.lowlevel import wait_readable, wait_writable

# 64 KiB per read: one socket buffer's worth, and the unit of the streaming memory bound
# (a connection holds at most one read in flight per direction).
RECV_BYTES = 65536


class PlainTransport:
    __slots__ = ("closed", "sock")

    tls = False
    peer_cert: dict | None = None

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.closed = False

    async def recv(self, n: int = RECV_BYTES) -> bytes:
        sock = self.sock
        while True:
            try:
                return sock.recv(n)
            except BlockingIOError:
                await wait_readable(sock)

    async def recv_after_wait(self, n: int = RECV_BYTES) -> bytes:
        """Like ``recv`` but waits first: for when a read was just tried, or when the
        peer cannot have answered yet. Saves the system call that would fail."""
        sock = self.sock
        while True:
            await wait_readable(sock)
            try:
                return sock.recv(n)
            except BlockingIOError:
                pass

    def recv_nowait(self, n: int = RECV_BYTES) -> bytes | None:
        """Bytes if the kernel has some (``b""`` at EOF), None if a read would block."""
        try:
            return self.sock.recv(n)
        except BlockingIOError:
            return None

    def send_nowait(self, data: bytes) -> int:
        """Bytes written without waiting (0 if the kernel buffer is full). The caller
        finishes with ``send_all(data[n:])`` when this is short: the hot path pays one
        system call and no coroutine when the whole response fits, as it usually does."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            await wait_writable(sock)
            try:
                sent = sock.send(view)
            except BlockingIOError:
                continue
            view = view[sent:]

    def is_reusable(self) -> bool:
        """True when an idle pooled connection has no EOF or stray bytes waiting: the
        peer has not closed it. One non-blocking MSG_PEEK, no scheduling."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # EOF (b"") or unsolicited bytes: either way not reusable

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass

    def abort(self) -> None:
        """Close with a RST (SO_LINGER 0) so the peer sees the exchange failed rather
        than a clean end of a read-until-close body."""
        if not self.closed:
            try:
                self.sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            except OSError:
                pass
            self.close()


class TLSTransport(PlainTransport):
    """TLS over a raw socket via ``ssl.SSLObject`` and memory BIOs."""

    __slots__ = ("_in", "_obj", "_out")

    tls = True

    def __init__(
        self,
        sock: socket.socket,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        super().__init__(sock)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )

    @property
    def peer_cert(self) -> dict | None:  # type: ignore[override]
        try:
            return self._obj.getpeercert()
        except ValueError:
            return None

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._obj

    async def _flush(self) -> None:
        out = self._out
        if out.pending:
            await PlainTransport.send_all(self, out.read())

    async def _fill(self) -> bool:
        data = await PlainTransport.recv(self)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def handshake(self) -> None:
        """Raises ssl.SSLError (verification failures included) or ConnectionError."""
        obj = self._obj
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionError("connection closed during TLS handshake") from None
        await self._flush()

    async def recv(self, n: int = RECV_BYTES) -> bytes:
        obj = self._obj
        while True:
            try:
                data = obj.read(n)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    continue  # the next read raises SSLEOFError or returns what is left
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            if self._out.pending:
                await self._flush()
            return data

    async def recv_after_wait(self, n: int = RECV_BYTES) -> bytes:
        # Decrypted bytes may already sit in the TLS buffers: never wait before reading.
        return await self.recv(n)

    def recv_nowait(self, n: int = RECV_BYTES) -> bytes | None:
        obj = self._obj
        while True:
            try:
                return obj.read(n)
            except ssl.SSLWantReadError:
                try:
                    raw = self.sock.recv(RECV_BYTES)
                except BlockingIOError:
                    return None
                if not raw:
                    self._in.write_eof()
                else:
                    self._in.write(raw)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def send_nowait(self, data: bytes) -> int:
        return 0  # TLS always goes through send_all (records, renegotiation, flushing)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._obj.write(data)
        await self._flush()

    def is_reusable(self) -> bool:
        if self._in.pending:
            return False
        return PlainTransport.is_reusable(self)
