"""Differential tests: fastgw's parser against h11, the reference HTTP/1.1 implementation.

Generated and mutated requests, responses and chunked bodies go through both; both must
accept with the same meaning (method, target, version, fields, framing, keep-alive,
100-continue, where the head ends) or both reject. An input that ends before the head or
body does counts as a rejection: at EOF that is what it is for both.

Where fastgw is deliberately stricter or reads differently, ``deliberate_difference``
names the shape; the generators skip inputs of those shapes, and each difference has a
strict xfail below asserting agreement on one example, so the list stays honest: if
either side changes, the xfail turns into a failure.
"""

from __future__ import annotations

import os
import re
from typing import Any

import h11
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fastgw._core.http import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_UNTIL_CLOSE,
    ChunkedReader,
    parse_request_head,
    parse_response_head,
)
from fastgw.errors import ProtocolError

REJECT = ("reject",)

# Examples per property: small enough for the whole tests/core run to stay well under a
# minute on two cores; FASTGW_DIFF_EXAMPLES=20000 for a deep run before a parser change.
EXAMPLES = int(os.environ.get("FASTGW_DIFF_EXAMPLES", "400"))

# --------------------------------------------------------------------------------------
# Both parsers reduced to one comparable outcome


def _framing_from_h11_headers(headers: list[tuple[bytes, bytes]]) -> Any:
    # h11 has validated these (one chunked TE at most, one CL); RFC 9112 6.3 order.
    names = [n for n, _ in headers]
    if b"transfer-encoding" in names:
        return "chunked"
    for n, v in headers:
        if n == b"content-length":
            return int(v)
    return None


