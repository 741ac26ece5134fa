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
from collections.abc import Sequence

import trio

from fastgw._core.http import StripSet
from fastgw.config.model import GatewayConfig, ListenerConfig
from fastgw.downstream import Downstream
from fastgw.errors import ProtocolError
from fastgw.router import Route, Router
from fastgw.transport import PlainTransport, TLSTransport
from fastgw.upstream.backend import Backend

log = logging.getLogger("fastgw")

# 0.1 s: timeouts here are seconds long; a tenth of a second is well inside their
# tolerance and costs one pass over the connections ten times a second.
WATCHDOG_TICK_S = 0.1

# Fields a client may never set towards a function: Expect is answered by the gateway
# itself (it sends 100 Continue when it is ready for the body).
_ALWAYS_STRIP = (b"expect",)


class GatewayState:
    """Everything compiled from one config; immutable once built."""

    __slots__ = ("backends", "config", "limits", "router", "strip", "via", "xff_append")

    def __init__(self, config: GatewayConfig, previous: GatewayState | None = None) -> None:
        self.config = config
        self.limits = config.limits
        self.via = config.via.encode() if config.via else None
        self.xff_append = config.xff_append
        self.strip = StripSet(names=_ALWAYS_STRIP)
        old: dict[str, Backend] = previous.backends if previous else {}
        self.backends: dict[str, Backend] = {}
        for name, bcfg in config.backends.items():
            prev = old.get(name)
            self.backends[name] = (
                prev if prev is not None and prev.config == bcfg else Backend(bcfg)
            )
        self.router = Router([Route(r, self.backends[r.backend]) for r in config.routes])


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

    def __init__(self, config: GatewayConfig, *, reuse_port: bool = False) -> None:
        self.state = GatewayState(config)
        # SO_REUSEPORT only when asked (--workers N): otherwise a second gateway started
        # on the same port by mistake would silently share it instead of failing.
        self.reuse_port = reuse_port
        self.draining = False
        self.connections: set[Downstream] = set()
        self.errors: collections.Counter[str] = collections.Counter()
        # Responses relayed, by status class: index 1..5 for 1xx..5xx.
        self.status_classes = [0] * 6
        self._rid_prefix = os.urandom(6).hex().encode()
        self._rid_counter = 0
        self._no_connections = trio.Event()
        self._no_connections.set()
        self._listen_socks: list[socket.socket] = []
        # The coarse clock every connection computes its deadlines from; the watchdog
        # advances it each tick.
        self.now = 0.0
        self.addresses: list[tuple[str, int]] = []

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

    def statistics(self) -> dict[str, object]:
        return {
            "connections": len(self.connections),
            "errors": dict(self.errors),
            "responses": {f"{i}xx": n for i, n in enumerate(self.status_classes) if n},
            "draining": self.draining,
        }

    # -- serving ------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind every listener, report the bound addresses through ``task_status``, and
        serve until cancelled. Raises OSError when a listener cannot be bound."""
        socks: list[tuple[socket.socket, ListenerConfig, ssl.SSLContext | None]] = []
        try:
            for lc in self.state.config.listeners:
                sock = _bind(lc, self.reuse_port)
                ctx = _listener_tls_context(lc) if lc.tls else None
                socks.append((sock, lc, ctx))
        except BaseException:
            for s, _, _ in socks:
                s.close()
            raise
        self._listen_socks = [s for s, _, _ in socks]
        self.addresses = [s.getsockname()[:2] for s, _, _ in socks]
        limiter = trio.Semaphore(self.state.limits.max_connections)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for sock, lc, ctx in socks:
                    nursery.start_soon(self._accept_loop, sock, lc, ctx, limiter, nursery)
                self.now = trio.current_time()
                nursery.start_soon(self._watchdog)
                task_status.started(list(self.addresses))
        finally:
            for s in self._listen_socks:
                s.close()
            for b in self.state.backends.values():
                b.close()

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Stop accepting, close idle keep-alive connections, let requests in flight
        finish (their responses carry Connection: close). Returns True when every
        connection closed within ``timeout_s`` (default: the config's drain timeout)."""
        self.draining = True
        for s in self._listen_socks:
            trio.lowlevel.notify_closing(s)
            s.close()
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
            # A deadline computed from the coarse clock may be up to one tick early:
            # give it one more tick, so a timeout is never shorter than configured.
            late = now - WATCHDOG_TICK_S
            for d in self.connections:
                if d.deadline <= late and d.scope is not None:
                    d.scope.cancel()
            ticks += 1
            if ticks % 10 == 0:
                for b in self.state.backends.values():
                    b.expire_idle(now)

    async def _accept_loop(
        self,
        lsock: socket.socket,
        lc: ListenerConfig,
        ctx: ssl.SSLContext | None,
        limiter: trio.Semaphore,
        nursery: trio.Nursery,
    ) -> None:
        proto = b"https" if ctx is not None else b"http"
        while not self.draining:
            await limiter.acquire()
            while True:
                try:
                    sock, addr = lsock.accept()
                    break
                except BlockingIOError:
                    try:
                        await trio.lowlevel.wait_readable(lsock)
                    except (trio.ClosedResourceError, OSError):
                        limiter.release()
                        return
                except OSError as e:
                    if self.draining or lsock.fileno() < 0:
                        limiter.release()
                        return
                    # EMFILE and friends: back off briefly rather than spin.
                    log.warning("accept failed on %s: %s", lc.name, e)
                    await trio.sleep(0.05)
            nursery.start_soon(self._connection, sock, addr, proto, ctx, limiter)

    async def _connection(
        self,
        sock: socket.socket,
        addr: tuple,
        proto: bytes,
        ctx: ssl.SSLContext | None,
        limiter: trio.Semaphore,
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
            if scope.cancelled_caught:
                with trio.move_on_after(1.0):
                    await d.answer_timeout()
        finally:
            if d.upconn is not None:
                d.upconn.pool.release(d.upconn, False)
                d.upconn = None
            t.close()
            self.connections.discard(d)
            limiter.release()
            if not self.connections:
                self._no_connections.set()


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
