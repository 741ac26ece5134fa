"""End-to-end loopback benchmark: fastgw vs HAProxy (and a minimal trio proxy) in one run.

    python -m bench.e2e                       # 50 and 1000 connections, plain upstream
    python -m bench.e2e --tls                 # TLS to the upstream
    python -m bench.e2e --conns 50 --duration 5 --targets fastgw,haproxy

    python -m bench.e2e --no-wrk --no-nginx   # force the built-in load generator and upstream

    # the limits issue's "per-identity limit on every request within 5% of without":
    python -m bench.e2e --conns 50 --targets fastgw-key,fastgw-limit,fastgw-redis --repeat 3

Targets: fastgw, haproxy, minimal (a trio proxy doing nothing per request); fastgw-ops
(metrics scraped and the audit log), fastgw-map (a 10k-entry path map); fastgw-key (every
request carries an API key: the identity is established), fastgw-limit (the same plus a
per-identity rate limit too high to trigger, taken on every request), fastgw-redis (the
same limit in a redis-server started for the run, pinned with the load generator).
fastgw-key, fastgw-limit and fastgw-redis need wrk (the key goes in a request header).
With --repeat N the targets run N times in turn and the ratios use the medians.

Layout, so that the proxies compete for the same thing: the proxy under test is pinned to
CPU 0; the upstream (nginx answering a 2-byte body, or bench/upstream.py, a built-in epoll
responder, when nginx is missing) and the load generator (wrk, or bench/loadgen.py, a
built-in epoll keep-alive generator, when wrk is missing) share CPU 1. Each target runs
against the same upstream, one after the other, with the same load.

Reported per target and connection count: requests/s, p50/p99 latency (the load
generator's), CPU microseconds per request (the proxy process's utime+stime over the run
divided by the requests served: robust to a noisy machine, unlike requests/s) and peak
RSS (VmHWM). Ratios against HAProxy are computed within the run; the minimal trio proxy's
ratio is the ceiling of trio on this machine. Results go to stdout and to a JSON file
(bench/results/e2e-<plain|tls>-<stamp>.json unless --json names another).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
CPU_PROXY = "0"
CPU_LOAD = "1"
# Warm-up: 1 s, plus 1 s per 400 connections (1000 connections: 3.5 s), enough on a
# busy 2-CPU machine for 1000 TLS handshakes to nginx.
WARM_S = 1.0
WARM_CONNS_PER_S = 400
# The identity targets: an API key on every request (wrk -H), and its hash in config.
API_KEY = "bench-key-0123456789abcdef0123456789abcdef"
IDENTITY_TARGETS = ("fastgw-key", "fastgw-limit", "fastgw-redis")
# Every HAProxy reference (here and bench/e2e_auth.py): one thread, like one fastgw
# worker; connections to the upstream kept (http-reuse always); the frontend follows.
HAPROXY_COMMON = """  nbthread 1
  maxconn 4000
  tune.pool-low-fd-ratio 90
  tune.pool-high-fd-ratio 95
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend f
"""


@dataclass
class Result:
    target: str
    conns: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float
    peak_rss_mib: float
    errors: int  # all of them: non-2xx answers, connect/read/write errors, timeouts
    non_2xx: int
    # fastgw-ops only: /metrics scrapes taken during the measured run (ms).
    scrape_ms_p50: float | None = None
    scrape_ms_max: float | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (after pid, comm)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def taskset(cpu: str) -> list[str]:
    return ["taskset", "-c", cpu] if shutil.which("taskset") else []


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def check_alive(p: subprocess.Popen, name: str, log: Path) -> None:
    if p.poll() is not None:
        raise RuntimeError(f"{name} exited with status {p.returncode}:\n{log_tail(log)}")


@contextlib.contextmanager
def process(argv: list[str], port: int, log: Path, **kw) -> Iterator[subprocess.Popen]:
    # stderr goes to a file: a pipe that nobody reads would stall a chatty process once
    # it fills, in the middle of a measurement.
    with log.open("ab") as err:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, **kw)
    try:
        try:
            wait_port(port)
        except RuntimeError:
            check_alive(p, argv[0], log)
            raise
        yield p
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def write_certs(d: Path) -> dict[str, str]:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    paths = {
        "ca": d / "ca.pem",
        "cert": d / "up.pem",
        "key": d / "up.key",
        "both": d / "up-both.pem",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    chain = b"".join(b.bytes() for b in leaf.cert_chain_pems)
    paths["cert"].write_bytes(chain)
    paths["both"].write_bytes(chain + leaf.private_key_pem.bytes())
    return {k: str(v) for k, v in paths.items()}


def find_nginx() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )


@contextlib.contextmanager
def upstream(d: Path, tls: bool, certs: dict[str, str], nginx: str | None) -> Iterator[int]:
    """nginx when given its path, else bench/upstream.py."""
    port = free_port()
    if nginx:
        listen = f"127.0.0.1:{port}" + (" ssl" if tls else "")
        ssl_lines = (
            f"ssl_certificate {certs['cert']}; ssl_certificate_key {certs['key']};" if tls else ""
        )
        conf = d / "nginx.conf"
        conf.write_text(
            f"worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/nginx.err;\n"
            "events { worker_connections 8192; }\n"
            "http { access_log off; keepalive_requests 100000000; keepalive_timeout 300s;\n"
            f"  client_body_temp_path {d}/nb; proxy_temp_path {d}/np;\n"
            f"  server {{ listen {listen}; {ssl_lines}\n"
            '    location / { return 200 "ok"; } } }\n'
        )
        argv = [*taskset(CPU_LOAD), nginx, "-c", str(conf), "-e", f"{d}/nginx.err"]
    else:
        argv = [*taskset(CPU_LOAD), sys.executable, "-m", "bench.upstream", str(port)]
        if tls:
            argv += ["--cert", certs["cert"], "--key", certs["key"]]
    with process(argv, port, d / "upstream.log", cwd=HERE.parent):
        yield port


@contextlib.contextmanager
def redis_server(d: Path) -> Iterator[str]:
    """A redis-server for fastgw-redis (no persistence), pinned with the load; its
    address."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("fastgw-redis needs redis-server (apt-get install redis-server)")
    port = free_port()
    argv = [
        *taskset(CPU_LOAD), exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(d),
    ]  # fmt: skip
    with process(argv, port, d / "redis.log"):
        yield f"127.0.0.1:{port}"