def _h11_keep_alive(role: Any, prefix: bytes, head_len: int, framing: Any, data: bytes) -> Any:
    """Run the message to its end on a fresh connection and read h11's verdict:
    DONE means the connection stays open, MUST_CLOSE that it closes; None if unknown."""
    if framing == "chunked":
        body = b"0\r\n\r\n"
    elif isinstance(framing, int):
        if framing > 1 << 16:
            return None
        body = b"x" * framing
    else:
        body = b""
    conn = h11.Connection(role)
    if prefix:
        conn.send(h11.Request(method=prefix, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
    conn.receive_data(data[:head_len] + body)
    for _ in range(4):
        ev = conn.next_event()
        if isinstance(ev, h11.EndOfMessage):
            break
    else:
        return None
    state = conn.their_state
    if state is h11.DONE:
        return True
    if state is h11.MUST_CLOSE:
        return False
    return None  # a protocol switch is pending: no keep-alive verdict


def h11_request(data: bytes) -> tuple[Any, ...]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(b"")
            ev = conn.next_event()
    except h11.RemoteProtocolError:
        return REJECT
    if not isinstance(ev, h11.Request):
        return REJECT
    head_len = len(data) - len(conn.trailing_data[0])
    headers = [(n.lower(), v) for n, v in ev.headers.raw_items()]
    framing = _framing_from_h11_headers(headers)
    expect = conn.client_is_waiting_for_100_continue
    keep_alive = _h11_keep_alive(h11.SERVER, b"", head_len, framing, data)
    return (
        "ok",
        ev.method,
        ev.target,
        ev.http_version,
        headers,
        framing,
        keep_alive,
        expect,
        head_len,
    )


def _fastgw_headers(h: Any) -> list[tuple[bytes, bytes]]:
    # h11 lowercases names and the Transfer-Encoding value; compare on that footing.
    out = []
    for n, v in h.headers:
        n = n.lower()
        out.append((n, v.lower() if n == b"transfer-encoding" else v))
    return out


def _fastgw_framing(h: Any) -> Any:
    if h.body_kind == BODY_CHUNKED:
        return "chunked"
    if h.body_kind == BODY_LENGTH:
        return h.content_length
    if h.body_kind == BODY_UNTIL_CLOSE:
        return "until-close"
    return None


def fastgw_request(data: bytes) -> tuple[Any, ...]:
    try:
        h = parse_request_head(data)
    except ProtocolError:
        return REJECT
    if h is None:
        return REJECT
    framing = _fastgw_framing(h)
    return (
        "ok",
        h.method,
        h.target,
        h.http_version,
        _fastgw_headers(h),
        framing,
        h.keep_alive,
        h.expect_continue,
        h.head_len,
    )


def compare_requests(data: bytes) -> None:
    ours, theirs = fastgw_request(data), h11_request(data)
    if ours[0] == theirs[0] == "ok" and theirs[6] is None:
        ours = (*ours[:6], None, *ours[7:])  # h11 gave no keep-alive verdict
    assert ours == theirs, data


def h11_response(data: bytes, method: bytes) -> tuple[Any, ...]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    try:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(b"")
            ev = conn.next_event()
    except h11.RemoteProtocolError:
        return REJECT
    if not isinstance(ev, (h11.Response, h11.InformationalResponse)):
        return REJECT
    head_len = len(data) - len(conn.trailing_data[0])
    headers = [(n.lower(), v) for n, v in ev.headers.raw_items()]
    if (
        isinstance(ev, h11.InformationalResponse)
        or ev.status_code in (204, 304)
        or method == b"HEAD"
    ):
        framing = None
    else:
        framing = _framing_from_h11_headers(headers)
        if framing is None:
            framing = "until-close"
    keep_alive = None
    if isinstance(ev, h11.Response) and framing != "until-close":
        keep_alive = _h11_keep_alive(h11.CLIENT, method, head_len, framing, data)
    return (
        "ok",
        ev.status_code,
        ev.reason,
        ev.http_version,
        headers,
        framing,
        keep_alive,
        head_len,
    )


def fastgw_response(data: bytes, method: bytes) -> tuple[Any, ...]:
    try:
        h = parse_response_head(data, request_was_head=method == b"HEAD")
    except ProtocolError:
        return REJECT
    if h is None:
        return REJECT
    return (
        "ok",
        h.status,
        h.reason,
        h.http_version,
        _fastgw_headers(h),
        _fastgw_framing(h),
        h.keep_alive,
        h.head_len,
    )


def compare_responses(data: bytes, method: bytes) -> None:
    ours, theirs = fastgw_response(data, method), h11_response(data, method)
    if ours[0] == theirs[0] == "ok" and theirs[6] is None:
        ours = (*ours[:6], None, *ours[7:])
    assert ours == theirs, data


CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


def h11_chunked(body: bytes) -> tuple[Any, ...]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(CHUNKED_HEAD + body)
    assert isinstance(conn.next_event(), h11.Request)
    data = bytearray()
    try:
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                return REJECT  # the body never ends: at EOF, an error
            if isinstance(ev, h11.Data):
                data += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
    except h11.RemoteProtocolError:
        return REJECT
    return ("ok", len(body) - len(conn.trailing_data[0]), bytes(data))


def fastgw_chunked(body: bytes) -> tuple[Any, ...]:
    r = ChunkedReader()
    try:
        pos, out = r.decode(body)
    except ProtocolError:
        return REJECT
    if not r.done:
        return REJECT
    return ("ok", pos, b"".join(out))


def compare_chunked(body: bytes) -> None:
    assert fastgw_chunked(body) == h11_chunked(body), body


# --------------------------------------------------------------------------------------
# The deliberate differences, recognised by shape

TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
HOST_CHARS = set(
    b"-._~!$&'()*+,;=:[]%0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
# Controls h11 lets through in field values (it refuses only NUL and whitespace).
LAX_CTL = set(range(0x01, 0x09)) | set(range(0x0E, 0x20)) | {0x7F}
FIELD_RE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*(.*?)[ \t]*")


ABSOLUTE_FORM = re.compile(rb"[^:/]+://[-._~!$&'()*+,;=:\[\]%0-9A-Za-z]+(?:[/?].*)?")


def _target_form_ok(method: bytes, target: bytes) -> bool:
    """RFC 9112 3.2: the forms fastgw accepts (h11 accepts any VCHAR target)."""
    return (
        target[:1] == b"/"
        or (target == b"*" and method == b"OPTIONS")
        or method == b"CONNECT"
        or ABSOLUTE_FORM.fullmatch(target) is not None
    )


def _bare_lf(data: bytes) -> bool:
    return any(c == 0x0A and (i == 0 or data[i - 1] != 0x0D) for i, c in enumerate(data))


def _tokens(values: list[bytes]) -> list[bytes]:
    return [t.strip(b" \t").lower() for v in values for t in v.split(b",") if t.strip(b" \t")]


def _field_differences(
    field_lines: list[bytes], version: bytes | None, response: bool
) -> str | None:
    if any(line[:1] in (b" ", b"\t") for line in field_lines):
        return "obs-fold"
    if any(LAX_CTL & set(line) for line in field_lines):
        return "control characters in field values"
    fields: dict[bytes, list[bytes]] = {}
    for line in field_lines:
        m = FIELD_RE.fullmatch(line)
        if m:
            fields.setdefault(m.group(1).lower(), []).append(m.group(2))
    cl = fields.get(b"content-length", [])
    te = fields.get(b"transfer-encoding", [])
    if len(cl) > 1 or any(b"," in v for v in cl):
        return "Content-Length repeated or a list"
    if any(len(v) > 18 for v in cl):
        return "Content-Length of 19 or 20 digits"
    if te and cl:
        return "Transfer-Encoding with Content-Length"
    if te and version == b"HTTP/1.0":
        return "Transfer-Encoding in HTTP/1.0"
    if te and _tokens(te) == [b"chunked"] and [v.lower() for v in te] != [b"chunked"]:
        return "empty list elements in Transfer-Encoding"
    if version == b"HTTP/1.0" and b"keep-alive" in _tokens(fields.get(b"connection", [])):
        return "HTTP/1.0 keep-alive"
    if response:
        return None
    if any(not set(v) <= HOST_CHARS for v in fields.get(b"host", [])):
        return "Host value syntax"
    if any(b"," in v for v in fields.get(b"expect", [])):
        return "Expect list"
    return None


def deliberate_difference(data: bytes, *, response: bool = False) -> str | None:
    """The name of the deliberate difference ``data`` shows, or None."""
    if _bare_lf(data):
        return "bare LF"
    if data.startswith(b"\r\n"):
        return None if response else "leading empty lines"
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].split(b"\r\n")
    start, field_lines = lines[0], lines[1:]
    version = None
    if response:
        version = start[:8]
        if re.fullmatch(rb"HTTP/\d\.\d", version) and version not in (b"HTTP/1.0", b"HTTP/1.1"):
            return "HTTP version other than 1.0 and 1.1"
        if LAX_CTL & set(start):
            return "control characters in field values"
    else:
        parts = start.split(b" ")
        if len(parts) == 3:
            _, target, version = parts
            if re.fullmatch(rb"HTTP/\d\.\d", version) and version not in (b"HTTP/1.0", b"HTTP/1.1"):
                return "HTTP version other than 1.0 and 1.1"
            if not _target_form_ok(parts[0], target):
                return "request-target form"
    return _field_differences(field_lines, version, response)


_HEX = rb"[0-9A-Fa-f]"
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QS = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_EXT = rb"(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QS + rb"))?)*"
FASTGW_SIZE_LINE = re.compile(_HEX + rb"{1,15}" + _EXT + rb"[ \t]*")
H11_SIZE_LINE = re.compile(_HEX + rb"{1,20}(?:;.*)?[ \t]*")


