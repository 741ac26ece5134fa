"""Request-head parsing: a table of valid and invalid requests, each parsed whole, byte by
byte and in random splits with the same outcome; then pipelining and the limits."""

from __future__ import annotations

from typing import Any

import pytest
from httpsupport import make_request, parse_three_ways, parse_whole

from fastgw._core.http import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    MAX_FIELDS_LIMIT,
    ChunkedReader,
    RequestHead,
    parse_request_head,
)
from fastgw.errors import (
    BadRequest,
    HeadTooLarge,
    NotImplementedTE,
    ProtocolError,
    URITooLong,
    VersionNotSupported,
)

H = b"Host: example.com\r\n"


def req(head_lines: bytes, request_line: bytes = b"GET / HTTP/1.1") -> bytes:
    return request_line + b"\r\n" + head_lines + b"\r\n"


# --------------------------------------------------------------------------------------
# Valid requests: (id, bytes, expected attributes)

VALID: list[tuple[str, bytes, dict[str, Any]]] = [
    (
        "simple-get",
        req(H),
        dict(
            method=b"GET",
            target=b"/",
            path=b"/",
            http_version=b"1.1",
            version=11,
            keep_alive=True,
            body_kind=BODY_NONE,
            host=b"example.com",
            headers=[(b"Host", b"example.com")],
        ),
    ),
    (
        "fields-in-order-original-case-ows-trimmed",
        req(b"hOsT:   a.example  \r\nX-Empty:\r\nX-Tab:\tv\t\r\nX-Inner: a  b\r\n"),
        dict(
            headers=[
                (b"hOsT", b"a.example"),
                (b"X-Empty", b""),
                (b"X-Tab", b"v"),
                (b"X-Inner", b"a  b"),
            ],
            host=b"a.example",
        ),
    ),
    ("obs-text-in-value", req(H + b"X-Latin: caf\xe9 \x80\xff\r\n"), dict()),
    ("whitespace-only-value", req(H + b"X-Blank:  \t \r\n"), dict()),
    (
        "content-length",
        req(H + b"Content-Length: 5\r\n", b"POST /upload HTTP/1.1"),
        dict(method=b"POST", body_kind=BODY_LENGTH, content_length=5),
    ),
    (
        "content-length-zero",
        req(H + b"Content-Length: 0\r\n", b"POST / HTTP/1.1"),
        dict(body_kind=BODY_LENGTH, content_length=0),
    ),
    (
        "content-length-leading-zeros",
        req(H + b"Content-Length: 007\r\n", b"PUT / HTTP/1.1"),
        dict(body_kind=BODY_LENGTH, content_length=7),
    ),
    (
        "content-length-18-digits",
        req(H + b"Content-Length: 999999999999999999\r\n", b"PUT / HTTP/1.1"),
        dict(body_kind=BODY_LENGTH, content_length=999999999999999999),
    ),
    (
        "chunked",
        req(H + b"Transfer-Encoding: chunked\r\n", b"POST / HTTP/1.1"),
        dict(body_kind=BODY_CHUNKED),
    ),
    (
        "chunked-any-case-and-ows",
        req(H + b"transfer-encoding:  ChUnKeD \r\n", b"POST / HTTP/1.1"),
        dict(body_kind=BODY_CHUNKED),
    ),
    (
        # RFC 9110 5.6.1: empty list elements are accepted and ignored.
        "chunked-with-empty-list-elements",
        req(H + b"Transfer-Encoding: , chunked,\r\n", b"POST / HTTP/1.1"),
        dict(body_kind=BODY_CHUNKED),
    ),
    ("keep-alive-11-default", req(H), dict(keep_alive=True)),
    ("close-11", req(H + b"Connection: close\r\n"), dict(keep_alive=False)),
    ("close-in-list-any-case", req(H + b"Connection: x-foo, CLOSE\r\n"), dict(keep_alive=False)),
    (
        "http10-no-host-no-keep-alive",
        req(b"", b"GET / HTTP/1.0"),
        dict(http_version=b"1.0", version=10, keep_alive=False, host=None),
    ),
    (
        "http10-keep-alive",
        req(b"Connection: Keep-Alive\r\n", b"GET / HTTP/1.0"),
        dict(keep_alive=True),
    ),
    (
        "http10-keep-alive-and-close",
        req(b"Connection: keep-alive, close\r\n", b"GET / HTTP/1.0"),
        dict(keep_alive=False),
    ),
    (
        "http10-content-length",
        req(b"Content-Length: 3\r\n", b"POST / HTTP/1.0"),
        dict(body_kind=BODY_LENGTH, content_length=3, keep_alive=False),
    ),
    (
        "expect-100-continue",
        req(H + b"Expect: 100-continue\r\nContent-Length: 10\r\n", b"PUT / HTTP/1.1"),
        dict(expect_continue=True),
    ),
    ("expect-any-case", req(H + b"Expect: 100-Continue\r\n"), dict(expect_continue=True)),
    ("expect-other", req(H + b"Expect: 200-ok\r\n"), dict(expect_continue=False)),
    (
        # RFC 9110 10.1.1: a server MUST ignore 100-continue in an HTTP/1.0 request.
        "expect-ignored-in-http10",
        req(b"Expect: 100-continue\r\n", b"PUT / HTTP/1.0"),
        dict(expect_continue=False),
    ),
    (
        "absolute-form",
        req(H, b"GET http://api.example.com:8080/a/b?c=d HTTP/1.1"),
        dict(
            absolute_form=True,
            host=b"api.example.com:8080",
            path=b"/a/b?c=d",
            target=b"http://api.example.com:8080/a/b?c=d",
        ),
    ),
    (
        "absolute-form-no-path",
        req(H, b"GET https://h.example HTTP/1.1"),
        dict(absolute_form=True, host=b"h.example", path=b"/"),
    ),
    (
        "absolute-form-query-without-path",
        req(H, b"GET http://h.example?q=1 HTTP/1.1"),
        dict(absolute_form=True, host=b"h.example", path=b"/?q=1"),
    ),
    (
        "absolute-form-ipv6",
        req(H, b"GET http://[::1]:80/x HTTP/1.1"),
        dict(host=b"[::1]:80", path=b"/x"),
    ),
    ("origin-form-query", req(H, b"GET /a?b=c&d HTTP/1.1"), dict(path=b"/a?b=c&d")),
    (
        "asterisk-form",
        req(H, b"OPTIONS * HTTP/1.1"),
        dict(method=b"OPTIONS", target=b"*", absolute_form=False),
    ),
    (
        "authority-form-connect",
        req(H, b"CONNECT example.com:443 HTTP/1.1"),
        dict(method=b"CONNECT", target=b"example.com:443"),
    ),
    ("extension-method", req(H, b"M-SEARCH /x HTTP/1.1"), dict(method=b"M-SEARCH")),
    ("method-at-limit", req(H, b"A" * 1024 + b" / HTTP/1.1"), dict(method=b"A" * 1024)),
    (
        "leading-crlf-skipped",
        b"\r\n\r\n" + req(H),
        dict(head_len=len(req(H)) + 4, raw=req(H), method=b"GET"),
    ),
    (
        "upgrade",
        req(H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"),
        dict(upgrade=True, keep_alive=True),
    ),
    ("upgrade-field-without-token", req(H + b"Upgrade: websocket\r\n"), dict(upgrade=False)),
    ("empty-host-value", req(b"Host:\r\n"), dict(host=b"")),
    (
        "host-with-port-and-ip-literal",
        req(b"Host: [2001:db8::1]:8443\r\n"),
        dict(host=b"[2001:db8::1]:8443"),
    ),
    (
        "connection-listed-fields-kept-in-headers",
        req(H + b"Connection: X-Hop\r\nX-Hop: 1\r\n"),
        dict(headers=[(b"Host", b"example.com"), (b"Connection", b"X-Hop"), (b"X-Hop", b"1")]),
    ),
    ("exactly-max-fields", req(b"".join(b"X-%d: v\r\n" % i for i in range(99)) + H), dict()),
]


@pytest.mark.parametrize(
    ("data", "expected"), [(d, e) for _, d, e in VALID], ids=[v[0] for v in VALID]
)
def test_valid_request(data: bytes, expected: dict[str, Any]) -> None:
    outcome = parse_three_ways(parse_request_head, data, seed=len(data))
    assert outcome[0] == "ok", outcome
    h = parse_request_head(data)
    assert h is not None
    assert h.head_len == len(data)
    for attr, value in expected.items():
        assert getattr(h, attr) == value, attr


# --------------------------------------------------------------------------------------
# Invalid requests: (id, bytes, error class, status)

INVALID: list[tuple[str, bytes, type[ProtocolError], int]] = [
    # Framing (RFC 9112 6.1, 6.3): anything a next hop could frame differently is 400.
    (
        "te-and-cl",
        req(H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"POST / HTTP/1.1"),
        BadRequest,
        400,
    ),
    (
        "cl-and-te",
        req(H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"POST / HTTP/1.1"),
        BadRequest,
        400,
    ),
    ("cl-duplicate-equal", req(H + b"Content-Length: 5\r\nContent-Length: 5\r\n"), BadRequest, 400),
    (
        "cl-duplicate-differ",
        req(H + b"Content-Length: 5\r\nContent-Length: 6\r\n"),
        BadRequest,
        400,
    ),
    ("cl-list-equal", req(H + b"Content-Length: 1, 1\r\n"), BadRequest, 400),
    ("cl-plus-sign", req(H + b"Content-Length: +5\r\n"), BadRequest, 400),
    ("cl-minus-sign", req(H + b"Content-Length: -1\r\n"), BadRequest, 400),
    ("cl-trailing-garbage", req(H + b"Content-Length:  5x\r\n"), BadRequest, 400),
    ("cl-inner-space", req(H + b"Content-Length: 5 5\r\n"), BadRequest, 400),
    ("cl-hex", req(H + b"Content-Length: 0x10\r\n"), BadRequest, 400),
    ("cl-empty", req(H + b"Content-Length:\r\n"), BadRequest, 400),
    ("cl-19-digits", req(H + b"Content-Length: 1000000000000000000\r\n"), BadRequest, 400),
    ("cl-30-digits", req(H + b"Content-Length: " + b"9" * 30 + b"\r\n"), BadRequest, 400),
    ("te-in-http10", req(b"Transfer-Encoding: chunked\r\n", b"POST / HTTP/1.0"), BadRequest, 400),
    # Transfer codings other than one final chunked: 501 (RFC 9112 6.1).
    ("te-gzip", req(H + b"Transfer-Encoding: gzip\r\n"), NotImplementedTE, 501),
    ("te-gzip-chunked", req(H + b"Transfer-Encoding: gzip, chunked\r\n"), NotImplementedTE, 501),
    ("te-chunked-gzip", req(H + b"Transfer-Encoding: chunked, gzip\r\n"), NotImplementedTE, 501),
    (
        "te-chunked-twice",
        req(H + b"Transfer-Encoding: chunked, chunked\r\n"),
        NotImplementedTE,
        501,
    ),
    (
        "te-two-fields",
        req(H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
        NotImplementedTE,
        501,
    ),
    ("te-identity", req(H + b"Transfer-Encoding: identity\r\n"), NotImplementedTE, 501),
    ("te-empty", req(H + b"Transfer-Encoding:\r\n"), NotImplementedTE, 501),
    ("te-chunked-param", req(H + b"Transfer-Encoding: chunked;q=1\r\n"), NotImplementedTE, 501),
    # Field syntax (RFC 9110 5.1, 5.5; RFC 9112 5).
    ("obs-fold", req(H + b"X-Folded: a\r\n b\r\n"), BadRequest, 400),
    ("obs-fold-tab", req(H + b"X-Folded: a\r\n\tb\r\n"), BadRequest, 400),
    ("obs-fold-first-line", req(b" " + H), BadRequest, 400),
    ("space-before-colon", req(H + b"X-Foo : a\r\n"), BadRequest, 400),
    ("tab-before-colon", req(H + b"X-Foo\t: a\r\n"), BadRequest, 400),
    ("host-space-before-colon", req(b"Host : example.com\r\n"), BadRequest, 400),
    ("empty-name", req(H + b": a\r\n"), BadRequest, 400),
    ("no-colon", req(H + b"X-Foo\r\n"), BadRequest, 400),
    ("name-nul", req(H + b"X-F\x00o: a\r\n"), BadRequest, 400),
    ("name-separator", req(H + b"X(Foo): a\r\n"), BadRequest, 400),
    ("name-obs-text", req(H + b"X-F\xe9: a\r\n"), BadRequest, 400),
    ("name-del", req(H + b"X-F\x7f: a\r\n"), BadRequest, 400),
    ("name-bare-cr", req(H + b"X-F\roo: a\r\n"), BadRequest, 400),
    ("name-ctl", req(H + b"X-F\x01: a\r\n"), BadRequest, 400),
    ("value-nul", req(H + b"X-Foo: a\x00b\r\n"), BadRequest, 400),
    ("value-bare-cr", req(H + b"X-Foo: a\rb\r\n"), BadRequest, 400),
    ("value-bare-cr-at-end", req(H + b"X-Foo: a\r\r\n"), BadRequest, 400),
    ("value-ctl-01", req(H + b"X-Foo: a\x01b\r\n"), BadRequest, 400),
    ("value-ctl-1f", req(H + b"X-Foo: \x1f\r\n"), BadRequest, 400),
    ("value-vt", req(H + b"X-Foo: a\x0bb\r\n"), BadRequest, 400),
    ("value-ff", req(H + b"X-Foo: a\x0cb\r\n"), BadRequest, 400),
    ("value-del", req(H + b"X-Foo: a\x7fb\r\n"), BadRequest, 400),
    # Bare LF: rejected everywhere (the module's stated decision).
    ("bare-lf-request-line", b"GET / HTTP/1.1\n" + H + b"\r\n", BadRequest, 400),
    ("bare-lf-field-line", b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", BadRequest, 400),
    ("bare-lf-blank-line", b"GET / HTTP/1.1\r\n" + H + b"\n", BadRequest, 400),
    ("bare-lf-only-line-endings", b"GET / HTTP/1.1\nHost: a\n\n", BadRequest, 400),
    ("bare-lf-leading-empty-line", b"\n" + req(H), BadRequest, 400),
    ("bare-lf-after-leading-crlf", b"\r\n\n" + req(H), BadRequest, 400),
    # Host (RFC 9112 3.2).
    ("missing-host-11", req(b"X-Foo: a\r\n"), BadRequest, 400),
    ("two-hosts-11", req(H + H), BadRequest, 400),
    ("two-hosts-10", req(H + H, b"GET / HTTP/1.0"), BadRequest, 400),
    ("host-with-space", req(b"Host: a b\r\n"), BadRequest, 400),
    ("host-with-userinfo", req(b"Host: user@example.com\r\n"), BadRequest, 400),
    ("host-with-slash", req(b"Host: example.com/x\r\n"), BadRequest, 400),
    # Request line (RFC 9112 3).
    ("target-nul", req(H, b"GET /a\x00b HTTP/1.1"), BadRequest, 400),
    ("target-del", req(H, b"GET /a\x7f HTTP/1.1"), BadRequest, 400),
    ("target-ctl", req(H, b"GET /a\x01 HTTP/1.1"), BadRequest, 400),
    ("target-obs-text", req(H, b"GET /caf\xe9 HTTP/1.1"), BadRequest, 400),
    ("target-bare-cr", req(H, b"GET /a\rb HTTP/1.1"), BadRequest, 400),
    ("target-tab", req(H, b"GET /a\tb HTTP/1.1"), BadRequest, 400),
    ("double-space", req(H, b"GET  / HTTP/1.1"), BadRequest, 400),
    ("leading-space", req(H, b" GET / HTTP/1.1"), BadRequest, 400),
    ("trailing-space", req(H, b"GET / HTTP/1.1 "), BadRequest, 400),
    ("tabs-as-separators", req(H, b"GET\t/\tHTTP/1.1"), BadRequest, 400),
    ("http09", b"GET /\r\n\r\n", BadRequest, 400),
    ("method-separator", req(H, b"GE(T / HTTP/1.1"), BadRequest, 400),
    ("lowercase-http-name", req(H, b"GET / http/1.1"), BadRequest, 400),
    ("version-one-digit", req(H, b"GET / HTTP/1"), BadRequest, 400),
    ("version-three-digits", req(H, b"GET / HTTP/1.10"), BadRequest, 400),
    ("version-letters", req(H, b"GET / HTTP/a.b"), BadRequest, 400),
    ("empty-request-line", b"\r\n\r\n\r\n" + b" \r\n\r\n", BadRequest, 400),
    ("target-not-origin-form", req(H, b"GET foo HTTP/1.1"), BadRequest, 400),
    ("asterisk-outside-options", req(H, b"GET * HTTP/1.1"), BadRequest, 400),
    ("absolute-form-empty-authority", req(H, b"GET http:///x HTTP/1.1"), BadRequest, 400),
    ("absolute-form-userinfo", req(H, b"GET http://u:p@h/x HTTP/1.1"), BadRequest, 400),
    # Versions (RFC 9110 15.6.6).
    ("http2", req(H, b"GET / HTTP/2.0"), VersionNotSupported, 505),
    ("http12", req(H, b"GET / HTTP/1.2"), VersionNotSupported, 505),
    ("http09-versioned", req(H, b"GET / HTTP/0.9"), VersionNotSupported, 505),
    ("http3", req(H, b"GET / HTTP/3.0"), VersionNotSupported, 505),
    # Limits.
    (
        "too-many-fields",
        req(H + b"".join(b"X-%d: v\r\n" % i for i in range(100))),
        HeadTooLarge,
        431,
    ),
    ("head-too-large", req(H + b"X-Big: " + b"a" * 33000 + b"\r\n"), HeadTooLarge, 431),
    ("head-too-large-unfinished", b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 33000, HeadTooLarge, 431),
    ("leading-crlf-flood", b"\r\n" * 17000, HeadTooLarge, 431),
    ("target-too-long", req(H, b"GET /" + b"a" * 8192 + b" HTTP/1.1"), URITooLong, 414),
    ("target-too-long-unfinished-line", b"GET /" + b"a" * 8192, URITooLong, 414),
    (
        "target-too-long-unfinished-head",
        b"GET /" + b"a" * 8192 + b" HTTP/1.1\r\nHost: a\r\n",
        URITooLong,
        414,
    ),
    ("method-too-long", b"A" * 1025, BadRequest, 400),
    (
        "method-too-long-with-target",
        b"A" * 1025 + b" / HTTP/1.1\r\n" + H + b"\r\n",
        BadRequest,
        400,
    ),
]


@pytest.mark.parametrize(
    ("data", "cls", "status"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_request(data: bytes, cls: type[ProtocolError], status: int) -> None:
    assert cls.status == status
    outcome = parse_three_ways(parse_request_head, data, seed=len(data))
    assert outcome == ("err", cls.__name__, status)
    with pytest.raises(cls) as info:
        parse_request_head(data)
    assert info.value.status == status
    assert info.value.close


# --------------------------------------------------------------------------------------
# Limits at their boundaries


def test_target_limit_is_on_the_target_not_the_line() -> None:
    # A long method must not turn a target within the limit into a 414.
    for method in (b"GET", b"OPTIONS", b"PROPFIND"):
        ok = req(H, method + b" /" + b"a" * 8191 + b" HTTP/1.1")
        assert parse_three_ways(parse_request_head, ok)[0] == "ok"
        over = req(H, method + b" /" + b"a" * 8192 + b" HTTP/1.1")
        assert parse_three_ways(parse_request_head, over) == ("err", "URITooLong", 414)


@pytest.mark.parametrize("max_target", [1, 16, 100])
def test_target_limit_configurable(max_target: int) -> None:
    target = b"/" + b"x" * (max_target - 1)
    ok = req(H, b"GET " + target + b" HTTP/1.1")
    got = parse_three_ways(parse_request_head, ok, max_target=max_target)
    assert got[0] == "ok"
    over = req(H, b"GET " + target + b"x HTTP/1.1")
    got = parse_three_ways(parse_request_head, over, max_target=max_target)
    assert got == ("err", "URITooLong", 414)
    # Still arriving: the line is not finished, the target already too long.
    assert parse_three_ways(
        parse_request_head, over[: 4 + max_target + 1], max_target=max_target
    ) == (
        "err",
        "URITooLong",
        414,
    )
    assert parse_whole(parse_request_head, over[: 4 + max_target], max_target=max_target) == (
        "incomplete",
    )


def test_head_limit_boundary() -> None:
    base = req(H + b"X-Pad: \r\n")
    pad = 300 - len(base)
    exact = req(H + b"X-Pad: " + b"p" * pad + b"\r\n")
    assert len(exact) == 300
    assert parse_three_ways(parse_request_head, exact, max_head_bytes=300)[0] == "ok"
    assert parse_three_ways(parse_request_head, exact, max_head_bytes=299) == (
        "err",
        "HeadTooLarge",
        431,
    )


def test_head_limit_counts_from_start_and_includes_leading_crlf() -> None:
    data = b"\r\n" * 10 + req(H)
    assert parse_whole(parse_request_head, data, max_head_bytes=len(data))[0] == "ok"
    assert parse_three_ways(parse_request_head, data, max_head_bytes=len(data) - 1) == (
        "err",
        "HeadTooLarge",
        431,
    )
    # Bytes before ``start`` do not count.
    assert parse_request_head(b"x" * 1000 + data, 1000, max_head_bytes=len(data)) is not None


@pytest.mark.parametrize("max_fields", [1, 5, 100, MAX_FIELDS_LIMIT])
def test_field_count_limit(max_fields: int) -> None:
    fields = H + b"".join(b"X-%d: v\r\n" % i for i in range(max_fields - 1))
    assert parse_whole(parse_request_head, req(fields), max_fields=max_fields)[0] == "ok"
    got = parse_three_ways(
        parse_request_head, req(fields + b"X-Over: 1\r\n"), max_fields=max_fields
    )
    assert got == ("err", "HeadTooLarge", 431)


@pytest.mark.parametrize("bad", [0, -1, MAX_FIELDS_LIMIT + 1])
def test_field_count_limit_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError):
        parse_request_head(req(H), max_fields=bad)


@pytest.mark.parametrize(
    "kw", [dict(max_head_bytes=0), dict(max_head_bytes=1 << 30), dict(max_target=0)]
)
def test_bad_limits_are_value_errors(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        parse_request_head(req(H), **kw)


def test_both_limits_broken_reports_the_one_met_first() -> None:
    # The target breaks max_target (64) at byte ~70 and the head limit (128) much later:
    # a reader fed byte by byte sees 414 first, so the whole head must get 414 too.
    data = req(H, b"GET /" + b"a" * 200 + b" HTTP/1.1")
    got = parse_three_ways(parse_request_head, data, max_head_bytes=128, max_target=64)
    assert got == ("err", "URITooLong", 414)
    # Here the head limit comes first.
    data = b"\r\n" * 60 + req(H, b"GET /" + b"a" * 200 + b" HTTP/1.1")
    got = parse_three_ways(parse_request_head, data, max_head_bytes=128, max_target=64)
    assert got == ("err", "HeadTooLarge", 431)
    # A long line ending in a bare LF: the limit was broken before the LF arrived.
    data = b"GET /" + b"a" * 100 + b" HTTP/1.1\n\r\n"
    got = parse_three_ways(parse_request_head, data, max_target=64)
    assert got == ("err", "URITooLong", 414)


# --------------------------------------------------------------------------------------
# Incremental use


def test_incomplete_heads_return_none() -> None:
    data = req(H + b"Content-Length: 3\r\n", b"POST / HTTP/1.1")
    for cut in range(len(data)):
        assert parse_request_head(data[:cut]) is None, cut
    assert parse_request_head(b"") is None
    assert parse_request_head(b"\r\n") is None
    assert parse_request_head(b"\r\n\r") is None


def test_stale_scan_from_beyond_the_buffer_is_harmless() -> None:
    data = req(H)
    assert parse_request_head(data[:-2], scan_from=10**6) is None
    h = parse_request_head(data, scan_from=10**6)
    # The hint promised that every LF up to the end was checked, which is not true; the
    # parser only has to stay inside the buffer.
    assert h is None or h.head_len == len(data)
    assert parse_request_head(data, scan_from=-5) is not None


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_any_buffer(kind: type) -> None:
    data = req(H + b"X: y\r\n")
    h = parse_request_head(kind(data))
    assert h is not None and h.get(b"x") == b"y"


def test_start_out_of_range() -> None:
    with pytest.raises(ValueError):
        parse_request_head(req(H), -1)
    with pytest.raises(ValueError):
        parse_request_head(req(H), len(req(H)) + 1)
    assert parse_request_head(req(H), len(req(H))) is None


def test_pipelined_requests_with_bodies() -> None:
    first = req(H + b"Content-Length: 5\r\n", b"POST /one HTTP/1.1") + b"hello"
    second = req(H + b"Transfer-Encoding: chunked\r\n", b"POST /two HTTP/1.1")
    second += b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"
    third = req(H + b"Expect: 100-continue\r\n", b"GET /three HTTP/1.1")
    fourth = b"\r\n" + req(H + b"Connection: close\r\n", b"DELETE /four HTTP/1.1")
    buf = first + second + third + fourth
    pos = 0
    seen = []
    while pos < len(buf):
        h = parse_request_head(buf, pos)
        assert h is not None
        seen.append((h.method, h.path, h.keep_alive))
        pos += h.head_len
        if h.body_kind == BODY_LENGTH:
            assert buf[pos : pos + h.content_length] == b"hello"
            pos += h.content_length
        elif h.body_kind == BODY_CHUNKED:
            r = ChunkedReader()
            end, data = r.decode(buf, pos)
            assert r.done and data == [b"abc"]
            pos = end
    assert pos == len(buf)
    assert seen == [
        (b"POST", b"/one", True),
        (b"POST", b"/two", True),
        (b"GET", b"/three", True),
        (b"DELETE", b"/four", False),
    ]


def test_head_accessors() -> None:
    data = req(H + b"X-Multi: 1\r\nx-multi: 2\r\nX-MULTI: 3\r\n")
    h = parse_request_head(data)
    assert h is not None
    assert len(h) == 4
    assert h.get(b"X-MULTI") == b"1"
    assert h.get(b"x-none") is None
    assert h.get(b"x-none", b"d") == b"d"
    assert h.get_all(b"x-multi") == [b"1", b"2", b"3"]
    assert b"HOST" in h and b"x-none" not in h
    assert h.raw == data
    assert "GET" in repr(h)


def test_heads_cannot_be_made_from_python() -> None:
    with pytest.raises(TypeError):
        RequestHead()


def test_make_request_helper_round_trip() -> None:
    data = make_request(b"PATCH", b"/x", b"HTTP/1.1", [(b"Host", b"h"), (b"A", b"b")])
    h = parse_request_head(data)
    assert h is not None and h.method == b"PATCH" and h.headers == [(b"Host", b"h"), (b"A", b"b")]
