"""Reference for the end-to-end bench: the least a trio proxy can do per request.

One task per client connection and one upstream connection per client connection, raw
non-blocking sockets, no parsing at all (it relays whatever arrives, which is only right
for one small request and response at a time, as in the bench). Whatever fastgw costs
above this is what its parsing, routing and bookkeeping cost; the gap between this and
HAProxy is the price of trio and Python.

When a client closes between exchanges, its upstream connection goes to a free list and
the next client connection takes it, as fastgw's and HAProxy's pools do. Without that,
every new client connection cost an upstream connect and, with --tls, a handshake: at
1000 connections the bench's warm-up and measured run each began with 1000 handshakes,
about 3 s on a busy 2-CPU machine, and the run measured those instead of requests.

    python -m bench.minimal_proxy LISTEN_PORT UPSTREAM_PORT [--tls CA_FILE]
"""

from __future__ import annotations

import socket
import ssl
import sys

import trio
from trio.lowlevel import wait_readable

from fastgw.transport import PlainTransport, TLSTransport


async def open_upstream(
    up_port: int, ctx: ssl.SSLContext | None, idle: list[PlainTransport]
) -> PlainTransport:
    while idle:
        u = idle.pop()
        if u.is_reusable():
            return u
        u.close()
    raw = socket.create_connection(("127.0.0.1", up_port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ctx is None:
        return PlainTransport(raw)
    t = TLSTransport(raw, ctx, server_side=False, server_hostname="localhost")
    await t.handshake()
    return t


async def relay(
    client: socket.socket,
    up_port: int,
    ctx: ssl.SSLContext | None,
    idle: list[PlainTransport],
) -> None:
    c = PlainTransport(client)
    u: PlainTransport | None = None
    try:
        u = await open_upstream(up_port, ctx, idle)
        while True:
            # Between exchanges the upstream connection is clean: if the client has gone
            # (closed, or reset because a load generator stopped), keep it for the next.
            try:
                data = c.recv_nowait()
                if data is None:
                    data = await c.recv_after_wait()
            except OSError:
                data = b""
            if not data:
                idle.append(u)
                u = None
                return
            await u.send_all(data)
            resp = await u.recv_after_wait()
            if not resp:
                return
            try:
                await c.send_all(resp)
            except OSError:
                idle.append(u)
                u = None
                return
    except (OSError, ssl.SSLError):
        return
    finally:
        c.close()
        if u is not None:
            u.close()


async def main(port: int, up_port: int, ca: str | None) -> None:
    ctx = ssl.create_default_context(cafile=ca) if ca else None
    idle: list[PlainTransport] = []
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(1024)
    lsock.setblocking(False)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                sock, _ = lsock.accept()
            except BlockingIOError:
                await wait_readable(lsock)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(relay, sock, up_port, ctx, idle)


if __name__ == "__main__":
    args = sys.argv[1:]
    ca = None
    if "--tls" in args:
        i = args.index("--tls")
        ca = args[i + 1]
        del args[i : i + 2]
    try:
        trio.run(main, int(args[0]), int(args[1]), ca)
    except KeyboardInterrupt:
        pass