def chunked_difference(body: bytes) -> str | None:
    """Walk a chunked body the way both readers do and name a deliberate difference."""
    if _bare_lf(body):
        return "bare LF"
    pos = 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            return None
        line = body[pos:eol]
        ours, theirs = FASTGW_SIZE_LINE.fullmatch(line), H11_SIZE_LINE.fullmatch(line)
        if bool(ours) != bool(theirs):
            return "chunk-size line grammar"
        if not ours:
            return None
        size = int(re.match(_HEX + rb"+", line).group(0), 16)  # type: ignore[union-attr]
        pos = eol + 2
        if size == 0:
            break
        if body[pos + size : pos + size + 2] != b"\r\n":
            return None
        pos += size + 2
    end = body.find(b"\r\n\r\n", pos - 2)
    trailer_lines = (
        body[pos : end if end >= 0 else len(body)].split(b"\r\n") if end != pos - 2 else []
    )
    if any(line[:1] in (b" ", b"\t") for line in trailer_lines):
        return "obs-fold"
    if any(LAX_CTL & set(line) for line in trailer_lines):
        return "control characters in field values"
    names = {line.split(b":", 1)[0].strip().lower() for line in trailer_lines}
    if names & {b"content-length", b"transfer-encoding"}:
        return "framing fields in trailers"
    return None


