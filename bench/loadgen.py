"""Built-in keep-alive HTTP/1.1 load generator, for bench.e2e when wrk is not installed.

    python -m bench.loadgen PORT CONNS DURATION_S

Prints one JSON object: {"requests", "rps", "p50_ms", "p99_ms", "errors"}, and the
errors by kind: "non_2xx", "conn_errors" (connects that failed, resets, closes).

Strategy: closed loop like wrk. CONNS raw non-blocking sockets, each with one request in
flight; one level-triggered epoll set that every socket joins once, so a request costs a
recv, a send and the share of one epoll_wait, and no per-wait re-registration. This beats
a trio task per connection, which re-arms its socket with epoll_ctl on every wait and
adds a scheduler trip per response: against nginx with 50 connections, this generator
spent 8-10 us of CPU per request (most of it in the kernel, as wrk does: 8-11 us) and a
trio version 18-19 us. It matters because the load generator shares a CPU with the
upstream: every microsecond spent here is one the upstream does not get.

Responses are framed by Content-Length (or, for a small chunked body, its final
zero-size chunk) with no header parsing beyond that. Latency is the time from the send
of a request to the recv that completes its response, taken with perf_counter_ns into a
preallocated array; percentiles are computed at the end. Errors count non-2xx
responses, connection failures, resets and closes (a closed connection is reopened,
as wrk does) and responses that cannot be framed.
"""

from __future__ import annotations

import errno
import json
import resource
import select
import socket
import sys
import time
from array import array

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
RECV_BYTES = 65536
# Preallocated latency slots: enough for 300 000 requests/s, far above what one Python
# process can drive; grown by doubling past that.
SLOTS_PER_S = 300_000
CONNECT_TIMEOUT_S = 10.0

_CL = b"\r\nContent-Length:"
_CL_LOWER = b"\r\ncontent-length:"
_CL_LEN = len(_CL)


def raise_nofile(conns: int) -> None:
    """Room for CONNS sockets plus the interpreter's own descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = conns + 64
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def response_end(buf: bytes) -> int:
    """Length of the first complete response in ``buf``; 0 if more bytes are needed;
    -1 if it cannot be framed (no Content-Length and not chunked)."""
    he = buf.find(b"\r\n\r\n")
    if he < 0:
        return 0
    i = buf.find(_CL, 0, he)
    if i < 0:
        head = buf[:he].lower()
        i = head.find(_CL_LOWER)
        if i < 0:
            if b"\r\ntransfer-encoding:" in head and b"chunked" in head:
                # Small bodies only: the last chunk and an empty trailer end it.
                j = buf.find(b"0\r\n\r\n", he + 4)
                return 0 if j < 0 else j + 5
            return -1
    j = buf.find(b"\r", i + _CL_LEN)
    total = he + 4 + int(buf[i + _CL_LEN : j])
    return total if len(buf) >= total else 0


def connect_all(port: int, conns: int, deadline: float) -> tuple[list[socket.socket], int]:
    """Open CONNS connections without blocking on any one of them; returns the
    connected sockets and the number that failed."""
    ep = select.epoll()
    pending: dict[int, socket.socket] = {}
    done: list[socket.socket] = []
    failed = 0
    for _ in range(conns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rc = s.connect_ex(("127.0.0.1", port))
        if rc in (0, errno.EINPROGRESS):
            pending[s.fileno()] = s
            ep.register(s.fileno(), select.EPOLLOUT)
        else:
            s.close()
            failed += 1
    while pending and time.monotonic() < deadline:
        for fd, _ev in ep.poll(0.1):
            s = pending.pop(fd)
            ep.unregister(fd)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                done.append(s)
            else:
                s.close()
                failed += 1
    for s in pending.values():
        s.close()
    ep.close()
    return done, failed + len(pending)


def run(port: int, conns: int, duration_s: float) -> dict[str, float | int | None]:
    raise_nofile(conns)
    socks, conn_errors = connect_all(port, conns, time.monotonic() + CONNECT_TIMEOUT_S)
    non_2xx = 0
    ep = select.epoll(len(socks) + 1)
    by_fd: dict[int, socket.socket] = {}
    started: dict[int, int] = {}
    partial: dict[int, bytes] = {}
    perf = time.perf_counter_ns
    lat = array("q", bytes(8 * (int(SLOTS_PER_S * duration_s) + 1024)))
    cap = len(lat)
    n = 0

    def open_one() -> None:
        # Reopen after a close or reset, blocking: loopback, and rare by design.
        nonlocal conn_errors
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(CONNECT_TIMEOUT_S)
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            conn_errors += 1
            return
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start(s)

    def start(s: socket.socket) -> None:
        fd = s.fileno()
        by_fd[fd] = s
        ep.register(fd, select.EPOLLIN)
        started[fd] = perf()
        s.send(REQUEST)

    def drop(fd: int) -> None:
        nonlocal conn_errors
        conn_errors += 1
        s = by_fd.pop(fd)
        ep.unregister(fd)
        partial.pop(fd, None)
        s.close()

    t_begin = perf()
    for s in socks:
        start(s)
    end_ns = t_begin + int(duration_s * 1e9)
    poll = ep.poll
    while True:
        events = poll(0.05)
        if perf() >= end_ns:
            break
        for fd, _ev in events:
            s = by_fd[fd]
            try:
                data = s.recv(RECV_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                drop(fd)
                open_one()
                continue
            if not data:
                drop(fd)
                open_one()
                continue
            if fd in partial:
                data = partial.pop(fd) + data
            end = response_end(data)
            if end <= 0:
                if end < 0:
                    drop(fd)
                    open_one()
                else:
                    partial[fd] = data
                continue
            t = perf()
            if n == cap:
                lat.extend(array("q", bytes(8 * cap)))
                cap *= 2
            lat[n] = t - started[fd]
            n += 1
            if data[9] != 50:  # b"2": "HTTP/1.1 2xx"
                non_2xx += 1
            started[fd] = t
            try:
                s.send(REQUEST)
            except OSError:
                drop(fd)
                open_one()
    elapsed_s = (perf() - t_begin) / 1e9
    for s in by_fd.values():
        s.close()
    ep.close()
    done = sorted(lat[:n])

    def pct_ms(p: float) -> float | None:
        if not done:
            return None  # no request completed: null in the JSON, not NaN
        return done[min(n - 1, int(p * n))] / 1e6

    return {
        "requests": n,
        "rps": n / elapsed_s,
        "p50_ms": pct_ms(0.50),
        "p99_ms": pct_ms(0.99),
        "errors": non_2xx + conn_errors,
        "non_2xx": non_2xx,
        "conn_errors": conn_errors,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    result = run(int(argv[0]), int(argv[1]), float(argv[2]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