def haproxy_conf(d: Path, port: int, up_port: int, tls: bool, certs: dict[str, str]) -> Path:
    # tune.pool-*-fd-ratio: by default HAProxy stops keeping idle server connections once
    # 20% of its descriptors are in use (maxconn 4000 gives about 8000). At 1000 clients it
    # holds 2000 (25%), so it closed the upstream connection after nearly every response
    # and opened a new one for the next: with TLS a handshake per request (800 req/s and
    # 400+ us of CPU per request here, against 8000+ req/s once connections are kept).
    # The other targets keep their upstream connections, so HAProxy must too.
    server_ssl = f" ssl verify required ca-file {certs['ca']} sni str(localhost)" if tls else ""
    conf = d / "haproxy.cfg"
    conf.write_text(
        f"""global
{HAPROXY_COMMON}  bind 127.0.0.1:{port}
  option forwardfor
  unique-id-format %{{+X}}o%ci%cp%rt
  unique-id-header X-Request-Id
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-request add-header Via "1.1 haproxy"
  default_backend b
backend b
  server s1 127.0.0.1:{up_port}{server_ssl}
"""
    )
    return conf


def fastgw_conf(
    d: Path,
    port: int,
    up_port: int,
    tls: bool,
    certs: dict[str, str],
    ops: bool = False,
    map_entries: int = 0,
    limit: str = "",
    redis_address: str = "",
) -> Path:
    scheme = "https" if tls else "http"
    ca = f'ca_file = "{certs["ca"]}"\nserver_name = "localhost"\n' if tls else ""
    conf = d / f"gateway-{'ops' if ops else 'plain'}-{map_entries}-{limit or 'none'}.toml"
    # fastgw-ops: the admin listener (metrics) and the audit log of every request, the
    # operations issue's "within 5% of the same run with both disabled".
    # fastgw-map: routing through a 10k-entry path map (the routing issue's "within 5% of
    # the pass-through figure").
    ops_toml = (
        f'[admin]\naddress = "127.0.0.1:{ADMIN_PORTS[port]}"\n[audit]\npath = "{d}/audit.log"\n'
        if ops
        else ""
    )
    route = 'path_prefix = "/"\nbackend = "fn"'
    if map_entries:
        mp = d / "paths.map"
        mp.write_text("".join(f"/svc{i}/ fn\n" for i in range(map_entries - 1)) + "/ fn\n")
        route = f'path_map = "{mp}"\npath_map_type = "beg"'
    # fastgw-key/-limit/-redis: every request is identified by an API key; -limit and
    # -redis add a per-identity rate limit taken on every request, too high to trigger
    # (the limits issue's "within 5% of the same run without limits"), in the core's
    # table or in Redis.
    limit_toml = ""
    if limit:
        import hashlib

        digest = hashlib.sha256(API_KEY.encode()).hexdigest()
        limit_toml = f'[api_keys]\n[[api_keys.keys]]\nname = "bench"\nsha256 = "{digest}"\n'
    if limit in ("local", "redis"):
        limit_toml += (
            '[[rate_limits]]\nname = "per-caller"\nkey = "identity"\n'
            "rate_per_s = 10000000\nburst = 10000000\n"
        )
    if limit == "redis":
        limit_toml += f'[limits_store]\ntype = "redis"\naddress = "{redis_address}"\n'

    conf.write_text(
        ops_toml
        + limit_toml
        + f"""[limits]
max_connections = 20000

[[listeners]]
name = "bench"
address = "127.0.0.1:{port}"

[backends.fn]
endpoints = ["{scheme}://127.0.0.1:{up_port}"]
pool_max_size = 2000
{ca}
[[routes]]
name = "all"
{route}
"""
    )
    return conf