# --------------------------------------------------------------------------------------
# Each difference, named, with one example: strict xfails asserting agreement.


def _agree(kind: str, data: bytes) -> None:
    if kind == "request":
        compare_requests(data)
    elif kind == "response":
        compare_responses(data, b"GET")
    else:
        compare_chunked(data)


R = b"GET / HTTP/1.1\r\nHost: a\r\n"
DIFFERENCES: list[tuple[str, str, bytes, str]] = [
    # (name, kind, example, why fastgw differs)
    (
        "bare LF",
        "request",
        b"GET / HTTP/1.1\nHost: a\n\n",
        "RFC 9112 2.2 lets a recipient accept bare LF; a gateway must not, since the next "
        "hop may read the message differently (smuggling).",
    ),
    ("bare LF", "response", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", "as for requests"),
    ("bare LF", "chunked", b"0\r\n\n", "as for heads: chunk framing is forwarded as received"),
    (
        "leading empty lines",
        "request",
        b"\r\n" + R + b"\r\n",
        "RFC 9112 2.2: a server SHOULD ignore at least one empty line before the request "
        "line; h11 rejects it.",
    ),
    (
        "obs-fold",
        "request",
        R + b"X: a\r\n b\r\n\r\n",
        "RFC 9112 5.2 allows rejecting obs-fold with 400; unfolding it in a proxy changes "
        "what the next hop sees.",
    ),
    (
        "obs-fold",
        "response",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
        "as for requests",
    ),
    ("obs-fold", "chunked", b"0\r\nX: a\r\n b\r\n\r\n", "trailers are field lines too"),
    (
        "control characters in field values",
        "request",
        R + b"X: a\x01b\r\n\r\n",
        "RFC 9110 5.5: CTLs are not field-vchar; h11 accepts all but NUL and whitespace.",
    ),
    (
        "control characters in field values",
        "response",
        b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n",
        "the reason phrase is HTAB / SP / VCHAR / obs-text (RFC 9112 4)",
    ),
    ("control characters in field values", "chunked", b"0\r\nX: \x7f\r\n\r\n", "trailer values"),
    (
        "Content-Length repeated or a list",
        "request",
        R + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\n",
        "RFC 9112 6.3 (5) permits folding equal values; fastgw refuses so that no hop can "
        "pick a different one.",
    ),
    (
        "Content-Length repeated or a list",
        "response",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 1\r\n\r\n",
        "as for requests",
    ),
    (
        "Content-Length of 19 or 20 digits",
        "request",
        R + b"Content-Length: 1000000000000000000\r\n\r\n",
        "fastgw keeps lengths in an int64 with room to spare: 18 digits at most.",
    ),
    (
        "Transfer-Encoding with Content-Length",
        "request",
        R + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        "RFC 9112 6.1: such a message is a smuggling attempt; a server MAY reject it, and "
        "fastgw does (h11 lets chunked win).",
    ),
    (
        "Transfer-Encoding with Content-Length",
        "response",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        "as for requests",
    ),
    (
        "Transfer-Encoding in HTTP/1.0",
        "request",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        "RFC 9112 6.1: framing of such a request is faulty; the server MUST close after it.",
    ),
    (
        "empty list elements in Transfer-Encoding",
        "request",
        R + b"Transfer-Encoding: chunked,\r\n\r\n",
        "RFC 9110 5.6.1: a recipient MUST accept empty list elements; h11 compares the "
        "whole value with 'chunked'.",
    ),
    (
        "HTTP version other than 1.0 and 1.1",
        "request",
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        "fastgw answers 505 (RFC 9110 15.6.6); h11 accepts any HTTP/x.y.",
    ),
    (
        "HTTP version other than 1.0 and 1.1",
        "response",
        b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n",
        "an upstream speaking another version is a 502",
    ),
    (
        "request-target form",
        "request",
        b"GET foo HTTP/1.1\r\nHost: a\r\n\r\n",
        "RFC 9112 3.2: origin-, absolute-, authority- (CONNECT) or asterisk-form (OPTIONS) "
        "only; h11 accepts any VCHAR string.",
    ),
    (
        "Host value syntax",
        "request",
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        "RFC 9112 3.2: a Host with an invalid value is a 400; h11 does not check it.",
    ),
    (
        "HTTP/1.0 keep-alive",
        "request",
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        "fastgw honours HTTP/1.0 keep-alive (RFC 9112 9.3); h11 closes every 1.0 connection.",
    ),
    (
        "HTTP/1.0 keep-alive",
        "response",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
        "as for requests",
    ),
    (
        "Expect list",
        "request",
        R + b"Expect: 100-continue, x\r\n\r\n",
        "fastgw honours only an Expect that is exactly 100-continue; h11 finds it in a list.",
    ),
    (
        "chunk-size line grammar",
        "chunked",
        b"5;\r\nhello\r\n0\r\n\r\n",
        "RFC 9112 7.1.1 chunk-ext is enforced (the body is forwarded as received); h11 "
        "accepts anything after ';' and no whitespace before it.",
    ),
    (
        "chunk-size line grammar",
        "chunked",
        b"5 ;a=b\r\nhello\r\n0\r\n\r\n",
        "BWS before ';' is valid",
    ),
    (
        "chunk-size line grammar",
        "chunked",
        b"0000000000000005\r\nhello\r\n0\r\n\r\n",
        "fastgw reads at most 15 hex digits (sizes stay under 2**60, zero-padding included).",
    ),
    (
        "framing fields in trailers",
        "chunked",
        b"0\r\nContent-Length: x\r\n\r\n",
        "trailers are forwarded, never used for framing; h11 validates them as headers.",
    ),
]


@pytest.mark.parametrize(
    ("name", "kind", "data"),
    [
        pytest.param(n, k, d, marks=pytest.mark.xfail(strict=True, reason=why), id=f"{k}: {n}")
        for n, k, d, why in DIFFERENCES
    ],
)
def test_deliberate_difference(name: str, kind: str, data: bytes) -> None:
    _agree(kind, data)


@pytest.mark.parametrize(
    ("name", "kind", "data"),
    [(n, k, d) for n, k, d, _ in DIFFERENCES],
    ids=[f"{k}: {n}" for n, k, _, _ in DIFFERENCES],
)
def test_difference_is_recognised(name: str, kind: str, data: bytes) -> None:
    # The generators skip exactly these shapes: each example must be recognised.
    if kind == "chunked":
        assert chunked_difference(data) == name
    else:
        assert deliberate_difference(data, response=kind == "response") == name


# --------------------------------------------------------------------------------------
# Generators


def _from(alphabet: bytes, min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=max_size).map(bytes)


VCHAR = bytes(range(0x21, 0x7F))
VALUE_OK = VCHAR + b" \t" + bytes([0x80, 0xA0, 0xE9, 0xFF])
NASTY = b'\x00\x01\x1f\x7f\r\n \t:,;\x0b\x0c@()"\\'
HOSTISH = b"abcxyz0189.-:[]_~"

KNOWN_NAMES = [
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Connection",
    b"Expect",
    b"Upgrade",
    b"X-Forwarded-For",
    b"Via",
    b"Cookie",
    b"Accept",
    b"TE",
    b"Keep-Alive",
]
SPECIAL_VALUES = {
    b"content-length": [
        b"0",
        b"5",
        b"10",
        b"007",
        b"123456",
        b"+5",
        b" 5x",
        b"1, 1",
        b"5 5",
        b"",
        b"-1",
        b"0x5",
    ],
    b"transfer-encoding": [
        b"chunked",
        b"Chunked",
        b"gzip",
        b"gzip, chunked",
        b"chunked, gzip",
        b"identity",
        b"",
    ],
    b"connection": [
        b"close",
        b"keep-alive",
        b"Keep-Alive",
        b"upgrade",
        b"x-foo",
        b"close, x-foo",
        b"",
    ],
    b"expect": [b"100-continue", b"100-Continue", b"foo", b""],
}


def names(valid_only: bool) -> st.SearchStrategy[bytes]:
    known = st.sampled_from(KNOWN_NAMES).flatmap(
        lambda n: st.sampled_from([n, n.lower(), n.upper()])
    )
    generic = _from(TCHAR, 1, 10)
    if valid_only:
        return st.one_of(known, generic)
    return st.one_of(known, generic, _from(TCHAR + NASTY + b"\xe9", 0, 8))


def values(name: bytes, valid_only: bool) -> st.SearchStrategy[bytes]:
    special = SPECIAL_VALUES.get(name.lower())
    if name.lower() == b"host":
        base = _from(HOSTISH, 0, 12)
    else:
        base = _from(VALUE_OK, 0, 12).map(lambda v: v.strip(b" \t"))
    options = [base]
    if special:
        options.append(st.sampled_from(special))
    if not valid_only:
        options.append(_from(VALUE_OK + NASTY, 0, 10))
    return st.one_of(*options)


@st.composite
def field_lines(draw: st.DrawFn, valid_only: bool) -> list[bytes]:
    out = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(names(valid_only))
        ows = st.sampled_from([b"", b" ", b"\t", b"  "])
        out.append(name + b":" + draw(ows) + draw(values(name, valid_only)) + draw(ows))
    return out


@st.composite
def request_bytes(draw: st.DrawFn, valid_only: bool = False) -> bytes:
    methods = st.sampled_from(
        [b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"X-Custom"]
    )
    if not valid_only:
        methods = st.one_of(methods, _from(TCHAR, 1, 8), _from(TCHAR + b"(@\x00\x7f", 1, 6))
    method = draw(methods)
    target = b"/" + draw(_from(VCHAR, 0, 16))
    if draw(st.integers(0, 9)) == 0:
        target = draw(st.sampled_from(ODD_TARGETS))
    if not valid_only:
        target = draw(
            st.one_of(
                st.just(target), _from(VCHAR + NASTY + b"\x80", 0, 10).map(lambda t: b"/" + t)
            )
        )
    versions = [b"HTTP/1.1"] * 6 + [b"HTTP/1.0"] * 2
    if not valid_only:
        versions += [b"HTTP/1.2", b"HTTP/1", b"http/1.1", b"HTTP/1.1 ", b"HTTP/11"]
    version = draw(st.sampled_from(versions))
    lines = draw(field_lines(valid_only))
    framing = draw(
        st.sampled_from([[], [], [b"Content-Length: 3"], [b"Transfer-Encoding: chunked"]])
    )
    if not valid_only:
        framing = draw(st.one_of(st.just(framing), st.sampled_from(ODD_FRAMING)))
    for line in framing:
        lines.insert(draw(st.integers(0, len(lines))), line)
    if draw(st.integers(0, 9)) < 8:
        lines.insert(draw(st.integers(0, len(lines))), b"Host: " + draw(_from(HOSTISH, 1, 12)))
    return b"\r\n".join([b"%s %s %s" % (method, target, version), *lines]) + b"\r\n\r\n"


@st.composite
def response_bytes(draw: st.DrawFn, valid_only: bool = False) -> bytes:
    status = draw(
        st.sampled_from([b"100", b"103", b"200", b"204", b"206", b"304", b"404", b"500", b"599"])
    )
    if not valid_only:
        status = draw(
            st.one_of(st.just(status), st.sampled_from([b"099", b"20", b"2000", b"abc", b"000"]))
        )
    reason = draw(_from(VALUE_OK if valid_only else VALUE_OK + NASTY, 0, 10))
    versions = (
        [b"HTTP/1.1"] * 6 + [b"HTTP/1.0"] * 2 + ([] if valid_only else [b"HTTP/1", b"HTTP/1.1 "])
    )
    version = draw(st.sampled_from(versions))
    sep = draw(st.sampled_from([b" ", b" ", b" ", b""] if not valid_only else [b" "]))
    lines = draw(field_lines(valid_only))
    return b"\r\n".join([version + b" " + status + sep + reason, *lines]) + b"\r\n\r\n"


ODD_TARGETS = [
    b"http://h.example/x?y",
    b"http://h.example",
    b"https://[::1]:8443/p",
    b"http://h.example?q",
    b"http://u@h.example/",
    b"http:///x",
    b"*",
    b"h.example:443",
]
ODD_FRAMING = [
    [b"Content-Length: 3", b"Transfer-Encoding: chunked"],
    [b"Content-Length: 3", b"Content-Length: 4"],
    [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
    [b"Transfer-Encoding: gzip, chunked"],
    [b"Content-Length: 3", b"Content-Length: 3"],
    [b"Content-Length: 99999999999999999999"],
]
INTERESTING = b"\r\n\x00 \t:,;a0/\x7f\x80\xff\x01"


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        byte = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 255)))
        if op == "insert":
            data.insert(pos, byte)
        elif data and op == "delete":
            del data[pos]
        elif data:
            data[pos] = byte
    return bytes(data)


