"""Response-head parsing: framing (RFC 9112 6.3), keep-alive and rejections, each case
parsed whole, byte by byte and in random splits with the same outcome."""

from __future__ import annotations

from typing import Any

import pytest
from httpsupport import parse_three_ways, parse_whole

from fastgw._core.http import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    ResponseHead,
    parse_response_head,
)
from fastgw.errors import BadResponse


def resp(fields: bytes = b"", status_line: bytes = b"HTTP/1.1 200 OK") -> bytes:
    return status_line + b"\r\n" + fields + b"\r\n"


# (id, bytes, request_was_head, expected attributes)
VALID: list[tuple[str, bytes, bool, dict[str, Any]]] = [
    (
        "content-length",
        resp(b"Content-Length: 5\r\nContent-Type: text/plain\r\n"),
        False,
        dict(
            status=200,
            reason=b"OK",
            body_kind=BODY_LENGTH,
            content_length=5,
            keep_alive=True,
            http_version=b"1.1",
            headers=[(b"Content-Length", b"5"), (b"Content-Type", b"text/plain")],
        ),
    ),
    (
        "chunked",
        resp(b"Transfer-Encoding: chunked\r\n"),
        False,
        dict(body_kind=BODY_CHUNKED, keep_alive=True),
    ),
    (
        "until-close",
        resp(b"Content-Type: text/plain\r\n"),
        False,
        dict(body_kind=BODY_UNTIL_CLOSE, keep_alive=False),
    ),
    ("until-close-no-fields", resp(), False, dict(body_kind=BODY_UNTIL_CLOSE)),
    (
        "head-request-with-length",
        resp(b"Content-Length: 1234\r\n"),
        True,
        dict(body_kind=BODY_NONE, content_length=0, keep_alive=True),
    ),
    (
        "head-request-with-chunked",
        resp(b"Transfer-Encoding: chunked\r\n"),
        True,
        dict(body_kind=BODY_NONE, keep_alive=True),
    ),
    (
        "head-request-without-framing-keeps-alive",
        resp(),
        True,
        dict(body_kind=BODY_NONE, keep_alive=True),
    ),
    (
        "100-continue",
        resp(b"", b"HTTP/1.1 100 Continue"),
        False,
        dict(status=100, body_kind=BODY_NONE),
    ),
    (
        "103-early-hints",
        resp(b"Link: </a.css>; rel=preload\r\n", b"HTTP/1.1 103 Early Hints"),
        False,
        dict(status=103, body_kind=BODY_NONE),
    ),
    (
        "101-switching",
        resp(b"Connection: upgrade\r\nUpgrade: websocket\r\n", b"HTTP/1.1 101 Switching Protocols"),
        False,
        dict(status=101, body_kind=BODY_NONE, keep_alive=False, upgrade=True),
    ),
    (
        "204-ignores-length",
        resp(b"Content-Length: 10\r\n", b"HTTP/1.1 204 No Content"),
        False,
        dict(body_kind=BODY_NONE, content_length=0, keep_alive=True),
    ),
    (
        "304-ignores-length",
        resp(b"Content-Length: 10\r\n", b"HTTP/1.1 304 Not Modified"),
        False,
        dict(body_kind=BODY_NONE, keep_alive=True),
    ),
    (
        "304-without-framing",
        resp(b"", b"HTTP/1.1 304 Not Modified"),
        False,
        dict(body_kind=BODY_NONE),
    ),
    (
        "connection-close",
        resp(b"Content-Length: 0\r\nConnection: close\r\n"),
        False,
        dict(body_kind=BODY_LENGTH, keep_alive=False),
    ),
    (
        "http10-length",
        resp(b"Content-Length: 2\r\n", b"HTTP/1.0 200 OK"),
        False,
        dict(http_version=b"1.0", keep_alive=False, body_kind=BODY_LENGTH),
    ),
    (
        "http10-keep-alive",
        resp(b"Content-Length: 2\r\nConnection: keep-alive\r\n", b"HTTP/1.0 200 OK"),
        False,
        dict(keep_alive=True),
    ),
    (
        "http10-chunked",
        resp(b"Transfer-Encoding: chunked\r\n", b"HTTP/1.0 200 OK"),
        False,
        dict(body_kind=BODY_CHUNKED),
    ),
    ("no-reason", resp(b"Content-Length: 0\r\n", b"HTTP/1.1 200"), False, dict(reason=b"")),
    ("empty-reason", resp(b"Content-Length: 0\r\n", b"HTTP/1.1 200 "), False, dict(reason=b"")),
    (
        "reason-with-spaces-tab-obs-text",
        resp(b"Content-Length: 0\r\n", b"HTTP/1.1 404 Not \tFound \xe9"),
        False,
        dict(status=404, reason=b"Not \tFound \xe9"),
    ),
    ("status-999", resp(b"Content-Length: 0\r\n", b"HTTP/1.1 999 X"), False, dict(status=999)),
    (
        # Host is a request field: a response carrying odd ones is still a response.
        "host-fields-not-checked",
        resp(b"Host: <\r\nHost: a b\r\nContent-Length: 0\r\n"),
        False,
        dict(headers=[(b"Host", b"<"), (b"Host", b"a b"), (b"Content-Length", b"0")]),
    ),
    (
        "connection-listed-field",
        resp(b"Connection: X-Hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n"),
        False,
        dict(keep_alive=True),
    ),
]


