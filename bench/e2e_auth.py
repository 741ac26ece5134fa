"""End-to-end bench of the identity workload: fastgw vs HAProxy doing the same work.

    python -m bench.e2e_auth                  # both workloads, 50 connections
    python -m bench.e2e_auth --duration 5 --fresh-duration 2

Every request carries an RS256 bearer token. The gateway routes it through a 1000-entry
prefix map, verifies the token, adds X-Forwarded-For and an identity header, and
proxies to nginx. HAProxy 2.6 (one thread) does the same: ``map_beg`` routing,
``jwt_verify`` with the RS256 public key, ``option forwardfor``, and an
``X-Fastgw-Subject`` header taken from the token.

- ``pool``: tokens drawn in turn from 1000 distinct identities. HAProxy checks every
  signature; fastgw checks each token once and then finds it in its cache.
- ``fresh``: a token never seen before on every request (so every signature is checked).
  The tokens are signed before the run (cached under bench/results/), enough for the
  run at the rates seen here; the run is shorter for that reason.

Layout as in bench/e2e.py: the proxy on CPU 0, wrk (with a Lua script that sets the
Authorization header) and nginx on CPU 1. Prints requests/s, p99 and CPU per request,
and the fastgw/HAProxy ratios of the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.e2e import (
    _LAT,
    CPU_LOAD,
    CPU_PROXY,
    HAPROXY_COMMON,
    HERE,
    RESULTS_DIR,
    check_alive,
    cpu_ticks,
    find_nginx,
    free_port,
    peak_rss_mib,
    process,
    taskset,
    upstream,
)

ISS = "https://idp.bench"
AUD = "api://bench"
ROUTES = 1000

LUA = """
local tokens = {}
local i = 0
init = function(args)
  for line in io.lines(args[1]) do tokens[#tokens + 1] = line end
  i = tonumber(args[2] or "0")
end
request = function()
  i = i % #tokens + 1
  local path = "/svc" .. (i % %ROUTES%) .. "/item"
  return wrk.format("GET", path, {["Authorization"] = "Bearer " .. tokens[i]})
end
""".replace("%ROUTES%", str(ROUTES))


def keys(d: Path) -> tuple[object, Path, Path]:
    """An RSA key, its public key PEM (what HAProxy 2.6's jwt_verify is given: it
    reports a self-signed certificate file as "not found") and a certificate."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    cache = RESULTS_DIR / "auth-bench-key.pem"
    RESULTS_DIR.mkdir(exist_ok=True)
    if cache.exists():
        key = serialization.load_pem_private_key(cache.read_bytes(), password=None)
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cache.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    pub = d / "pub.pem"
    pub.write_bytes(
        key.public_key().public_bytes(  # type: ignore[union-attr]
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-issuer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[union-attr, arg-type]
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    crt = d / "cert.pem"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, pub, crt


def tokens(key: object, n: int, tag: str) -> Path:
    """``n`` distinct RS256 tokens (sub user0..), valid for a day, cached on disk."""
    import jwt

    fp = hashlib.sha256(str(key.public_key().public_numbers().n).encode()).hexdigest()[:12]  # type: ignore[attr-defined]
    path = RESULTS_DIR / f"auth-bench-tokens-{tag}-{n}-{fp}.txt"
    if path.exists() and path.stat().st_mtime > time.time() - 6 * 3600:
        return path
    exp = int(time.time()) + 86400
    with path.open("w") as f:
        for i in range(n):
            body = {"iss": ISS, "aud": AUD, "sub": f"user{i}", "exp": exp, "groups": ["bench"]}
            f.write(jwt.encode(body, key, algorithm="RS256", headers={"kid": "bench"}) + "\n")
    return path


def write_maps(d: Path) -> tuple[Path, Path]:
    fg = d / "routes-fastgw.map"
    fg.write_text("".join(f"/svc{i}/ fn\n" for i in range(ROUTES)))
    hp = d / "routes-haproxy.map"
    hp.write_text("".join(f"/svc{i}/ b\n" for i in range(ROUTES)))
    return fg, hp


def fastgw_conf(d: Path, port: int, up_port: int, pub: Path, fg_map: Path) -> Path:
    conf = d / "auth-gateway.toml"
    conf.write_text(
        f"""[limits]
max_connections = 20000
[[listeners]]
name = "bench"
address = "127.0.0.1:{port}"
[backends.fn]
endpoints = ["http://127.0.0.1:{up_port}"]
pool_max_size = 2000
[[routes]]
name = "svc"
path_map = "{fg_map}"
path_map_type = "beg"
[identity]
token_cache_size = 20000
[issuers.bench]
issuer = "{ISS}"
audiences = ["{AUD}"]
algorithms = ["RS256"]
key_files = ["{pub}"]
[[policies]]
name = "bench"
routes = ["svc"]
[[policies.rules]]
effect = "allow"
issuers = ["bench"]
"""
    )
    return conf


def haproxy_conf(d: Path, port: int, up_port: int, key_file: Path, hp_map: Path) -> Path:
    conf = d / "auth-haproxy.cfg"
    conf.write_text(
        f"""global
{HAPROXY_COMMON}  bind 127.0.0.1:{port}
  option forwardfor
  http-request set-var(txn.bearer) http_auth_bearer
  http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
  http-request deny deny_status 401 unless {{ var(txn.alg) -m str RS256 }}
  http-request set-var(txn.ok) var(txn.bearer),jwt_verify(txn.alg,"{key_file}")
  http-request deny deny_status 401 unless {{ var(txn.ok) -m int 1 }}
  http-request set-header X-Fastgw-Subject %[var(txn.bearer),jwt_payload_query('$.sub')]
  use_backend %[path,map_beg({hp_map},none)]
backend b
  server s1 127.0.0.1:{up_port}
backend none
  http-request deny deny_status 404
"""
    )
    return conf


def run_wrk_lua(port: int, conns: int, duration_s: float, script: Path, token_file: Path,
                offset: int) -> tuple[int, float, float, int]:  # fmt: skip
    out = subprocess.run(
        [*taskset(CPU_LOAD), "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration_s))}s",
         "--latency", "--timeout", "10s", "-s", str(script), f"http://127.0.0.1:{port}/",
         "--", str(token_file), str(offset)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    reqs = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {p: float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[u] for p, v, u in _LAT.findall(out)}
    errors = 0
    for pat in (
        r"Non-2xx or 3xx responses: (\d+)",
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
    ):
        m = re.search(pat, out)
        if m:
            errors += sum(int(x) for x in m.groups())
    return reqs, rps, lat.get("99", float("nan")), errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.e2e_auth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--fresh-duration", type=float, default=2.0)
    ap.add_argument("--fresh-tokens", type=int, default=60000)
    args = ap.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    results = []
    with tempfile.TemporaryDirectory(prefix="fastgw-auth-bench-") as tmp:
        d = Path(tmp)
        key, pub, _crt = keys(d)
        print("signing tokens (cached under bench/results/)...", flush=True)
        pool = tokens(key, 1000, "pool")
        fresh = tokens(key, args.fresh_tokens, "fresh")
        fg_map, hp_map = write_maps(d)
        script = d / "auth.lua"
        script.write_text(LUA)
        with upstream(d, False, {}, find_nginx()) as up_port:
            for workload, token_file, duration in (
                ("pool", pool, args.duration),
                ("fresh", fresh, args.fresh_duration),
            ):
                offset = 0
                for name in ("fastgw", "haproxy"):
                    port = free_port()
                    if name == "fastgw":
                        conf = fastgw_conf(d, port, up_port, pub, fg_map)
                        argv_ = [
                            *taskset(CPU_PROXY),
                            sys.executable,
                            "-m",
                            "fastgw",
                            "serve",
                            "-c",
                            str(conf),
                        ]
                    else:
                        conf = haproxy_conf(d, port, up_port, pub, hp_map)
                        argv_ = [*taskset(CPU_PROXY), "haproxy", "-db", "-f", str(conf)]
                    log = d / f"{name}-{workload}.log"
                    with process(argv_, port, log, cwd=HERE.parent) as p:
                        # Warm with the pool (connections, pools; fastgw's cache for "pool").
                        run_wrk_lua(port, args.conns, 1.0, script, pool, 0)
                        t0 = cpu_ticks(p.pid)
                        reqs, rps, p99, errors = run_wrk_lua(
                            port, args.conns, duration, script, token_file, offset
                        )
                        t1 = cpu_ticks(p.pid)
                        rss = peak_rss_mib(p.pid)
                        check_alive(p, name, log)
                    if workload == "fresh":
                        # The next target starts where this one stopped: no token repeats.
                        offset = (offset + reqs) % args.fresh_tokens
                        if reqs > args.fresh_tokens:
                            print(
                                f"  note: {name} used {reqs} requests > {args.fresh_tokens} "
                                "tokens: some repeated"
                            )
                    cpu_us = (t1 - t0) / os.sysconf("SC_CLK_TCK") * 1e6 / max(reqs, 1)
                    r = {
                        "workload": workload, "target": name, "rps": rps, "p99_ms": p99,
                        "cpu_us_per_req": cpu_us, "peak_rss_mib": rss, "errors": errors,
                        "requests": reqs,
                    }  # fmt: skip
                    results.append(r)
                    print(f"{workload:>6} {name:>8}: {rps:9.0f} req/s  p99 {p99:7.2f} ms  "
                          f"{cpu_us:6.1f} us CPU/req  errors {errors}", flush=True)  # fmt: skip
    print()
    for workload in ("pool", "fresh"):
        by = {r["target"]: r for r in results if r["workload"] == workload}
        f, h = by["fastgw"], by["haproxy"]
        print(f"{workload}: fastgw/haproxy requests/s {f['rps'] / h['rps']:.2f}x, "
              f"CPU per request {f['cpu_us_per_req'] / h['cpu_us_per_req']:.2f}x")  # fmt: skip
    out = RESULTS_DIR / f"e2e-auth-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