@st.composite
def chunked_body_bytes(draw: st.DrawFn, valid_only: bool = False) -> bytes:
    out = b""
    exts = [b"", b";a", b";a=b", b';a="q\\"x"', b" ", b";x=1;y"]
    if not valid_only:
        exts += [b";", b";=", b" ;a", b"; a = b", b";a=b c", b";\x01", b"zz"]
    for data in draw(st.lists(st.binary(min_size=1, max_size=12), max_size=4)):
        size = draw(st.sampled_from([b"%x", b"%X", b"0%x"])) % len(data)
        if not valid_only and draw(st.integers(0, 9)) == 0:
            size = draw(st.sampled_from([b"", b"g", b"-1", b"0" * 16 + b"1", b"+1"]))
        out += size + draw(st.sampled_from(exts)) + b"\r\n" + data + b"\r\n"
    trailers = [b"X-A: 1", b"x-b:", b"T: \xe9 v"]
    if not valid_only:
        trailers += [b"X-A", b" x: y", b"X : y", b"X: \x00"]
    out += b"0\r\n" + b"".join(
        t + b"\r\n" for t in draw(st.lists(st.sampled_from(trailers), max_size=2))
    )
    return out + b"\r\n"


# --------------------------------------------------------------------------------------
# The properties


def _skip_if_different(name: str | None) -> bool:
    if name is not None:
        event(f"skipped: {name}")
        return True
    return False


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.one_of(request_bytes(), request_bytes(valid_only=True)))
def test_generated_requests_agree_with_h11(data: bytes) -> None:
    if _skip_if_different(deliberate_difference(data)):
        return
    event("accepted" if fastgw_request(data)[0] == "ok" else "rejected")
    compare_requests(data)