@pytest.mark.parametrize(
    ("data", "was_head", "expected"), [c[1:] for c in VALID], ids=[c[0] for c in VALID]
)
def test_valid_response(data: bytes, was_head: bool, expected: dict[str, Any]) -> None:
    outcome = parse_three_ways(parse_response_head, data, seed=len(data), request_was_head=was_head)
    assert outcome[0] == "ok", outcome
    h = parse_response_head(data, request_was_head=was_head)
    assert h is not None
    assert h.head_len == len(data)
    for attr, value in expected.items():
        assert getattr(h, attr) == value, attr


INVALID: list[tuple[str, bytes]] = [
    ("bare-lf-status-line", b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n"),
    ("bare-lf-field", b"HTTP/1.1 200 OK\r\nContent-Length: 0\n\r\n"),
    ("bare-lf-everywhere", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"),
    ("obs-fold", resp(b"X: a\r\n b\r\nContent-Length: 0\r\n")),
    ("space-before-colon", resp(b"Content-Length : 0\r\n")),
    ("te-and-cl", resp(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n")),
    (
        "te-and-cl-on-204",
        resp(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"HTTP/1.1 204 No"),
    ),
    ("te-gzip", resp(b"Transfer-Encoding: gzip\r\n")),
    ("te-chunked-gzip", resp(b"Transfer-Encoding: chunked, gzip\r\n")),
    ("cl-duplicate", resp(b"Content-Length: 5\r\nContent-Length: 5\r\n")),
    ("cl-list", resp(b"Content-Length: 5, 5\r\n")),
    ("cl-sign", resp(b"Content-Length: +5\r\n")),
    ("cl-19-digits", resp(b"Content-Length: 1000000000000000000\r\n")),
    ("value-nul", resp(b"X: \x00\r\n")),
    ("value-ctl", resp(b"X: a\x01\r\n")),
    ("value-del", resp(b"X: \x7f\r\n")),
    ("value-bare-cr", resp(b"X: a\rb\r\n")),
    ("name-invalid", resp(b"X Y: a\r\n")),
    ("http2", resp(b"", b"HTTP/2.0 200 OK")),
    ("http12", resp(b"", b"HTTP/1.2 200 OK")),
    ("lowercase-version", resp(b"", b"http/1.1 200 OK")),
    ("two-digit-status", resp(b"", b"HTTP/1.1 20 OK")),
    ("four-digit-status", resp(b"", b"HTTP/1.1 2000 OK")),
    ("status-below-100", resp(b"", b"HTTP/1.1 099 Low")),
    ("status-letters", resp(b"", b"HTTP/1.1 2x0 OK")),
    ("double-space", resp(b"", b"HTTP/1.1  200 OK")),
    ("no-space-after-version", resp(b"", b"HTTP/1.1200 OK")),
    ("reason-ctl", resp(b"", b"HTTP/1.1 200 O\x01K")),
    ("reason-bare-cr", resp(b"", b"HTTP/1.1 200 O\rK")),
    ("leading-crlf", b"\r\n" + resp(b"Content-Length: 0\r\n")),
    ("empty", b"\r\n\r\n"),
    ("too-many-fields", resp(b"".join(b"X-%d: v\r\n" % i for i in range(101)))),
    ("head-too-large", resp(b"X: " + b"a" * 70000 + b"\r\n")),
    ("head-too-large-unfinished", b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000),
]


@pytest.mark.parametrize("data", [c[1] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_response(data: bytes) -> None:
    # Whatever is wrong with an upstream's answer, the client gets a 502.
    for was_head in (False, True):
        got = parse_three_ways(parse_response_head, data, seed=len(data), request_was_head=was_head)
        assert got == ("err", "BadResponse", 502)
    with pytest.raises(BadResponse) as info:
        parse_response_head(data)
    assert info.value.status == 502 and info.value.close


def test_response_limits_configurable() -> None:
    data = resp(b"Content-Length: 0\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(4)))
    assert parse_whole(parse_response_head, data, max_fields=5)[0] == "ok"
    assert parse_three_ways(parse_response_head, data, max_fields=4) == ("err", "BadResponse", 502)
    assert parse_whole(parse_response_head, data, max_head_bytes=len(data))[0] == "ok"
    assert parse_three_ways(parse_response_head, data, max_head_bytes=len(data) - 1) == (
        "err",
        "BadResponse",
        502,
    )
    with pytest.raises(ValueError):
        parse_response_head(data, max_fields=0)
    with pytest.raises(ValueError):
        parse_response_head(data, max_head_bytes=0)


def test_interim_then_final_response() -> None:
    buf = resp(b"", b"HTTP/1.1 100 Continue") + resp(b"Content-Length: 2\r\n") + b"ok"
    first = parse_response_head(buf)
    assert first is not None and first.status == 100 and first.body_kind == BODY_NONE
    final = parse_response_head(buf, first.head_len)
    assert final is not None and final.status == 200 and final.content_length == 2
    assert buf[first.head_len + final.head_len :] == b"ok"


def test_incomplete_response_heads_return_none() -> None:
    data = resp(b"Content-Length: 0\r\n")
    for cut in range(len(data)):
        assert parse_response_head(data[:cut]) is None, cut


def test_responses_cannot_be_made_from_python() -> None:
    with pytest.raises(TypeError):
        ResponseHead()


def test_response_repr_and_accessors() -> None:
    h = parse_response_head(resp(b"Set-Cookie: a=1\r\nset-cookie: b=2\r\nContent-Length: 0\r\n"))
    assert h is not None
    assert "200" in repr(h)
    assert h.get_all(b"Set-Cookie") == [b"a=1", b"b=2"]
    assert len(h) == 3
