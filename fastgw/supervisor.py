"""``fastgw serve --workers N``: N worker processes sharing the listening ports.

Strategy. Each worker is an ordinary ``fastgw serve`` process with its own trio loop that
binds its listeners with SO_REUSEPORT, so the kernel spreads new connections across the
workers. The supervisor (this module) serves no traffic. It:

- fixes the port of every ``port = 0`` listener before starting workers (it binds a
  placeholder with SO_REUSEPORT, never listening, to hold the number) and tells the
  workers through ``FASTGW_WORKER_PORTS``, so that all workers share one port;
- starts the workers, restarts one that dies (within a second; with a back-off if a
  worker keeps dying at start, so a broken config does not spin);
- forwards SIGHUP (reload) and SIGUSR1 (reopen logs) to every worker; on SIGTERM or
  SIGINT forwards SIGTERM, waits for the workers to drain, and exits 0 when all did;
- serves the admin listener for the group: ``/metrics`` adds up the workers' own
  metrics (each worker runs its admin endpoint on an ephemeral loopback port and says
  which on its output), so a scrape sees the whole process group;
- holds the state the workers share: the rate-limit buckets live in one file, which
  each worker maps (``fastgw/_core/bucket.pyx``, "Shared tables"), so a caller's limit
  is one bucket whichever worker the kernel hands its connection to. The file is made
  in a private directory (on /dev/shm when it has the room) and removed at once, with
  its directory: the supervisor keeps it open and hands the descriptor to each worker,
  so nothing is left behind however the group ends (its memory goes with the last
  process that has it open). The workers learn the descriptor and the table's size
  (``max_limit_keys`` of the config the group started with; a reload keeps the table,
  and a restarted worker must map it the same) through ``FASTGW_SHARED_BUCKETS``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import h11
import trio

from fastgw.config.model import GatewayConfig

PORTS_ENV = "FASTGW_WORKER_PORTS"
WORKER_ENV = "FASTGW_WORKER"
# The supervisor's pid: a worker whose parent is no longer this process drains and exits.
SUPERVISOR_PID_ENV = "FASTGW_SUPERVISOR_PID"
# "<max_keys>:<path>" of the bucket table the workers share (a /proc/self/fd path).
SHARED_BUCKETS_ENV = "FASTGW_SHARED_BUCKETS"
# Gauges that each worker reads from the shared table: the group's value, not a part.
_SHARED_GAUGES = frozenset({"fastgw_rate_limit_keys"})
# A worker that dies within this long of starting counts as a crash at start; after
# three in a row the supervisor waits longer before the next try (up to 10 s).
_EARLY_DEATH_S = 2.0


@dataclass
class Worker:
    index: int
    proc: trio.Process | None = None
    admin_port: int | None = None
    ready: trio.Event = field(default_factory=trio.Event)
    started_at: float = 0.0
    restarts: int = 0
    early_deaths: int = 0


def worker_overrides(config: GatewayConfig) -> GatewayConfig:
    """In a worker: the listener ports fixed by the supervisor, the admin endpoint on
    an ephemeral loopback port."""
    import dataclasses

    from fastgw.config.model import AdminConfig

    fixed = {}
    for item in filter(None, os.environ.get(PORTS_ENV, "").split(",")):
        name, _, port = item.rpartition("=")
        fixed[name] = int(port)
    listeners = tuple(
        dataclasses.replace(lc, port=fixed.get(lc.name, lc.port)) for lc in config.listeners
    )
    admin = AdminConfig(host="127.0.0.1", port=0) if config.admin is not None else None
    return dataclasses.replace(config, listeners=listeners, admin=admin)


def worker_shared_buckets() -> tuple[str, int] | None:
    """In a worker: (path, max_keys) of the bucket table the supervisor set up."""
    text = os.environ.get(SHARED_BUCKETS_ENV, "")
    if not text:
        return None
    max_keys, _, path = text.partition(":")
    return path, int(max_keys)


class Supervisor:
    def __init__(self, config: GatewayConfig, config_path: str, workers: int) -> None:
        self.config = config
        self.config_path = config_path
        self.workers = [Worker(i) for i in range(workers)]
        self.stopping = False
        self._holders: list[socket.socket] = []
        self.ports: dict[str, int] = {}
        self.buckets_fd = -1

    def _fix_ports(self) -> None:
        for lc in self.config.listeners:
            if lc.port:
                self.ports[lc.name] = lc.port
                continue
            family = socket.AF_INET6 if ":" in lc.host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((lc.host, 0))
            self._holders.append(s)
            self.ports[lc.name] = s.getsockname()[1]

    async def run(self) -> int:
        state_dir = tempfile.mkdtemp(prefix="fastgw-", dir=_state_parent(self.config))
        try:
            path = os.path.join(state_dir, "buckets")
            self.buckets_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)
        try:
            return await self._run()
        finally:
            os.close(self.buckets_fd)

    async def _run(self) -> int:
        self._fix_ports()
        sigs = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1]
        with trio.open_signal_receiver(*sigs) as signals:
            async with trio.open_nursery() as nursery:
                for w in self.workers:
                    nursery.start_soon(self._keep_running, w, nursery)
                with trio.fail_after(60):
                    for w in self.workers:
                        await w.ready.wait()
                if self.config.admin is not None:
                    addr = await nursery.start(self._serve_admin)
                    print(
                        f"fastgw: admin on http://{addr[0]}:{addr[1]}", file=sys.stderr, flush=True
                    )
                urls = ", ".join(
                    f"{'https' if lc.tls else 'http'}://{lc.host}:{self.ports[lc.name]}"
                    for lc in self.config.listeners
                )
                print(
                    f"fastgw: listening on {urls} ({len(self.workers)} workers)",
                    file=sys.stderr,
                    flush=True,
                )
                async for sig in signals:
                    if sig in (signal.SIGHUP, signal.SIGUSR1):
                        self._signal_all(sig)
                        continue
                    break
                self.stopping = True
                self._signal_all(signal.SIGTERM)
                codes = []
                with trio.move_on_after(self.config.drain_timeout_s + 5):
                    for w in self.workers:
                        if w.proc is not None:
                            codes.append(await w.proc.wait())
                nursery.cancel_scope.cancel()
        for s in self._holders:
            s.close()
        return 0 if codes and all(c == 0 for c in codes) else 1

    def _signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.send_signal(sig)

    async def _keep_running(self, w: Worker, nursery: trio.Nursery) -> None:
        env = dict(os.environ)
        env[PORTS_ENV] = ",".join(f"{n}={p}" for n, p in self.ports.items())
        env[WORKER_ENV] = str(w.index)
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        # The same descriptor number in the worker (pass_fds keeps it).
        buckets = f"/proc/self/fd/{self.buckets_fd}"
        env[SHARED_BUCKETS_ENV] = f"{self.config.max_limit_keys}:{buckets}"
        while not self.stopping:
            w.admin_port = None
            w.started_at = trio.current_time()
            proc = await nursery.start(
                functools.partial(
                    trio.run_process,
                    [sys.executable, "-m", "fastgw", "serve", "-c", self.config_path],
                    env=env,
                    stderr=subprocess.PIPE,
                    check=False,
                    pass_fds=(self.buckets_fd,),
                )
            )
            w.proc = proc
            await self._follow(w, proc)
            code = await proc.wait()
            if self.stopping:
                return
            lived = trio.current_time() - w.started_at
            w.early_deaths = w.early_deaths + 1 if lived < _EARLY_DEATH_S else 0
            w.restarts += 1
            print(
                f"fastgw: worker {w.index} exited with {code}; restarting",
                file=sys.stderr,
                flush=True,
            )
            if w.early_deaths >= 3:
                await trio.sleep(min(10.0, 0.5 * 2 ** (w.early_deaths - 3)))

    async def _follow(self, w: Worker, proc: trio.Process) -> None:
        """Relay the worker's output, noting its admin port and readiness."""
        assert proc.stderr is not None
        buf = b""
        async for data in proc.stderr:
            buf += data
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                m = re.match(r"fastgw: admin on http://127\.0\.0\.1:(\d+)", line)
                if m:
                    w.admin_port = int(m.group(1))
                    continue
                if line.startswith("fastgw: listening on"):
                    w.ready.set()
                    continue
                print(f"[worker {w.index}] {line}", file=sys.stderr, flush=True)

    # -- the group's admin endpoint -----------------------------------------------------

    async def _serve_admin(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        admin = self.config.admin
        assert admin is not None
        listeners = await trio.open_tcp_listeners(admin.port, host=admin.host)
        addr = listeners[0].socket.getsockname()[:2]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._admin_conn, listeners)
            task_status.started(addr)

    async def _admin_conn(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
        try:
            with trio.move_on_after(10):
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                        continue
                    if not isinstance(ev, h11.Request):
                        return
                    path = ev.target.split(b"?", 1)[0]
                    if path == b"/metrics":
                        ctype, body = await self._group_metrics()
                        status = 200
                    elif path in (b"/healthz", b"/readyz", b"/config"):
                        status, ctype, body = await self._proxy_first(path)
                    else:
                        status, ctype, body = 404, b"application/json", b'{"error":"not_found"}\n'
                    hs = [
                        (b"content-type", ctype),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ]
                    await stream.send_all(conn.send(h11.Response(status_code=status, headers=hs)))
                    await stream.send_all(conn.send(h11.Data(data=body)))
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                    return
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            with trio.move_on_after(1):
                await stream.aclose()

    async def _proxy_first(self, path: bytes) -> tuple[int, bytes, bytes]:
        for w in self.workers:
            if w.admin_port is not None:
                try:
                    return await _get(w.admin_port, path)
                except OSError:
                    continue
        body = json.dumps({"ready": False, "reasons": ["no worker answers"]}).encode()
        return 503, b"application/json", body

    async def _group_metrics(self) -> tuple[bytes, bytes]:
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        texts = []
        for w in self.workers:
            if w.admin_port is None:
                continue
            try:
                status, _, body = await _get(w.admin_port, b"/metrics")
            except OSError:
                continue
            if status == 200:
                texts.append(body.decode())
        return CONTENT_TYPE_LATEST.encode(), merge_metrics(texts, len(self.workers))


async def _get(port: int, path: bytes) -> tuple[int, bytes, bytes]:
    """A one-shot GET to a worker's admin endpoint on loopback."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            req = h11.Request(method="GET", target=path, headers=[("host", "worker")])
            await stream.send_all(conn.send(req) + conn.send(h11.EndOfMessage()))
            status, ctype, body = 0, b"", b""
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(ev, h11.Response):
                    status = ev.status_code
                    ctype = dict(ev.headers).get(b"content-type", b"")
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                    return status, ctype, body


def merge_metrics(texts: list[str], workers: int) -> bytes:
    """Add up the workers' expositions: samples with the same name and labels are
    summed (counters, gauges such as open connections, histogram buckets), except info
    metrics, timestamps and gauges of state the workers share (``_SHARED_GAUGES``: every
    worker reports the whole of it), where one value stands for all (the largest)."""
    from prometheus_client.core import Metric
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import CollectorRegistry
    from prometheus_client.samples import Sample

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, float]] = {}
    order: dict[str, list[tuple]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                values[fam.name] = {}
                order[fam.name] = []
            vals = values[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in vals:
                    order[fam.name].append(key)
                    vals[key] = s.value
                elif (
                    fam.type == "info"
                    or s.name.endswith("_timestamp_seconds")
                    or s.name in _SHARED_GAUGES
                ):
                    vals[key] = max(vals[key], s.value)
                else:
                    vals[key] += s.value
    workers_fam = Metric("fastgw_workers", "Worker processes answering this scrape", "gauge")
    workers_fam.samples.append(Sample("fastgw_workers", {}, float(len(texts))))

    class _Merged:
        def collect(self):  # type: ignore[no-untyped-def]
            yield workers_fam
            for name, fam in families.items():
                fam.samples = [
                    Sample(n, dict(lab), values[name][(n, lab)]) for n, lab in order[name]
                ]
                yield fam

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


def _state_parent(config: GatewayConfig) -> str | None:
    """/dev/shm when it has room for the shared bucket table (about 80 bytes a key, and
    a container's /dev/shm may be 64 MiB), else the temporary directory."""
    shm = "/dev/shm"
    need_bytes = 100 * config.max_limit_keys + (16 << 20)
    try:
        if os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= need_bytes:
            return shm
    except OSError:
        pass
    return None


def run_workers(config: GatewayConfig, config_path: str, workers: int) -> int:
    return trio.run(Supervisor(config, config_path, workers).run)
