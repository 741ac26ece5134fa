"""How each parser is driven for one message: the exact code the benchmarks time.

Every driver takes bytes and returns a small summary (``meaning``) that the benchmarks
compare with the corpus's expectations once before timing, so a driver that stops
early or parses the wrong thing fails instead of winning.

What is timed, per implementation (the same rules for requests and responses):

- fastgw: one ``parse_request_head`` / ``parse_response_head`` call on the head. It
  returns the method, target, every field's offsets and the framing decision
  (RFC 9112 6.3), so no second call is needed.
- h11 (requests): a fresh ``h11.Connection(h11.SERVER)`` per message, ``receive_data``,
  then ``next_event`` until the ``Request`` event. That is h11's real per-request cost:
  a connection object cannot be reset mid-cycle, and its framing decision happens while
  producing the event.
- h11 (responses): the client connection and the request it sent are set up outside
  the timed region (pytest-benchmark's pedantic ``setup``); only ``receive_data`` and
  ``next_event`` until the ``Response`` are timed. This flatters h11, on purpose.
- httptools: ``HttpRequestParser`` / ``HttpResponseParser`` with the fewest Python
  callbacks that keep the message: ``on_url`` / ``on_status`` store the bytes,
  ``on_header`` appends the raw (name, value) pair (no lowercasing, no decoding: the
  least a server can do without losing the field), ``on_headers_complete`` sets a flag.
  Two variants:

  * ``httptools`` - a fresh parser (and callback object) per message, fed the head:
    what a server pays per new connection.
  * ``httptools_reuse`` - one parser kept across messages, as on a keep-alive
    connection. llhttp has no public reset and cannot stop after the head, so this
    variant is fed the whole message (head and body) to end each message cleanly;
    for a Content-Length body llhttp skips the bytes without a callback (no
    ``on_body``), for a chunked body it also walks the few chunk-size lines.

  The ratio against httptools uses the faster of the two variants for each message
  (see bench/check.py), so the floor can only under-state fastgw's lead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h11
import httptools

from fastgw._core import http as core

Meaning = dict[str, object]

_FRAMING = {
    core.BODY_NONE: "none",
    core.BODY_LENGTH: "length",
    core.BODY_CHUNKED: "chunked",
    core.BODY_UNTIL_CLOSE: "until_close",
}

# ---------------------------------------------------------------------------------------
# fastgw


def fastgw_request_meaning(head: core.RequestHead) -> Meaning:
    out: Meaning = {
        "method": head.method,
        "target": head.target,
        "fields": len(head),
        "framing": _FRAMING[head.body_kind],
    }
    if head.body_kind == core.BODY_LENGTH:
        out["length"] = head.content_length
    return out


def fastgw_response_meaning(head: core.ResponseHead) -> Meaning:
    out: Meaning = {
        "status": head.status,
        "fields": len(head),
        "framing": _FRAMING[head.body_kind],
    }
    if head.body_kind == core.BODY_LENGTH:
        out["length"] = head.content_length
    return out


# ---------------------------------------------------------------------------------------
# h11


def h11_parse_request(data: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    while True:
        event = conn.next_event()
        if type(event) is h11.Request:
            return event
        if event is h11.NEED_DATA or event is h11.PAUSED:
            raise AssertionError(f"h11 stopped before the request head: {event!r}")


def h11_client_after(request: bytes) -> h11.Connection:
    """A client connection that has sent ``request`` (head and body) and now waits for
    the response. Built outside the timed region."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(request)
    req = h11_parse_request(request)
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=req.method, target=req.target, headers=req.headers))
    while True:
        event = server.next_event()
        if type(event) is h11.Data:
            conn.send(h11.Data(data=event.data))
        elif type(event) is h11.EndOfMessage:
            conn.send(h11.EndOfMessage())
            return conn
        elif event is h11.NEED_DATA:
            raise AssertionError("corpus request body is incomplete")


def h11_parse_response(conn: h11.Connection, data: bytes) -> h11.Response:
    conn.receive_data(data)
    while True:
        event = conn.next_event()
        if type(event) is h11.Response:
            return event
        if event is h11.NEED_DATA or event is h11.PAUSED:
            raise AssertionError(f"h11 stopped before the response head: {event!r}")


def _h11_framing(headers: Any) -> tuple[str, int | None]:
    names = {bytes(n) for n, _ in headers}
    if b"transfer-encoding" in names:
        return "chunked", None
    for n, v in headers:
        if n == b"content-length":
            return "length", int(v)
    return "none", None