@settings(max_examples=EXAMPLES, deadline=None)
@given(mutated(request_bytes(valid_only=True)))
def test_mutated_requests_agree_with_h11(data: bytes) -> None:
    if _skip_if_different(deliberate_difference(data)):
        return
    event("accepted" if fastgw_request(data)[0] == "ok" else "rejected")
    compare_requests(data)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    st.one_of(response_bytes(), response_bytes(valid_only=True), mutated(response_bytes(True))),
    st.booleans(),
)
def test_responses_agree_with_h11(data: bytes, to_head: bool) -> None:
    if _skip_if_different(deliberate_difference(data, response=True)):
        return
    event("accepted" if fastgw_response(data, b"GET")[0] == "ok" else "rejected")
    compare_responses(data, b"HEAD" if to_head else b"GET")


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    st.one_of(
        chunked_body_bytes(), chunked_body_bytes(valid_only=True), mutated(chunked_body_bytes(True))
    )
)
def test_chunked_bodies_agree_with_h11(body: bytes) -> None:
    if _skip_if_different(chunked_difference(body)):
        return
    event("accepted" if fastgw_chunked(body)[0] == "ok" else "rejected")
    compare_chunked(body)


# --------------------------------------------------------------------------------------
# Hand-picked agreements worth keeping even if the generators change


@pytest.mark.parametrize(
    "data",
    [
        R + b"\r\n",
        R + b"Content-Length: 0\r\n\r\n",
        R + b"Transfer-Encoding: chunked\r\n\r\n",
        R + b"Connection: close\r\n\r\n",
        R + b"Expect: 100-continue\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET http://h.example/x HTTP/1.1\r\nHost: a\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        R + b"Content-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n",
        R + b"X:\r\nY:  \t \r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        R + b"Transfer-Encoding: gzip\r\n\r\n",
        R + b"Content-Length: x\r\n\r\n",
        R + b"X : y\r\n\r\n",
        b"GET /\r\n\r\n",
        b"",
        b"GET / HTTP/1.1\r\nHost: a\r\n",
    ],
)
def test_known_requests_agree_with_h11(data: bytes) -> None:
    assert deliberate_difference(data) is None
    compare_requests(data)
