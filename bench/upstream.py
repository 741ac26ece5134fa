"""Built-in upstream for bench.e2e when nginx is not installed: 200 "ok" to everything.

    python -m bench.upstream PORT [--cert FILE --key FILE]

Every request gets ``200 OK`` with the 2-byte body ``ok`` (Content-Length: 2) on a kept-
alive HTTP/1.1 connection, or with TLS when a certificate and key are given. The answer
is fixed bytes, rebuilt only when the Date second changes.

Strategy: as little CPU per request as Python allows, because the upstream shares a CPU
with the load generator. One level-triggered epoll set that every socket joins once
(no re-arming per wait, unlike trio), raw non-blocking sockets, and one call to fastgw's
compiled ``parse_request_head`` per request for framing (RFC 9112 section 6). A kept-alive
request that arrives whole in one read, the bench's only case, costs one recv, one parse
and one send. TLS is an ``ssl.SSLObject`` over memory BIOs driven by the same loop.

Correct for requests without a body and with a Content-Length body (the body is read and
discarded; ``Expect: 100-continue`` is answered), pipelined or not. A chunked request
body gets 501 and a close (RFC 9112 section 6.1 lets a server refuse a transfer coding
it does not implement); a malformed head gets the status its parse error carries.
"""

from __future__ import annotations

import argparse
import resource
import select
import socket
import ssl
import sys
import time
from email.utils import formatdate

from fastgw._core.http import BODY_LENGTH, BODY_NONE, parse_request_head
from fastgw.errors import ProtocolError

RECV_BYTES = 65536
BODY = b"ok"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT


def _head(date: str, *, close: bool = False) -> bytes:
    # The fields nginx sends for `return 200 "ok"`, so proxies parse a head of the same size.
    return (
        "HTTP/1.1 200 OK\r\nServer: bench-upstream\r\n"
        f"Date: {date}\r\nContent-Type: text/plain\r\nContent-Length: {len(BODY)}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    ).encode()


def _error(status: int) -> bytes:
    return (f"HTTP/1.1 {status} Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").encode()


class Conn:
    """One client connection: its socket, the bytes of an incomplete head, the body
    bytes still to discard, and the answer to send once they are gone."""

    __slots__ = (
        "after_body",
        "buf",
        "close_after",
        "handshaken",
        "inbio",
        "obj",
        "out",
        "outbio",
        "skip",
        "sock",
    )

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext | None) -> None:
        self.sock = sock
        self.buf = b""
        self.skip = 0
        self.after_body = b""
        self.out = b""
        self.close_after = False
        self.handshaken = ctx is None
        self.obj: ssl.SSLObject | None = None
        if ctx is not None:
            self.inbio = ssl.MemoryBIO()
            self.outbio = ssl.MemoryBIO()
            self.obj = ctx.wrap_bio(self.inbio, self.outbio, server_side=True)