def h11_request_meaning(req: h11.Request) -> Meaning:
    framing, length = _h11_framing(req.headers)
    out: Meaning = {
        "method": bytes(req.method),
        "target": bytes(req.target),
        "fields": len(req.headers),
        "framing": framing,
    }
    if length is not None:
        out["length"] = length
    return out


def h11_response_meaning(resp: h11.Response) -> Meaning:
    framing, length = _h11_framing(resp.headers)
    if resp.status_code in (204, 304) or resp.status_code < 200:
        framing, length = "none", None
    out: Meaning = {"status": resp.status_code, "fields": len(resp.headers), "framing": framing}
    if length is not None:
        out["length"] = length
    return out


# ---------------------------------------------------------------------------------------
# httptools


class RequestSink:
    """httptools' callback object, doing the least that keeps the request."""

    __slots__ = ("complete", "headers", "url")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


class ResponseSink:
    """httptools' callback object, doing the least that keeps the response."""

    __slots__ = ("complete", "headers", "reason")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.complete = False

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def httptools_parse_request(data: bytes) -> tuple[httptools.HttpRequestParser, RequestSink]:
    sink = RequestSink()
    parser = httptools.HttpRequestParser(sink)
    parser.feed_data(data)
    return parser, sink


def httptools_parse_response(data: bytes) -> tuple[httptools.HttpResponseParser, ResponseSink]:
    sink = ResponseSink()
    parser = httptools.HttpResponseParser(sink)
    parser.feed_data(data)
    return parser, sink


def httptools_request_reuser() -> tuple[Callable[[bytes], RequestSink], RequestSink]:
    """A feed function over one long-lived parser: each call parses one whole message."""
    sink = RequestSink()
    feed = httptools.HttpRequestParser(sink).feed_data

    def parse(data: bytes) -> RequestSink:
        sink.headers = []
        feed(data)
        return sink

    return parse, sink


def httptools_response_reuser() -> tuple[Callable[[bytes], ResponseSink], ResponseSink]:
    sink = ResponseSink()
    feed = httptools.HttpResponseParser(sink).feed_data

    def parse(data: bytes) -> ResponseSink:
        sink.headers = []
        feed(data)
        return sink

    return parse, sink


def _sink_framing(headers: list[tuple[bytes, bytes]]) -> tuple[str, int | None]:
    for n, v in headers:
        if n.lower() == b"transfer-encoding":
            return "chunked", None
        if n.lower() == b"content-length":
            return "length", int(v)
    return "none", None


def httptools_request_meaning(parser: httptools.HttpRequestParser, sink: RequestSink) -> Meaning:
    assert sink.complete, "httptools did not finish the head"
    framing, length = _sink_framing(sink.headers)
    out: Meaning = {
        "method": parser.get_method(),
        "target": sink.url,
        "fields": len(sink.headers),
        "framing": framing,
    }
    if length is not None:
        out["length"] = length
    return out


def httptools_response_meaning(parser: httptools.HttpResponseParser, sink: ResponseSink) -> Meaning:
    assert sink.complete, "httptools did not finish the head"
    framing, length = _sink_framing(sink.headers)
    status = parser.get_status_code()
    if status in (204, 304) or status < 200:
        framing, length = "none", None
    out: Meaning = {"status": status, "fields": len(sink.headers), "framing": framing}
    if length is not None:
        out["length"] = length
    return out


# ---------------------------------------------------------------------------------------
# Chunked body scanning


def fastgw_scan_chunked(body: bytes) -> int:
    reader = core.ChunkedReader()
    pos = reader.scan(body)
    if not reader.done:
        raise AssertionError("ChunkedReader stopped before the end of the body")
    return pos


class BodySink:
    """httptools' callbacks for a body walk: no on_body (llhttp then skips chunk data
    without calling Python), a flag at the end."""

    __slots__ = ("complete",)

    def __init__(self) -> None:
        self.complete = False

    def on_message_complete(self) -> None:
        self.complete = True


def httptools_body_parser(head: bytes, sink: BodySink) -> httptools.HttpRequestParser:
    """A parser already past ``head`` (built untimed), so feeding it the chunked body
    times only the body walk, like ``ChunkedReader.scan``."""
    parser = httptools.HttpRequestParser(sink)
    parser.feed_data(head)
    return parser
