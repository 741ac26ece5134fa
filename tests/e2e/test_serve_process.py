"""``fastgw serve`` as a real process: graceful drain on SIGTERM, and the demo's curl line.

The gateway runs as ``python -m fastgw`` with its listener on port 0 and is found through
the address it prints. Waits are on events (a line printed, a request arrived at the
upstream, a connection closed), each bounded by fail_after; no fixed sleeps.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from .helpers import Client, FastgwProcess, Received, Responder, Upstream

LISTENING = r"^fastgw: listening on http://127\.0\.0\.1:(\d+)$"

CONFIG = """
[gateway]
drain_timeout_s = {drain_timeout_s}

[[listeners]]
name = "main"
address = "127.0.0.1:0"

[backends.fn]
endpoints = ["http://127.0.0.1:{upstream_port}"]

[[routes]]
name = "all"
backend = "fn"
"""


class HoldingUpstream(Upstream):
    """Answers /hold only once ``release`` is set; ``arrived`` says it has the request."""

    def __init__(self) -> None:
        self.arrived = trio.Event()
        self.release = trio.Event()
        super().__init__(handler=self._handle)

    async def _handle(self, req: Received, r: Responder) -> None:
        if req.target == b"/hold":
            self.arrived.set()
            await self.release.wait()
        await r.respond(200, b"done " + req.target)


async def serve_config(
    nursery: trio.Nursery, tmp_path: Path, upstream_port: int, drain_timeout_s: float
) -> tuple[FastgwProcess, int]:
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG.format(drain_timeout_s=drain_timeout_s, upstream_port=upstream_port))
    gw = await FastgwProcess.start(nursery, ["serve", "-c", str(path)])
    port = int((await gw.wait_line(LISTENING))[1])
    return gw, port


async def test_sigterm_drains_in_flight_request_and_closes_idle(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    up = HoldingUpstream()
    uport = await nursery.start(up.serve)
    with trio.fail_after(15):
        gw, port = await serve_config(nursery, tmp_path, uport, drain_timeout_s=10)
        idle = await Client.open(port)
        assert (await idle.request(b"GET", b"/first")).status == 200  # now idle, kept alive
        busy = await Client.open(port)
        await busy.send_raw(b"GET /hold HTTP/1.1\r\nHost: gw\r\n\r\n")
        await up.arrived.wait()

        gw.proc.send_signal(signal.SIGTERM)
        await gw.wait_line(r"^fastgw: draining$")
        # The idle keep-alive connection is closed at once, without a response...
        assert await idle.read_raw_until_close() == b""
        # ...and by then the listener is closed too: new connections are refused.
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)
        assert gw.proc.returncode is None  # still running: a request is in flight

        up.release.set()
        r = await busy.read_response()
        assert (r.status, r.body) == (200, b"done /hold")
        assert r.header(b"connection") == b"close"
        assert await busy.read_raw_until_close() == b""
        assert await gw.wait() == 0, gw.output
    assert [x.target for x in up.received] == [b"/first", b"/hold"]


async def test_sigterm_with_nothing_in_flight_exits_at_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    up = HoldingUpstream()
    uport = await nursery.start(up.serve)
    with trio.fail_after(15):
        # A long drain timeout: exiting within the guard shows drain did not wait for it.
        gw, port = await serve_config(nursery, tmp_path, uport, drain_timeout_s=60)
        idle = await Client.open(port)
        assert (await idle.request(b"GET", b"/x")).status == 200
        gw.proc.send_signal(signal.SIGTERM)
        assert await idle.read_raw_until_close() == b""
        assert await gw.wait() == 0, gw.output


async def test_drain_timeout_cuts_the_request_and_exits_1(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    up = HoldingUpstream()
    uport = await nursery.start(up.serve)
    with trio.fail_after(15):
        gw, port = await serve_config(nursery, tmp_path, uport, drain_timeout_s=0.5)
        busy = await Client.open(port)
        await busy.send_raw(b"GET /hold HTTP/1.1\r\nHost: gw\r\n\r\n")
        await up.arrived.wait()
        gw.proc.send_signal(signal.SIGTERM)
        # The upstream never answers: after drain_timeout_s the connection is cut and
        # the exit status says that connections had to be cut.
        assert await gw.wait() == 1, gw.output
        assert await busy.read_raw_until_close() == b""


async def test_demo_prints_a_curl_line_that_works(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        demo = await FastgwProcess.start(nursery, ["serve", "--demo", "--port", "0"])
        curl = shlex.split((await demo.wait_line(r"^\s*(curl .*)$"))[1])
        # curl -s URL -H 'Content-Type: application/json' -d '{"name": "world"}'
        assert curl[:2] == ["curl", "-s"] and curl[3::2] == ["-H", "-d"], curl
        url = urlsplit(curl[2])
        header, data = curl[4], curl[6].encode()
        assert (url.scheme, url.hostname) == ("http", "127.0.0.1")
        assert url.port, f"the printed URL has no usable port: {curl[2]}"
        assert f"gateway on http://127.0.0.1:{url.port} " in demo.output

        # The same request as the curl line, by a client of our own.
        c = await Client.open(url.port)
        name, _, value = header.partition(": ")
        host = url.netloc.encode()
        await c.send_raw(
            b"POST %s HTTP/1.1\r\nHost: %s\r\n%s: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (url.path.encode(), host, name.encode(), value.encode(), len(data), data)
        )
        r = await c.read_response(b"POST")
        assert r.status == 200
        assert r.header(b"content-type") == b"application/json"
        answer = r.json()
        assert answer == {
            "greeting": "Hello, world! This is the fastgw demo function.",
            "method": "POST",
            "path": "/hello",
            "query": {},
            "json": {"name": "world"},
            "headers": {
                # Added by the gateway on the way: this went through fastgw.
                "x-forwarded-for": "127.0.0.1",
                "x-forwarded-proto": "http",
                "x-forwarded-host": url.netloc,
                "x-request-id": r.header(b"x-request-id").decode(),
                "via": "1.1 fastgw",
            },
        }

        # And the printed line itself, when curl is installed.
        if shutil.which("curl"):
            result = await trio.run_process(curl, capture_stdout=True, check=False)
            assert result.returncode == 0
            assert json.loads(result.stdout)["greeting"] == answer["greeting"]

        demo.proc.send_signal(signal.SIGINT)  # "Stop with Ctrl-C."
        assert await demo.wait() == 0, demo.output