def target_argv(
    name: str, d: Path, port: int, up_port: int, tls: bool, certs: dict[str, str]
) -> list[str]:
    if name == "haproxy":
        return [
            *taskset(CPU_PROXY),
            "haproxy",
            "-db",
            "-f",
            str(haproxy_conf(d, port, up_port, tls, certs)),
        ]
    if name in ("fastgw", "fastgw-ops", "fastgw-map", *IDENTITY_TARGETS):
        if name == "fastgw-ops":
            ADMIN_PORTS[port] = free_port()
        conf = fastgw_conf(
            d,
            port,
            up_port,
            tls,
            certs,
            ops=name == "fastgw-ops",
            map_entries=10_000 if name == "fastgw-map" else 0,
            limit={"fastgw-key": "key", "fastgw-limit": "local", "fastgw-redis": "redis"}.get(
                name, ""
            ),
            redis_address=REDIS_ADDRESS[0],
        )
        return [*taskset(CPU_PROXY), sys.executable, "-m", "fastgw", "serve", "-c", str(conf)]
    if name == "minimal":
        argv = [
            *taskset(CPU_PROXY),
            sys.executable,
            "-m",
            "bench.minimal_proxy",
            str(port),
            str(up_port),
        ]
        return argv + (["--tls", certs["ca"]] if tls else [])
    raise ValueError(name)


# fastgw-ops: the admin port chosen for each listening port.
ADMIN_PORTS: dict[int, int] = {}
# Request header lines wrk sends to each listening port (the identity targets).
WRK_HEADERS: dict[int, list[str]] = {}
# fastgw-redis: the address of the redis-server started for the run.
REDIS_ADDRESS = [""]


def scrape_during(port: int, duration_s: float, out: list[float]) -> threading.Thread:
    """Scrape /metrics every 0.25 s while the load runs, recording each scrape's time."""

    def loop() -> None:
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            t0 = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
                while s.recv(65536):
                    pass
            out.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.25)

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    return th


_LAT = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)


# requests, requests/s, p50 ms, p99 ms, errors, of which non-2xx answers
LoadResult = tuple[int, float, float, float, int, int]


