"""Head serialization: what build_request_head / build_response_head copy, drop and add,
and the round trip parse(build(parse(x))) on generated heads."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgw._core.http import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    RequestHead,
    ResponseHead,
    StripSet,
    build_request_head,
    build_response_head,
    parse_request_head,
    parse_response_head,
)


def parse_req(data: bytes) -> RequestHead:
    h = parse_request_head(data)
    assert h is not None
    assert h.head_len == len(data)
    return h


def parse_resp(data: bytes, request_was_head: bool = False) -> ResponseHead:
    h = parse_response_head(data, request_was_head=request_was_head)
    assert h is not None
    assert h.head_len == len(data)
    return h


# --------------------------------------------------------------------------------------
# Requests

FULL_REQUEST = (
    b"POST /api/items?x=1 HTTP/1.1\r\n"
    b"Host: gw.example\r\n"
    b"Connection: keep-alive, X-Hop\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"TE: trailers\r\n"
    b"Trailer: X-Sum\r\n"
    b"Upgrade: h2c\r\n"
    b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
    b"X-Hop: secret\r\n"
    b"Accept: application/json\r\n"
    b"Content-Length: 0005\r\n"
    b"X-Forwarded-For: 203.0.113.7\r\n"
    b"X-Forwarded-Proto: gopher\r\n"
    b"X-Forwarded-Host: evil.example\r\n"
    b"Forwarded: for=1.2.3.4\r\n"
    b"X-Request-Id: client-chosen\r\n"
    b"Via: 1.1 client-proxy\r\n"
    b"Authorization: Bearer t\r\n"
    b"Cookie: a=b\r\n"
    b"\r\n"
)


def test_request_head_exact_bytes() -> None:
    h = parse_req(FULL_REQUEST)
    out = build_request_head(
        h,
        host=b"fn.internal:8443",
        client_ip=b"198.51.100.1",
        proto=b"https",
        request_id=b"req-1",
        via=b"1.1 fastgw",
        extra=b"X-Identity: alice\r\n",
    )
    assert out == (
        b"POST /api/items?x=1 HTTP/1.1\r\n"
        b"Host: fn.internal:8443\r\n"
        b"Accept: application/json\r\n"
        b"Authorization: Bearer t\r\n"
        b"Cookie: a=b\r\n"
        b"Content-Length: 5\r\n"
        b"X-Forwarded-For: 203.0.113.7, 198.51.100.1\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: gw.example\r\n"
        b"X-Request-Id: req-1\r\n"
        b"Via: 1.1 client-proxy, 1.1 fastgw\r\n"
        b"X-Identity: alice\r\n"
        b"\r\n"
    )


def test_request_minimal_adds_only_host() -> None:
    h = parse_req(FULL_REQUEST)
    out = build_request_head(h, host=b"up")
    assert out == (
        b"POST /api/items?x=1 HTTP/1.1\r\nHost: up\r\nAccept: application/json\r\n"
        b"Authorization: Bearer t\r\nCookie: a=b\r\nContent-Length: 5\r\n"
        b"X-Forwarded-Host: gw.example\r\n\r\n"
    )


def test_xff_replaced_when_not_appending() -> None:
    h = parse_req(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1, 10.0.0.2\r\n\r\n")
    out = build_request_head(h, host=b"up", client_ip=b"192.0.2.9", xff_append=False)
    assert parse_req(out).get_all(b"x-forwarded-for") == [b"192.0.2.9"]
    out = build_request_head(h, host=b"up", client_ip=b"192.0.2.9")
    assert parse_req(out).get_all(b"x-forwarded-for") == [b"10.0.0.1, 10.0.0.2, 192.0.2.9"]


def test_xff_dropped_without_client_ip() -> None:
    h = parse_req(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n")
    assert b"x-forwarded-for" not in parse_req(build_request_head(h, host=b"up"))


def test_xff_joins_fields_and_skips_empty_and_connection_listed() -> None:
    h = parse_req(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For:\r\n"
        b"x-forwarded-for: 2.2.2.2\r\n\r\n"
    )
    out = parse_req(build_request_head(h, host=b"up", client_ip=b"3.3.3.3"))
    assert out.get_all(b"x-forwarded-for") == [b"1.1.1.1, 2.2.2.2, 3.3.3.3"]
    # RFC 9110 7.6.1: a field the sender named in Connection is not forwarded in any form.
    h = parse_req(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: X-Forwarded-For, Via\r\n"
        b"X-Forwarded-For: 1.1.1.1\r\nVia: 1.0 p\r\n\r\n"
    )
    out = parse_req(build_request_head(h, host=b"up", client_ip=b"3.3.3.3", via=b"1.1 gw"))
    assert out.get_all(b"x-forwarded-for") == [b"3.3.3.3"]
    assert out.get_all(b"via") == [b"1.1 gw"]


def test_via_appended_or_dropped() -> None:
    h = parse_req(b"GET / HTTP/1.1\r\nHost: a\r\nVia: 1.0 a\r\nVia:\r\nVia: 1.1 b\r\n\r\n")
    out = parse_req(build_request_head(h, host=b"up", via=b"1.1 gw"))
    assert out.get_all(b"via") == [b"1.0 a, 1.1 b, 1.1 gw"]
    # Without ``via`` the forwarding fields stay fastgw's to write: the client's go.
    assert b"via" not in parse_req(build_request_head(h, host=b"up"))


def test_forwarded_host_from_absolute_form_and_absent_without_host() -> None:
    h = parse_req(b"GET http://target.example/p?q HTTP/1.1\r\nHost: other.example\r\n\r\n")
    out = build_request_head(h, host=b"up")
    assert out.startswith(b"GET /p?q HTTP/1.1\r\nHost: up\r\n")
    assert parse_req(out).get(b"x-forwarded-host") == b"target.example"
    h = parse_req(b"GET / HTTP/1.0\r\n\r\n")
    out = build_request_head(h, host=b"up")
    assert out == b"GET / HTTP/1.1\r\nHost: up\r\n\r\n"


def test_http10_request_goes_up_as_kept_alive_http11() -> None:
    h = parse_req(b"POST /x HTTP/1.0\r\nConnection: close\r\nContent-Length: 3\r\n\r\n")
    up = parse_req(build_request_head(h, host=b"up"))
    assert up.http_version == b"1.1" and up.keep_alive
    assert up.body_kind == BODY_LENGTH and up.content_length == 3


@pytest.mark.parametrize(
    ("framing", "expected"),
    [
        (b"", (BODY_NONE, None, None)),
        (b"Content-Length: 000\r\n", (BODY_LENGTH, b"0", None)),
        (b"Content-Length: 123456789012345678\r\n", (BODY_LENGTH, b"123456789012345678", None)),
        (b"Transfer-Encoding: Chunked\r\n", (BODY_CHUNKED, None, b"chunked")),
    ],
)
def test_request_framing_rewritten(
    framing: bytes, expected: tuple[int, bytes | None, bytes | None]
) -> None:
    h = parse_req(b"PUT / HTTP/1.1\r\nHost: a\r\n" + framing + b"\r\n")
    up = parse_req(build_request_head(h, host=b"up"))
    assert (up.body_kind, up.get(b"content-length"), up.get(b"transfer-encoding")) == expected


def test_method_and_target_overrides() -> None:
    h = parse_req(b"GET /public/x HTTP/1.1\r\nHost: a\r\n\r\n")
    out = build_request_head(h, host=b"up", method=b"POST", target=b"/fn/invoke?x=1")
    assert out.startswith(b"POST /fn/invoke?x=1 HTTP/1.1\r\n")


def test_strip_set_names_and_prefixes_any_case() -> None:
    h = parse_req(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Internal: 1\r\nx-INTERNAL: 2\r\nX-Internally: 3\r\n"
        b"X-Fastgw-User: mallory\r\nx-fastgw-roles: admin\r\nX-Fastgw: 4\r\nKeep: 5\r\n\r\n"
    )
    strip = StripSet(names=[b"X-INTERNAL"], prefixes=[b"X-FastGW-"])
    up = parse_req(build_request_head(h, host=b"up", strip=strip))
    assert up.headers == [
        (b"Host", b"up"),
        (b"X-Internally", b"3"),
        (b"X-Fastgw", b"4"),
        (b"Keep", b"5"),
        (b"X-Forwarded-Host", b"a"),
    ]
    assert parse_req(build_request_head(h, host=b"up", strip=StripSet())).headers == [
        (b"Host", b"up"),
        *h.headers[1:],
        (b"X-Forwarded-Host", b"a"),
    ]


# --------------------------------------------------------------------------------------
# Responses


def test_response_head_exact_bytes() -> None:
    h = parse_resp(
        b"HTTP/1.0 200 Fine\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\n"
        b"X-Hop: 1\r\nContent-Type: text/plain\r\nContent-Length: 02\r\nVia: 1.0 fn\r\n"
        b"Upgrade: h2c\r\nTrailer: X\r\nSet-Cookie: a=1\r\n\r\n"
    )
    out = build_response_head(h, via=b"1.1 fastgw", extra=b"X-Request-Id: r1\r\n")
    assert out == (
        b"HTTP/1.1 200 Fine\r\nContent-Type: text/plain\r\nSet-Cookie: a=1\r\n"
        b"Content-Length: 2\r\nVia: 1.0 fn, 1.1 fastgw\r\nX-Request-Id: r1\r\n\r\n"
    )


def test_response_connection_choices() -> None:
    h = parse_resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert parse_resp(build_response_head(h, close=True)).keep_alive is False
    ka = build_response_head(h, keep_alive_10=True)
    assert b"Connection: keep-alive\r\n" in ka
    # Via is kept as is when fastgw adds none.
    h = parse_resp(b"HTTP/1.1 200 OK\r\nVia: 1.1 x\r\nContent-Length: 0\r\n\r\n")
    assert parse_resp(build_response_head(h)).get(b"via") == b"1.1 x"


def test_response_reframed_for_a_read_until_close_body() -> None:
    h = parse_resp(b"HTTP/1.0 200 OK\r\nContent-Type: a/b\r\n\r\n")
    assert h.body_kind == BODY_UNTIL_CLOSE
    out = parse_resp(build_response_head(h, body_kind=BODY_CHUNKED))
    assert out.body_kind == BODY_CHUNKED and out.keep_alive
    plain = parse_resp(build_response_head(h, close=True))
    assert plain.body_kind == BODY_UNTIL_CLOSE


def test_switching_protocols_keeps_upgrade() -> None:
    h = parse_resp(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Accept: x\r\n\r\n"
    )
    out = build_response_head(h, close=True)
    assert out == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: x\r\n"
        b"Connection: upgrade\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("status_line", "was_head", "kept"),
    [
        (b"HTTP/1.1 200 OK", True, True),  # HEAD: the length GET would have had
        (b"HTTP/1.1 304 Not Modified", False, True),
        (b"HTTP/1.1 204 No Content", False, False),  # RFC 9110 8.6: never on 204
        (b"HTTP/1.1 100 Continue", False, False),
    ],
)
def test_bodiless_responses_and_content_length(
    status_line: bytes, was_head: bool, kept: bool
) -> None:
    h = parse_resp(status_line + b"\r\nContent-Length: 42\r\n\r\n", request_was_head=was_head)
    assert h.body_kind == BODY_NONE
    out = parse_resp(build_response_head(h), request_was_head=True)
    assert out.get(b"content-length") == (b"42" if kept else None)
    # Re-framing a bodiless response would be the caller's mistake; the relayed length
    # must not be kept next to the new framing.
    both = build_response_head(h, body_kind=BODY_CHUNKED)
    assert b"Content-Length" not in both


def test_response_strip_and_no_reason() -> None:
    h = parse_resp(b"HTTP/1.1 200\r\nX-Debug: 1\r\nx-debug-trace: 2\r\nContent-Length: 0\r\n\r\n")
    out = build_response_head(h, strip=StripSet(prefixes=[b"x-debug"]))
    assert out == b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n"
    assert parse_resp(out).reason == b""


# --------------------------------------------------------------------------------------
# Round trip on generated heads

TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VCHAR = bytes(range(0x21, 0x7F))
VALUE_CHARS = VCHAR + b" \t" + bytes(range(0x80, 0x100, 7))

# Fields the serializers own: dropped from the copy, written (or not) by fastgw.
MANAGED = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"upgrade",
    b"transfer-encoding",
    b"content-length",
    b"proxy-authorization",
    b"host",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",
    b"via",
    b"forwarded",
}


def field_values() -> st.SearchStrategy[bytes]:
    return (
        st.binary(max_size=12)
        .map(lambda b: bytes(VALUE_CHARS[x % len(VALUE_CHARS)] for x in b))
        .map(lambda v: v.strip(b" \t"))
    )


def field_names() -> st.SearchStrategy[bytes]:
    generic = st.binary(min_size=1, max_size=10).map(
        lambda b: bytes(TCHAR[x % len(TCHAR)] for x in b)
    )
    managed = st.sampled_from(sorted(MANAGED - {b"host", b"content-length", b"transfer-encoding"}))
    mixed = managed.flatmap(lambda n: st.sampled_from([n, n.upper(), n.title()]))
    return st.one_of(
        generic, mixed, st.sampled_from([b"X-Hop", b"Cookie", b"Accept", b"x-api-key", b"Close"])
    )


def connection_values() -> st.SearchStrategy[bytes]:
    tokens = st.sampled_from(
        [b"keep-alive", b"close", b"X-Hop", b"x-api-key", b"Upgrade", b"cookie", b"Close"]
    )
    return st.lists(tokens, min_size=1, max_size=3).map(b", ".join)


@st.composite
def fields(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    out = []
    for name in draw(st.lists(field_names(), max_size=8)):
        value = draw(connection_values()) if name.lower() == b"connection" else draw(field_values())
        out.append((name, value))
    if draw(st.booleans()):
        # Make Connection-listed fields common, not a rare coincidence.
        listed = draw(
            st.sampled_from([b"X-Hop", b"x-api-key", b"Cookie", b"Via", b"X-Forwarded-For"])
        )
        out.insert(draw(st.integers(0, len(out))), (b"Connection", listed))
        out.insert(draw(st.integers(0, len(out))), (listed.upper(), draw(field_values())))
    return out


def conn_listed(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    listed = set()
    for name, value in headers:
        if name.lower() == b"connection":
            listed |= {t.strip().lower() for t in value.split(b",")}
    # Keep-Alive is dropped anyway and Upgrade must survive in a 101: the parser does
    # not mark fields for those two options.
    return listed - {b"keep-alive", b"upgrade"}


def copied(headers: list[tuple[bytes, bytes]], strip: set[bytes]) -> list[tuple[bytes, bytes]]:
    hop = conn_listed(headers)
    return [
        (n, v)
        for n, v in headers
        if n.lower() not in MANAGED and n.lower() not in hop and n.lower() not in strip
    ]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"X-CUSTOM"]))
    path = b"/" + bytes(VCHAR[x % len(VCHAR)] for x in draw(st.binary(max_size=16)))
    version = draw(st.sampled_from([b"1.1", b"1.0"]))
    hdrs = draw(fields())
    framing = draw(st.sampled_from([b"", b"cl", b"chunked"] if version == b"1.1" else [b"", b"cl"]))
    if framing == b"cl":
        hdrs.insert(
            draw(st.integers(0, len(hdrs))),
            (b"Content-Length", b"%d" % draw(st.integers(0, 10**12))),
        )
    elif framing == b"chunked":
        hdrs.insert(draw(st.integers(0, len(hdrs))), (b"Transfer-Encoding", b"chunked"))
    hdrs.insert(draw(st.integers(0, len(hdrs))), (b"Host", b"gw.example"))
    lines = [b"%s %s HTTP/%s" % (method, path, version)] + [n + b": " + v for n, v in hdrs]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@settings(max_examples=300, deadline=None)
@given(requests(), st.booleans(), st.booleans())
def test_request_round_trip(data: bytes, xff_append: bool, with_strip: bool) -> None:
    h = parse_req(data)
    strip = {b"x-api-key"} if with_strip else set()
    out = build_request_head(
        h,
        host=b"fn.internal",
        client_ip=b"192.0.2.1",
        proto=b"https",
        request_id=b"rid",
        via=b"1.1 gw",
        xff_append=xff_append,
        strip=StripSet(names=strip),
    )
    up = parse_req(out)
    assert (up.method, up.target, up.http_version, up.keep_alive) == (
        h.method,
        h.path,
        b"1.1",
        True,
    )
    assert (up.body_kind, up.content_length) == (h.body_kind, h.content_length)
    framing = {
        BODY_NONE: [],
        BODY_LENGTH: [(b"Content-Length", b"%d" % h.content_length)],
        BODY_CHUNKED: [(b"Transfer-Encoding", b"chunked")],
    }[h.body_kind]
    hop = conn_listed(h.headers)
    xff = [
        v
        for n, v in h.headers
        if n.lower() == b"x-forwarded-for" and v and b"x-forwarded-for" not in hop
    ]
    via = [v for n, v in h.headers if n.lower() == b"via" and v and b"via" not in hop]
    expected = [
        (b"Host", b"fn.internal"),
        *copied(h.headers, strip),
        *framing,
        (b"X-Forwarded-For", b", ".join([*(xff if xff_append else []), b"192.0.2.1"])),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"gw.example"),
        (b"X-Request-Id", b"rid"),
        (b"Via", b", ".join([*via, b"1.1 gw"])),
    ]
    assert up.headers == expected


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, bool]:
    status = draw(st.sampled_from([100, 103, 200, 201, 204, 301, 304, 404, 500, 599]))
    reason = bytes(VALUE_CHARS[x % len(VALUE_CHARS)] for x in draw(st.binary(max_size=10)))
    version = draw(st.sampled_from([b"1.1", b"1.0"]))
    hdrs = draw(fields())
    framing = draw(st.sampled_from([b"", b"cl", b"chunked"]))
    if framing == b"cl":
        hdrs.insert(
            draw(st.integers(0, len(hdrs))),
            (b"Content-Length", b"%d" % draw(st.integers(0, 10**12))),
        )
    elif framing == b"chunked":
        hdrs.insert(draw(st.integers(0, len(hdrs))), (b"Transfer-Encoding", b"chunked"))
    lines = [b"HTTP/%s %d %s" % (version, status, reason)] + [n + b": " + v for n, v in hdrs]
    return b"\r\n".join(lines) + b"\r\n\r\n", draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(responses())
def test_response_round_trip(case: tuple[bytes, bool]) -> None:
    data, was_head = case
    h = parse_resp(data, request_was_head=was_head)
    out = build_response_head(h, via=b"1.1 gw")
    down = parse_resp(out, request_was_head=was_head)
    assert (down.status, down.reason, down.http_version) == (h.status, h.reason, b"1.1")
    assert (down.body_kind, down.content_length) == (h.body_kind, h.content_length)
    relayed_cl = (
        [(n, v) for n, v in h.headers if n.lower() == b"content-length"]
        if h.body_kind == BODY_NONE and h.status >= 200 and h.status != 204
        else []
    )
    framing = {
        BODY_NONE: relayed_cl,
        BODY_UNTIL_CLOSE: [],
        BODY_LENGTH: [(b"Content-Length", b"%d" % h.content_length)],
        BODY_CHUNKED: [(b"Transfer-Encoding", b"chunked")],
    }[h.body_kind]
    hop = conn_listed(h.headers)
    via = [v for n, v in h.headers if n.lower() == b"via" and v and b"via" not in hop]
    # A response keeps what a request would lose to the forwarding rewrite (Host, X-*,
    # Forwarded, Proxy-Authorization); only hop-by-hop and framing fields go.
    response_managed = {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
    }
    response_managed |= {b"transfer-encoding", b"content-length", b"via"}
    kept = [
        (n, v)
        for n, v in h.headers
        if (n.lower() not in response_managed and n.lower() not in hop)
        or (n.lower() == b"upgrade" and h.status == 101 and b"upgrade" not in hop)
    ]
    conn = [(b"Connection", b"upgrade")] if h.status == 101 else []
    added = [*conn, (b"Via", b", ".join([*via, b"1.1 gw"]))]
    if relayed_cl:
        # A relayed Content-Length keeps its place among the copied fields.
        expected = [(n, v) for n, v in h.headers if (n, v) in kept or (n, v) in relayed_cl]
        expected += added
    else:
        expected = kept + framing + added
    assert down.headers == expected


def test_connection_options_name_hop_by_hop_fields_close_included() -> None:
    h = parse_req(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Trace\r\nClose: 1\r\n"
        b"x-trace: 2\r\nX-Kept: 3\r\n\r\n"
    )
    up = parse_req(build_request_head(h, host=b"up"))
    assert up.headers == [(b"Host", b"up"), (b"X-Kept", b"3"), (b"X-Forwarded-Host", b"a")]