class Server:
    def __init__(self, port: int, ctx: ssl.SSLContext | None) -> None:
        self.ctx = ctx
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", port))
        self.lsock.listen(4096)
        self.lsock.setblocking(False)
        self.ep = select.epoll()
        self.ep.register(self.lsock.fileno(), EPOLLIN)
        self.conns: dict[int, Conn] = {}
        self.date_s = 0
        self.set_date()

    def set_date(self) -> None:
        now_s = int(time.time())
        if now_s != self.date_s:
            self.date_s = now_s
            date = formatdate(now_s, usegmt=True)
            self.resp = _head(date) + BODY
            self.resp_head_only = _head(date)
            self.resp_close = _head(date, close=True) + BODY
            self.resp_close_head_only = _head(date, close=True)

    def serve_forever(self) -> None:
        lfd = self.lsock.fileno()
        conns = self.conns
        poll = self.ep.poll
        while True:
            events = poll()
            self.set_date()
            for fd, ev in events:
                if fd == lfd:
                    self.accept()
                    continue
                c = conns.get(fd)
                if c is None:
                    continue
                if ev & EPOLLOUT:
                    self.flush(fd, c)
                    if fd not in conns:
                        continue
                if ev & ~EPOLLOUT:  # readable, hang-up or error: the recv tells which
                    self.on_readable(fd, c)

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.lsock.accept()
            except BlockingIOError:
                return
            except OSError:  # EMFILE and friends: the client sees a reset, we go on
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            fd = sock.fileno()
            self.conns[fd] = Conn(sock, self.ctx)
            self.ep.register(fd, EPOLLIN)

    def close(self, fd: int, c: Conn) -> None:
        del self.conns[fd]
        self.ep.unregister(fd)
        c.sock.close()

    def on_readable(self, fd: int, c: Conn) -> None:
        try:
            data = c.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            self.close(fd, c)
            return
        if not data:
            self.close(fd, c)
            return
        obj = c.obj
        if obj is None:
            # The bench's case: a whole request with no body, nothing buffered.
            if not c.buf and not c.skip:
                try:
                    h = parse_request_head(data)
                except ProtocolError:
                    h = None
                if (
                    h is not None
                    and h.head_len == len(data)
                    and h.body_kind == BODY_NONE
                    and h.keep_alive
                    and h.method != b"HEAD"
                ):
                    self.send(fd, c, self.resp)
                    return
            self.send(fd, c, self.handle(c, data))
            return
        c.inbio.write(data)
        if not c.handshaken:
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                self.send_tls(fd, c, b"")
                return
            except (ssl.SSLError, OSError):
                self.close(fd, c)
                return
            c.handshaken = True
        chunks = []
        eof = False
        while True:
            try:
                chunk = obj.read(RECV_BYTES)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                eof = True
                break
            except ssl.SSLError:
                self.close(fd, c)
                return
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
        out = self.handle(c, b"".join(chunks)) if chunks else b""
        self.send_tls(fd, c, out)
        if eof and fd in self.conns and not c.out:
            self.close(fd, c)

    def handle(self, c: Conn, data: bytes) -> bytes:
        """Frame the requests in ``data`` (after what is buffered); returns the answers."""
        out: list[bytes] = []
        if c.skip:
            if len(data) < c.skip:
                c.skip -= len(data)
                return b""
            data = data[c.skip :]
            c.skip = 0
            out.append(c.after_body)
            if c.close_after:
                return b"".join(out)
        if c.buf:
            data = c.buf + data
            c.buf = b""
        start = 0
        n = len(data)
        while start < n and not c.close_after:
            try:
                h = parse_request_head(data, start)
            except ProtocolError as e:
                out.append(_error(e.status))
                c.close_after = True
                break
            if h is None:
                c.buf = data[start:]
                break
            start += h.head_len
            head_only = h.method == b"HEAD"
            if h.keep_alive:
                resp = self.resp_head_only if head_only else self.resp
            else:
                c.close_after = True
                resp = self.resp_close_head_only if head_only else self.resp_close
            kind = h.body_kind
            if kind == BODY_NONE:
                out.append(resp)
            elif kind == BODY_LENGTH:
                need = h.content_length
                if n - start >= need:
                    start += need
                    out.append(resp)
                else:
                    if h.expect_continue and start == n:
                        out.append(CONTINUE)
                    c.skip = need - (n - start)
                    c.after_body = resp
                    break
            else:
                out.append(_error(501))
                c.close_after = True
        return b"".join(out)

    def send(self, fd: int, c: Conn, data: bytes) -> None:
        if c.out:
            c.out += data
            return
        if data:
            try:
                sent = c.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close(fd, c)
                return
            if sent < len(data):
                c.out = data[sent:]
                self.ep.modify(fd, EPOLLIN | EPOLLOUT)
                return
        if c.close_after and not c.skip:
            self.close(fd, c)

    def send_tls(self, fd: int, c: Conn, data: bytes) -> None:
        obj = c.obj
        assert obj is not None
        if data:
            try:
                obj.write(data)
            except ssl.SSLError:
                self.close(fd, c)
                return
        self.send(fd, c, c.outbio.read())

    def flush(self, fd: int, c: Conn) -> None:
        try:
            sent = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError:
            self.close(fd, c)
            return
        c.out = c.out[sent:]
        if not c.out:
            self.ep.modify(fd, EPOLLIN)
            if c.close_after and not c.skip:
                self.close(fd, c)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("port", type=int)
    ap.add_argument("--cert", help="certificate chain (PEM); with --key, serve TLS")
    ap.add_argument("--key", help="private key (PEM)")
    args = ap.parse_args(argv)
    if bool(args.cert) != bool(args.key):
        ap.error("--cert and --key go together")
    ctx = None
    if args.cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
    # Every proxy connection is one descriptor here: a pool of thousands must fit.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        Server(args.port, ctx).serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
