"""The demo function over a real socket on 127.0.0.1, spoken to by an h11 client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import h11
import pytest
import trio

from fastgw.demo import serve_demo_function


class Client:
    """One client connection: h11 frames requests and parses responses."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, *events: Any) -> None:
        for event in events:
            data = self.conn.send(event)
            if data:
                await self.stream.send_all(data)

    async def receive(self) -> tuple[h11.Response, bytes]:
        response = None
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return response, bytes(body)
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def request(
        self,
        method: str = "GET",
        target: str = "/",
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
    ) -> tuple[h11.Response, Any]:
        all_headers = [("host", "demo"), *(headers or [])]
        if body:
            all_headers.append(("content-length", str(len(body))))
        await self.send(h11.Request(method=method, target=target, headers=all_headers))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())
        response, raw = await self.receive()
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return response, json.loads(raw) if raw else None


@pytest.fixture
async def demo(nursery: trio.Nursery) -> tuple[str, int]:
    address: tuple[str, int] = await nursery.start(serve_demo_function)
    return address


@pytest.fixture
async def client(demo: tuple[str, int]) -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream(*demo)
    async with stream:
        yield Client(stream)


def header(response: h11.Response, name: bytes) -> bytes | None:
    return dict(response.headers).get(name)


async def test_started_reports_the_bound_port(demo: tuple[str, int]) -> None:
    host, port = demo
    assert host == "127.0.0.1"
    assert port > 0


async def test_a_host_name_serves_on_the_reported_port(nursery: trio.Nursery) -> None:
    host, port = await nursery.start(serve_demo_function, "localhost")
    async with await trio.open_tcp_stream(host, port) as stream:
        response, data = await Client(stream).request("GET", "/by-name")
    assert (response.status_code, data["path"]) == (200, "/by-name")


async def test_echoes_the_request_as_json(client: Client) -> None:
    response, data = await client.request(
        "POST",
        "/greet/me?lang=en&tag=a&tag=b&empty=",
        body=b'{"name": "Ada", "n": [1, 2]}',
        headers=[
            ("content-type", "application/json"),
            ("x-forwarded-for", "192.0.2.1"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "api.example.com"),
            ("x-request-id", "abc123"),
            ("via", "1.1 fastgw"),
            ("authorization", "Bearer secret"),
        ],
    )
    assert response.status_code == 200
    assert header(response, b"content-type") == b"application/json"
    assert data == {
        "greeting": "Hello, Ada! This is the fastgw demo function.",
        "method": "POST",
        "path": "/greet/me",
        "query": {"lang": "en", "tag": ["a", "b"], "empty": ""},
        "json": {"name": "Ada", "n": [1, 2]},
        "headers": {
            "x-forwarded-for": "192.0.2.1, 10.0.0.1",
            "x-forwarded-proto": "https",
            "x-forwarded-host": "api.example.com",
            "x-request-id": "abc123",
            "via": "1.1 fastgw",
        },
    }


async def test_no_body_is_null_and_query_name_greets(client: Client) -> None:
    response, data = await client.request("GET", "/?name=Grace")
    assert response.status_code == 200
    assert data["json"] is None
    assert data["headers"] == {}
    assert data["greeting"].startswith("Hello, Grace!")


async def test_keep_alive_two_requests_on_one_connection(client: Client) -> None:
    first, one = await client.request("POST", "/one", body=b"1")
    second, two = await client.request("GET", "/two")
    assert (first.status_code, second.status_code) == (200, 200)
    assert (one["path"], one["json"], two["path"]) == ("/one", 1, "/two")
    assert header(first, b"connection") is None


async def test_chunked_request_body(client: Client) -> None:
    await client.send(
        h11.Request(
            method="PUT",
            target="/chunked",
            headers=[("host", "demo"), ("transfer-encoding", "chunked")],
        ),
        h11.Data(data=b'{"name": '),
        h11.Data(data=b'"chunky"'),
        h11.Data(data=b"}"),
        h11.EndOfMessage(),
    )
    response, raw = await client.receive()
    assert response.status_code == 200
    assert json.loads(raw)["json"] == {"name": "chunky"}


async def test_invalid_json_is_400_and_the_connection_stays_usable(client: Client) -> None:
    response, data = await client.request("POST", "/", body=b"{not json")
    assert response.status_code == 400
    assert header(response, b"content-type") == b"application/json"
    assert data["error"].startswith("invalid JSON body: ")
    response, data = await client.request("POST", "/", body=b"\xff\xfe\x00")
    assert response.status_code == 400
    response, data = await client.request("GET", "/after")
    assert (response.status_code, data["path"]) == (200, "/after")


async def test_head_gets_headers_only(client: Client) -> None:
    response, data = await client.request("HEAD", "/")
    assert response.status_code == 200
    assert data is None
    assert int(header(response, b"content-length") or 0) > 0


async def test_connection_close_is_honoured(client: Client) -> None:
    response, _ = await client.request("GET", "/", headers=[("connection", "close")])
    assert response.status_code == 200
    assert await client.stream.receive_some(1) == b""


async def test_malformed_request_gets_400_and_close(demo: tuple[str, int]) -> None:
    async with await trio.open_tcp_stream(*demo) as stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nbad header line\r\n\r\n")
        client = Client(stream)
        client.conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        response, raw = await client.receive()
        assert response.status_code == 400
        assert json.loads(raw)["error"].startswith("bad request")
        assert header(response, b"connection") == b"close"
        assert await stream.receive_some(1) == b""


async def test_oversized_body_is_413_and_close(demo: tuple[str, int]) -> None:
    async with await trio.open_tcp_stream(*demo) as stream:
        client = Client(stream)
        declared = 2 * 1024 * 1024
        await client.send(
            h11.Request(
                method="POST",
                target="/",
                headers=[("host", "demo"), ("content-length", str(declared))],
            )
        )
        # Send just over the 1 MiB the demo accepts, not all that was declared.
        await stream.send_all(b" " * (1024 * 1024 + 1))
        response, raw = await client.receive()
        assert response.status_code == 413
        assert header(response, b"connection") == b"close"
        assert "error" in json.loads(raw)


async def test_many_clients_at_once(demo: tuple[str, int]) -> None:
    results: list[int] = []

    async def one(i: int) -> None:
        async with await trio.open_tcp_stream(*demo) as stream:
            response, data = await Client(stream).request("POST", f"/c{i}", body=str(i).encode())
        assert data["json"] == i
        results.append(response.status_code)

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(one, i)
    assert results == [200] * 10
