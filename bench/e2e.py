"""End-to-end loopback benchmark: fastgw vs HAProxy (and a minimal trio proxy) in one run.

    python -m bench.e2e                       # 50 and 1000 connections, plain upstream
    python -m bench.e2e --tls                 # TLS to the upstream
    python -m bench.e2e --conns 50 --duration 5 --targets fastgw,haproxy

Layout, so that the proxies compete for the same thing: the proxy under test is pinned to
CPU 0; the upstream (nginx answering a 2-byte body, or a built-in trio responder when nginx
is missing) and the load generator (wrk, or a built-in keep-alive generator) share CPU 1.
Each target runs against the same upstream, one after the other, with the same load.

Reported per target and connection count: requests/s, p50/p99 latency (wrk's), CPU
microseconds per request (the proxy process's utime+stime over the run divided by the
requests served: robust to a noisy machine, unlike requests/s) and peak RSS (VmHWM).
Ratios against HAProxy are computed within the run. Results go to stdout and, with
--json, to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CPU_PROXY = "0"
CPU_LOAD = "1"


@dataclass
class Result:
    target: str
    conns: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float
    peak_rss_mib: float
    errors: int


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


@contextlib.contextmanager
def process(argv: list[str], port: int, **kw) -> Iterator[subprocess.Popen]:
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    try:
        wait_port(port)
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


@contextlib.contextmanager
def upstream(d: Path, tls: bool, certs: dict[str, str]) -> Iterator[int]:
    port = free_port()
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
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
    with process(argv, port, cwd=HERE.parent):
        yield port


def haproxy_conf(d: Path, port: int, up_port: int, tls: bool, certs: dict[str, str]) -> Path:
    server_ssl = f" ssl verify required ca-file {certs['ca']} sni str(localhost)" if tls else ""
    conf = d / "haproxy.cfg"
    conf.write_text(
        f"""global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend f
  bind 127.0.0.1:{port}
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


def fastgw_conf(d: Path, port: int, up_port: int, tls: bool, certs: dict[str, str]) -> Path:
    scheme = "https" if tls else "http"
    ca = f'ca_file = "{certs["ca"]}"\nserver_name = "localhost"\n' if tls else ""
    conf = d / "gateway.toml"
    conf.write_text(
        f"""[limits]
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
path_prefix = "/"
backend = "fn"
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
    if name == "fastgw":
        conf = fastgw_conf(d, port, up_port, tls, certs)
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


_LAT = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)


def run_wrk(port: int, conns: int, duration_s: float) -> tuple[int, float, float, float, int]:
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
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return reqs, rps, lat.get("50", float("nan")), lat.get("99", float("nan")), errors


def run_builtin_load(
    port: int, conns: int, duration_s: float
) -> tuple[int, float, float, float, int]:
    out = subprocess.run(
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
        check=True,
        cwd=HERE.parent,
    ).stdout
    r = json.loads(out)
    return r["requests"], r["rps"], r["p50_ms"], r["p99_ms"], r["errors"]


def measure(
    name: str,
    d: Path,
    up_port: int,
    conns: int,
    duration_s: float,
    tls: bool,
    certs: dict[str, str],
) -> Result:
    port = free_port()
    argv = target_argv(name, d, port, up_port, tls, certs)
    with process(argv, port, cwd=HERE.parent) as p:
        load = run_wrk if shutil.which("wrk") else run_builtin_load
        load(port, min(conns, 50), 1.0)  # warm: pools filled, code paths hot
        t0 = cpu_ticks(p.pid)
        reqs, rps, p50, p99, errors = load(port, conns, duration_s)
        t1 = cpu_ticks(p.pid)
        rss = peak_rss_mib(p.pid)
    hz = os.sysconf("SC_CLK_TCK")
    cpu_us = (t1 - t0) / hz * 1e6 / max(reqs, 1)
    return Result(name, conns, rps, p50, p99, cpu_us, rss, errors)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--conns", default="50,1000")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--targets", default="fastgw,haproxy,minimal")
    ap.add_argument("--tls", action="store_true", help="TLS between proxy and upstream")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    targets = [t for t in args.targets.split(",") if t]
    if "haproxy" in targets and not shutil.which("haproxy"):
        print("haproxy not installed: skipping it (apt-get install haproxy)", file=sys.stderr)
        targets.remove("haproxy")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="fastgw-bench-") as tmp:
        d = Path(tmp)
        certs = write_certs(d) if args.tls else {}
        with upstream(d, args.tls, certs) as up_port:
            for conns in (int(c) for c in args.conns.split(",")):
                for name in targets:
                    r = measure(name, d, up_port, conns, args.duration, args.tls, certs)
                    results.append(r)
                    print(
                        f"{r.target:>8} c={r.conns:<5} {r.rps:>9.0f} req/s  p50 {r.p50_ms:6.2f} ms"
                        f"  p99 {r.p99_ms:6.2f} ms  {r.cpu_us_per_req:6.1f} us CPU/req"
                        f"  peak RSS {r.peak_rss_mib:6.1f} MiB  errors {r.errors}",
                        flush=True,
                    )
    print()
    for conns in sorted({r.conns for r in results}):
        by = {r.target: r for r in results if r.conns == conns}
        h = by.get("haproxy")
        f = by.get("fastgw")
        if h and f:
            print(
                f"c={conns}: fastgw/haproxy requests/s {f.rps / h.rps:.2f}x, "
                f"CPU per request {f.cpu_us_per_req / h.cpu_us_per_req:.2f}x"
            )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
