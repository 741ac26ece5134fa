"""A real ``redis-server`` for the shared-limit tests (and bench/bench_redis_limits.py).

Each test that asks for ``redis_server`` gets its own server on 127.0.0.1, in its own
temporary directory, with persistence off (``--save "" --appendonly no``), so it can be
killed, stopped (SIGSTOP) and restarted on the same port without touching anyone
else's. redis-server cannot listen on port 0 (``--port 0`` turns TCP off), so the port
is one the kernel just handed out to a socket we closed; if another process takes it in
between, the server exits and we try another.

When redis-server is missing the tests skip, except in CI (``CI`` set to 1/true/yes),
where they fail: scripts/test.sh installs it there.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fastgw.policy._resp import RespReader, encode_command

REDIS_SERVER = shutil.which("redis-server")
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
NO_REDIS = "redis-server not installed (apt-get install redis-server, or run scripts/test.sh)"
# How long a fresh server may take to answer PING: it starts in a few ms; a loaded CI
# machine gets a generous margin.
START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process: start, kill, stop/cont, restart on the same port, and
    a blocking ``command`` for the test's own look at the data."""

    def __init__(self, exe: str, workdir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.exe = exe
        self.workdir = workdir
        self.extra_args = extra_args
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.password: str | None = None
        if "--requirepass" in extra_args:
            self.password = extra_args[extra_args.index("--requirepass") + 1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, port: int | None = None) -> None:
        """Start on ``port`` (a fresh free port when None) and wait for PING."""
        for _attempt in range(5):
            p = port if port is not None else free_port()
            log = open(self.workdir / "redis.log", "ab")  # the child writes to it
            self.proc = subprocess.Popen(
                [
                    self.exe,
                    "--port", str(p),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.workdir),
                    "--daemonize", "no",
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )  # fmt: skip
            log.close()
            self.port = p
            if self._wait_ready():
                return
            self.kill()
            if port is not None:
                time.sleep(0.05)  # the same port, still held: give it a moment
        log_text = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server did not start; its log ends with:\n{log_text}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False  # exited: most likely the port was taken
            try:
                if self.command("PING") == b"PONG":
                    return True
            except OSError:
                pass
            time.sleep(0.005)
        return False

    def command(self, *args: str | bytes | int, db: int = 0) -> object:
        """One command on a fresh blocking connection (AUTH first when the server has a
        password, SELECT when ``db`` is given); the reply, or the error reply's text."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            cmds = [encode_command(args)]
            if db:
                cmds.insert(0, encode_command(("SELECT", db)))
            if self.password is not None:
                cmds.insert(0, encode_command(("AUTH", self.password)))
            s.sendall(b"".join(cmds))
            reader = RespReader()
            replies: list[object] = []
            while len(replies) < len(cmds):
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("closed by redis-server")
                reader.feed(data)
                while True:
                    ok, reply = reader.next_reply()
                    if not ok:
                        break
                    replies.append(reply)
        last = replies[-1]
        return str(last).encode() if isinstance(last, Exception) else last

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # works on a stopped process too
            self.proc.wait(10)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Kill if running, then start again on the same port (empty: no persistence)."""
        self.kill()
        self.start(self.port)


def redis_exe() -> str:
    if REDIS_SERVER is None:
        if IN_CI:
            pytest.fail(NO_REDIS + "; CI must run these tests")
        pytest.skip(NO_REDIS)
    return REDIS_SERVER


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """``make(*extra_args)``: another started server (own directory, own port) with
    extra redis-server arguments; all are killed at the end of the test."""
    exe = redis_exe()
    servers: list[RedisServer] = []

    def make(*extra_args: str) -> RedisServer:
        workdir = tmp_path / f"redis{len(servers)}"
        workdir.mkdir()
        server = RedisServer(exe, workdir, extra_args)
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.kill()


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """A started redis-server of this test's own, killed at its end."""
    return redis_factory()