def run_wrk(port: int, conns: int, duration_s: float) -> LoadResult:
    threads = 1 if conns <= 100 else 2
    out = subprocess.run(
        [
            *taskset(CPU_LOAD),
            "wrk",
            f"-t{threads}",
            f"-c{conns}",
            f"-d{max(1, round(duration_s))}s",
            "--latency",
            "--timeout",
            "10s",
            *(a for h in WRK_HEADERS.get(port, ()) for a in ("-H", h)),
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for pct, val, unit in _LAT.findall(out):
        lat[pct] = float(val) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    errors = non_2xx = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        non_2xx = int(m.group(1))
        errors += non_2xx
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return reqs, rps, lat.get("50", float("nan")), lat.get("99", float("nan")), errors, non_2xx


def run_builtin_load(port: int, conns: int, duration_s: float) -> LoadResult:
    proc = subprocess.run(
        [
            *taskset(CPU_LOAD),
            sys.executable,
            "-m",
            "bench.loadgen",
            str(port),
            str(conns),
            str(duration_s),
        ],
        capture_output=True,
        text=True,
        cwd=HERE.parent,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench.loadgen failed ({proc.returncode}):\n{proc.stderr}")
    r = json.loads(proc.stdout)
    nan = float("nan")  # null percentiles: no request completed
    p50, p99 = r["p50_ms"], r["p99_ms"]
    return (
        r["requests"],
        r["rps"],
        nan if p50 is None else p50,
        nan if p99 is None else p99,
        r["errors"],
        r["non_2xx"],
    )


LoadFn = Callable[[int, int, float], LoadResult]


def measure(
    name: str,
    d: Path,
    up_port: int,
    conns: int,
    duration_s: float,
    tls: bool,
    certs: dict[str, str],
    load: LoadFn,
) -> Result:
    port = free_port()
    if name in IDENTITY_TARGETS:
        if load is not run_wrk:
            raise SystemExit(f"{name} needs wrk (the API key goes in a request header)")
        WRK_HEADERS[port] = [f"X-Api-Key: {API_KEY}"]
    argv = target_argv(name, d, port, up_port, tls, certs)
    log = d / f"{name}.log"
    with process(argv, port, log, cwd=HERE.parent) as p:
        # Warm: pools filled, code paths hot. With the measured connection count, so that
        # the upstream pools hold as many connections as the run needs (warming with 50
        # left 950 upstream connects, with TLS handshakes, inside the measured run), and
        # long enough to get past the burst of connects that a thousand new clients
        # cause: after 1 s, HAProxy was still opening TLS connections when the run
        # began (116 us of CPU per request at 1000 connections, 52 us after 3 s). A
        # pass cut short in the burst also leaves upstream connections mid-exchange,
        # which HAProxy does not reuse.
        load(port, conns, WARM_S + conns / WARM_CONNS_PER_S)
        scrapes: list[float] = []
        scraper = None
        if name == "fastgw-ops":
            scraper = scrape_during(ADMIN_PORTS[port], duration_s - 0.5, scrapes)
        t0 = cpu_ticks(p.pid)
        reqs, rps, p50, p99, errors, non_2xx = load(port, conns, duration_s)
        t1 = cpu_ticks(p.pid)
        if scraper is not None:
            scraper.join()
        rss = peak_rss_mib(p.pid)
        check_alive(p, name, log)
    hz = os.sysconf("SC_CLK_TCK")
    cpu_us = (t1 - t0) / hz * 1e6 / max(reqs, 1)
    scrape_p50 = sorted(scrapes)[len(scrapes) // 2] if scrapes else None
    return Result(
        name,
        conns,
        rps,
        p50,
        p99,
        cpu_us,
        rss,
        errors,
        non_2xx,
        scrape_p50,
        max(scrapes) if scrapes else None,
    )


def versions(load: LoadFn, nginx: str | None) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        out = (p.stdout or p.stderr).strip().splitlines()
        return out[0].split(" Copyright")[0] if out else "?"

    try:
        fastgw = metadata.version("fastgw")
    except metadata.PackageNotFoundError:
        fastgw = "?"
    v = {
        "python": platform.python_version(),
        "fastgw": fastgw,
        "cpus": str(os.cpu_count()),
        "load": first_line(["wrk", "--version"]) if load is run_wrk else "bench.loadgen",
        "upstream": first_line([nginx, "-v"]) if nginx else "bench.upstream",
    }
    if shutil.which("haproxy"):
        v["haproxy"] = first_line(["haproxy", "-v"])
    return v


def medians(results: list[Result]) -> list[Result]:
    """One result per (target, conns): the median of each figure over the repeats."""
    import statistics

    out = []
    for key in dict.fromkeys((r.target, r.conns) for r in results):
        rs = [r for r in results if (r.target, r.conns) == key]
        if len(rs) == 1:
            out.append(rs[0])
            continue
        out.append(
            Result(
                key[0],
                key[1],
                statistics.median(r.rps for r in rs),
                statistics.median(r.p50_ms for r in rs),
                statistics.median(r.p99_ms for r in rs),
                statistics.median(r.cpu_us_per_req for r in rs),
                max(r.peak_rss_mib for r in rs),
                sum(r.errors for r in rs),
                sum(r.non_2xx for r in rs),
            )
        )
    return out


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summarize(results: list[Result]) -> list[dict[str, float | int]]:
    """Per connection count: fastgw and the minimal proxy against HAProxy, same run."""
    rows: list[dict[str, float | int]] = []
    nan = float("nan")
    for conns in sorted({r.conns for r in results}):
        by = {r.target: r for r in results if r.conns == conns}
        h, f, m = by.get("haproxy"), by.get("fastgw"), by.get("minimal")
        rows.append(
            {
                "conns": conns,
                "fastgw_vs_haproxy_rps": ratio(f.rps, h.rps) if f and h else nan,
                "fastgw_vs_haproxy_cpu_per_req": (
                    ratio(f.cpu_us_per_req, h.cpu_us_per_req) if f and h else nan
                ),
                "fastgw_p99_ms": f.p99_ms if f else nan,
                "fastgw_peak_rss_mib": f.peak_rss_mib if f else nan,
                "minimal_vs_haproxy_rps": ratio(m.rps, h.rps) if m and h else nan,
                "minimal_vs_haproxy_cpu_per_req": (
                    ratio(m.cpu_us_per_req, h.cpu_us_per_req) if m and h else nan
                ),
            }
        )
    return rows


def print_summary(rows: list[dict[str, float | int]]) -> None:
    def x(v: float | int) -> str:
        return "-" if v != v else f"{v:.2f}x"  # NaN: a target was not run

    def num(v: float | int) -> str:
        return "-" if v != v else f"{v:.2f}"

    print()
    print("ratios to HAProxy, same run (req/s: higher is better; CPU/req: lower is better)")
    print(
        f"{'conns':>6} | {'fastgw req/s':>12} {'CPU/req':>8} {'p99 ms':>8} {'peak MiB':>9}"
        f" | {'minimal req/s':>13} {'CPU/req':>8}"
    )
    for r in rows:
        print(
            f"{r['conns']:>6} | {x(r['fastgw_vs_haproxy_rps']):>12}"
            f" {x(r['fastgw_vs_haproxy_cpu_per_req']):>8}"
            f" {num(r['fastgw_p99_ms']):>8} {num(r['fastgw_peak_rss_mib']):>9}"
            f" | {x(r['minimal_vs_haproxy_rps']):>13}"
            f" {x(r['minimal_vs_haproxy_cpu_per_req']):>8}"
        )
    print("(minimal: a trio proxy that does nothing per request, the ceiling of trio here)")


def nan_to_none(v: object) -> object:
    """NaN (a target not run, a percentile wrk did not print) is not JSON: null."""
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: nan_to_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [nan_to_none(x) for x in v]
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--conns", default="50,1000", help="comma-separated (default: %(default)s)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    ap.add_argument("--targets", default="fastgw,haproxy,minimal")
    ap.add_argument("--tls", action="store_true", help="TLS between proxy and upstream")
    ap.add_argument("--repeat", type=int, default=1, help="run the targets this many times in turn")
    ap.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="results file (default: bench/results/e2e-<plain|tls>-<stamp>.json)",
    )
    ap.add_argument(
        "--no-wrk", action="store_true", help="use bench.loadgen even if wrk is installed"
    )
    ap.add_argument(
        "--no-nginx", action="store_true", help="use bench.upstream even if nginx is installed"
    )
    args = ap.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    targets = [t for t in args.targets.split(",") if t]
    if "haproxy" in targets and not shutil.which("haproxy"):
        print("haproxy not installed: skipping it (apt-get install haproxy)", file=sys.stderr)
        targets.remove("haproxy")
    load: LoadFn = run_wrk if shutil.which("wrk") and not args.no_wrk else run_builtin_load
    nginx = None if args.no_nginx else find_nginx()
    info = versions(load, nginx)
    print(
        f"fastgw e2e bench ({'TLS' if args.tls else 'plain'} upstream, {args.duration:g} s"
        f" per run): load {info['load']}, upstream {info['upstream']}, {info['cpus']} CPUs",
        flush=True,
    )
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="fastgw-bench-") as tmp:
        d = Path(tmp)
        certs = write_certs(d) if args.tls else {}
        with contextlib.ExitStack() as stack:
            up_port = stack.enter_context(upstream(d, args.tls, certs, nginx))
            if "fastgw-redis" in targets:
                REDIS_ADDRESS[0] = stack.enter_context(redis_server(d))
            runs = [
                (conns, name)
                for conns in (int(c) for c in args.conns.split(","))
                for _ in range(max(1, args.repeat))
                for name in targets
            ]
            for conns, name in runs:
                r = measure(name, d, up_port, conns, args.duration, args.tls, certs, load)
                results.append(r)
                print(
                    f"{r.target:>10} c={r.conns:<5} {r.rps:>9.0f} req/s  p50 {r.p50_ms:6.2f} ms"
                    f"  p99 {r.p99_ms:6.2f} ms  {r.cpu_us_per_req:6.1f} us CPU/req"
                    f"  peak RSS {r.peak_rss_mib:6.1f} MiB  errors {r.errors}"
                    + (f" ({r.non_2xx} non-2xx)" if r.non_2xx else "")
                    + (
                        f"  scrape p50 {r.scrape_ms_p50:.1f} ms max {r.scrape_ms_max:.1f} ms"
                        if r.scrape_ms_p50 is not None and r.scrape_ms_max is not None
                        else ""
                    ),
                    flush=True,
                )
    results_all = results
    results = medians(results)
    rows = summarize(results)
    print_summary(rows)
    for conns in sorted({r.conns for r in results}):
        by = {r.target: r for r in results if r.conns == conns}
        for name, what in (
            ("fastgw-limit", "a per-identity rate limit"),
            ("fastgw-redis", "a per-identity rate limit in Redis"),
        ):
            if "fastgw-key" in by and name in by:
                f, o = by["fastgw-key"], by[name]
                print(
                    f"c={conns}: with {what} taken on every request, fastgw serves "
                    f"{o.rps / f.rps:.3f}x the requests/s at "
                    f"{o.cpu_us_per_req / f.cpu_us_per_req:.3f}x the CPU per request of the "
                    "same run without (both identify the caller by API key)"
                )
        if "fastgw" in by and "fastgw-map" in by:
            f, o = by["fastgw"], by["fastgw-map"]
            print(
                f"c={conns}: routing through a 10k-entry path map, fastgw serves "
                f"{o.rps / f.rps:.2f}x the requests/s at {o.cpu_us_per_req / f.cpu_us_per_req:.2f}x"
                " the CPU per request of the same run with one prefix route"
            )
        if "fastgw" in by and "fastgw-ops" in by:
            f, o = by["fastgw"], by["fastgw-ops"]
            print(
                f"c={conns}: with metrics and the audit log, fastgw serves "
                f"{o.rps / f.rps:.2f}x the requests/s at {o.cpu_us_per_req / f.cpu_us_per_req:.2f}x"
                " the CPU per request of the same run without them"
            )
    json_path = args.json
    if json_path is None:
        RESULTS_DIR.mkdir(exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        json_path = RESULTS_DIR / f"e2e-{'tls' if args.tls else 'plain'}-{stamp}.json"
    doc = {
        "tls": args.tls,
        "duration_s": args.duration,
        "versions": info,
        "repeat": args.repeat,
        "results": [asdict(r) for r in results_all],
        "medians": [asdict(r) for r in results],
        "summary": rows,
    }
    json_path.write_text(json.dumps(nan_to_none(doc), indent=2, allow_nan=False) + "\n")
    print(f"results: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
