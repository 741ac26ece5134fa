"""Reload under load: steady keep-alive traffic while the config changes underneath.

    python -m bench.reload                  # 20 s of wrk load, SIGHUP at 10 s
    python -m bench.reload --duration 6 --conns 50

A real ``fastgw serve`` process (one worker, CPU 0) in front of nginx (or the built-in
upstream), wrk (or the built-in load generator) on CPU 1. Halfway through, the config
file is rewritten (a new route and a changed body limit) and SIGHUP sent; the run
passes when the reload took effect and the load generator saw no failed request and no
connection error. Prints the counts and exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.e2e import (
    CPU_PROXY,
    HERE,
    find_nginx,
    free_port,
    run_builtin_load,
    run_wrk,
    taskset,
    upstream,
    wait_port,
)


def write_conf(path: Path, port: int, up_port: int, changed: bool) -> None:
    extra = '[[routes]]\nname = "new"\npath_prefix = "/new"\nbackend = "fn"\n' if changed else ""
    path.write_text(
        f"[limits]\nmax_connections = 20000\nmax_body_bytes = {1000 if changed else 2000}\n"
        f'[[listeners]]\nname = "bench"\naddress = "127.0.0.1:{port}"\n'
        f'[backends.fn]\nendpoints = ["http://127.0.0.1:{up_port}"]\npool_max_size = 2000\n'
        + extra
        + '[[routes]]\nname = "all"\npath_prefix = "/"\nbackend = "fn"\n'
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.reload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--conns", type=int, default=50)
    args = ap.parse_args(argv)
    load = run_wrk if shutil.which("wrk") else run_builtin_load
    with tempfile.TemporaryDirectory(prefix="fastgw-reload-") as tmp:
        d = Path(tmp)
        with upstream(d, False, {}, find_nginx()) as up_port:
            port = free_port()
            conf = d / "gateway.toml"
            write_conf(conf, port, up_port, changed=False)
            log = (d / "fastgw.log").open("wb")
            p = subprocess.Popen(
                [*taskset(CPU_PROXY), sys.executable, "-m", "fastgw", "serve", "-c", str(conf)],
                stdout=subprocess.DEVNULL, stderr=log, cwd=HERE.parent,
            )  # fmt: skip
            try:
                wait_port(port)
                result: dict[str, object] = {}

                def run() -> None:
                    result["load"] = load(port, args.conns, args.duration)

                th = threading.Thread(target=run)
                th.start()
                time.sleep(args.duration / 2)
                write_conf(conf, port, up_port, changed=True)
                p.send_signal(signal.SIGHUP)
                th.join()
                log.flush()
                out = (d / "fastgw.log").read_text()
                reloaded = "fastgw: reloaded" in out
                # The new route answers (the upstream serves any path).
                import urllib.request

                with urllib.request.urlopen(f"http://127.0.0.1:{port}/new/x", timeout=5) as r:
                    new_route_ok = r.status == 200 and "reloaded" in out
            finally:
                p.send_signal(signal.SIGTERM)
                p.wait(10)
    reqs, rps, _p50, p99, errors, non_2xx = result["load"]  # type: ignore[misc]
    print(
        f"{args.duration:g} s at {args.conns} connections, SIGHUP at {args.duration / 2:g} s: "
        f"{reqs} requests ({rps:.0f}/s, p99 {p99:.2f} ms); failed or reset: {errors} "
        f"(non-2xx {non_2xx}); reload {'applied' if reloaded else 'NOT applied'}; "
        f"new route {'answers' if new_route_ok else 'does NOT answer'}"
    )
    m = re.search(r"fastgw: reload.*", out)
    if m:
        print(m.group(0))
    return 0 if errors == 0 and reloaded and new_route_ok else 1


if __name__ == "__main__":
    sys.exit(main())
