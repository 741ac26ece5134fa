"""Fuzz harness for the compiled HTTP/1.1 core (atheris / libFuzzer).

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/fuzz_http.py -atheris_runs=100000 [corpus_dir ...]

Strategy. The first byte of each input picks what to fuzz (request head with default or
tiny limits, response head, chunked body) and where to split the rest into two reads; the
rest is the wire bytes. Each input is run whole, in two reads and (when short) byte by
byte, the way a connection feeds the parser, and the runs must agree. An accepted head is
checked against an independent re-reading of its bytes and must survive the serializer:
parse(build(head)) keeps its method or status and framing. Only fastgw's ProtocolError
subclasses may escape the core; anything else (or a crash) is a finding. Without a corpus
directory the run starts from ``SEEDS``; ``http.dict`` (next to this file) gives libFuzzer
the protocol's tokens.

Named fuzz_*.py so pytest does not collect it; tests/fuzz/test_fuzz_seeds.py runs
``TestOneInput`` over the seeds so the harness cannot rot.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from typing import Any

# The first byte: low two bits pick the mode (0/1 request, 2 response, 3 chunked).
SEEDS: list[bytes] = [
    b"\x00GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\x40POST /up?x=1 HTTP/1.1\r\nHost: a.example:8080\r\nContent-Length: 5\r\n"
    b"Connection: x, close\r\nX-A: 1\r\n\r\nhello",
    b"\x80PUT http://h.example/p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
    b"Expect: 100-continue\r\n\r\n",
    b"\x01\r\nOPTIONS * HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"\x05GET /aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\x02HTTP/1.1 200 OK\r\nContent-Length: 2\r\nVia: 1.0 x\r\n\r\nok",
    b"\x06HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    b"\x0aHTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"\x12HTTP/1.1 101 Switching\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"\x03a;ext=1\r\n0123456789\r\n5\r\nhello\r\n0\r\nX-T: v\r\n\r\n",
    b'\x17 5 ; a = "q\\"x"\r\nhello\r\n0\r\n\r\n',
    b"\x00GET / HTTP/1.1\nHost: a\n\n",
    b"\x00GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
]


def _fuzz_argv() -> list[str]:
    argv = list(sys.argv)
    here = os.path.dirname(os.path.abspath(__file__))
    if not any(a.startswith("-dict=") for a in argv):
        argv.append("-dict=" + os.path.join(here, "http.dict"))
    if not any(not a.startswith("-") for a in argv[1:]):
        corpus = tempfile.mkdtemp(prefix="fastgw-fuzz-http-")
        for i, seed in enumerate(SEEDS):
            with open(os.path.join(corpus, f"seed{i:02d}"), "wb") as f:
                f.write(seed)
        argv.append(corpus)
    return argv


if __name__ == "__main__":
    import atheris  # only the fuzz extra installs it

    def _first_input(data: bytes) -> None:
        # The core is imported only now, after atheris.Fuzz has loaded libFuzzer with
        # its symbols global: a core built with gcc's -fsanitize-coverage=trace-cmp
        # (tests/fuzz/README.md) links to libFuzzer's hooks and feeds it comparisons from
        # the compiled code. This file is imported again as a module for the real work,
        # its own branches instrumented (the only coverage a plain build gives).
        with atheris.instrument_imports(include=["fuzz_http"]):
            import fuzz_http

        fuzz_http.TestOneInput(data)

    sys.setdlopenflags(sys.getdlopenflags() | os.RTLD_GLOBAL)
    atheris.Setup(_fuzz_argv(), _first_input)
    atheris.Fuzz()  # never returns: libFuzzer ends the process

from fastgw._core.http import (  # noqa: E402
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    ChunkedReader,
    RequestHead,
    ResponseHead,
    build_request_head,
    build_response_head,
    parse_request_head,
    parse_response_head,
)
from fastgw.errors import ProtocolError  # noqa: E402

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
VCHARS = re.compile(rb"[\x21-\x7e]+")
FIELD_VALUE = re.compile(
    rb"(?:[\x21-\x7e\x80-\xff](?:[ \t\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
)
REASON = re.compile(rb"[ \t\x21-\x7e\x80-\xff]*")

# (max_head_bytes, max_fields, max_target) per request mode: defaults, and tiny limits so
# that short inputs reach every limit check.
REQUEST_LIMITS = [
    dict(max_head_bytes=32768, max_fields=100, max_target=8192),
    dict(max_head_bytes=256, max_fields=4, max_target=32),
]
BYTEWISE_MAX = 256  # byte-by-byte runs cost a call per byte: only for short inputs


def _outcome(parse: Any, pieces: list[bytes], kw: dict[str, Any]) -> tuple[Any, ...]:
    buf = bytearray()
    for piece in pieces:
        before = len(buf)
        buf += piece
        try:
            h = parse(buf, scan_from=max(0, before - 3), **kw)
        except ProtocolError as exc:
            assert 400 <= exc.status <= 599 and exc.close, exc
            return ("err", type(exc), exc.status)
        if h is not None:
            return ("ok", h)
    return ("incomplete",)


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "ok":
        x, y = a[1], b[1]
        return bool(x.raw == y.raw and x.head_len == y.head_len and x.headers == y.headers)
    return a == b


def _check_splits(parse: Any, payload: bytes, cut: int, kw: dict[str, Any]) -> tuple[Any, ...]:
    whole = _outcome(parse, [payload], kw)
    two = _outcome(parse, [payload[:cut], payload[cut:]], kw)
    assert _same(whole, two), (whole, two, cut)
    if len(payload) <= BYTEWISE_MAX:
        one = _outcome(parse, [payload[i : i + 1] for i in range(len(payload))], kw)
        assert _same(whole, one), (whole, one)
    # The same head further into a buffer: ``start`` shifts nothing but the offsets.
    shifted = _outcome(lambda b, **k: parse(b, 5, **k), [b"junk!" + payload], kw)
    assert _same(whole, shifted), (whole, shifted)
    return whole


def _tokens(values: list[bytes]) -> list[bytes]:
    return [t.strip(b" \t").lower() for v in values for t in v.split(b",") if t.strip(b" \t")]


def _check_fields(h: RequestHead | ResponseHead, max_fields: int) -> list[bytes]:
    """Re-read the field lines of ``h.raw`` independently; returns the start line."""
    raw = h.raw
    assert raw.endswith(b"\r\n\r\n")
    lines = raw[:-4].split(b"\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    field_lines = lines[1:]
    assert len(field_lines) == len(h) == len(h.headers) <= max_fields
    for line, (name, value) in zip(field_lines, h.headers, strict=True):
        n, _, v = line.partition(b":")
        assert n == name and TOKEN.fullmatch(name), line
        assert v.strip(b" \t") == value and FIELD_VALUE.fullmatch(value), line
        assert h.get(name.upper()) is not None and name.lower() in h
    for name in {n.lower() for n, _ in h.headers}:
        assert h.get_all(name) == [v for n, v in h.headers if n.lower() == name]
    return lines


def _check_framing(h: RequestHead | ResponseHead) -> None:
    cl = h.get_all(b"content-length")
    te = h.get_all(b"transfer-encoding")
    assert h.body_kind in (BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_UNTIL_CLOSE)
    if h.body_kind == BODY_LENGTH:
        assert len(cl) == 1 and not te and cl[0].isdigit() and int(cl[0]) == h.content_length
    elif h.body_kind == BODY_CHUNKED:
        assert not cl and _tokens(te) == [b"chunked"]
    else:
        assert h.content_length == 0
    if te:
        assert not cl and _tokens(te) == [b"chunked"]
    conn = _tokens(h.get_all(b"connection"))
    if b"close" in conn:
        assert not h.keep_alive
    if h.upgrade:
        assert b"upgrade" in conn and b"upgrade" in h


def _check_request(h: RequestHead, payload: bytes, kw: dict[str, Any]) -> None:
    assert 0 < h.head_len <= len(payload)
    assert payload[h.head_len - len(h.raw) : h.head_len] == h.raw
    lead = payload[: h.head_len - len(h.raw)]
    assert lead == b"\r\n" * (len(lead) // 2), lead
    assert len(h.raw) <= kw["max_head_bytes"]
    start = _check_fields(h, kw["max_fields"])[0]
    assert start == b"%s %s HTTP/%s" % (h.method, h.target, h.http_version)
    assert h.version in (10, 11) and h.http_version == (b"1.1" if h.version == 11 else b"1.0")
    assert TOKEN.fullmatch(h.method) and VCHARS.fullmatch(h.target)
    assert len(h.target) <= kw["max_target"]
    assert h.body_kind != BODY_UNTIL_CLOSE
    _check_framing(h)
    hosts = h.get_all(b"host")
    assert len(hosts) == 1 if h.version == 11 else len(hosts) <= 1
    if h.absolute_form:
        assert h.host is not None and h.host in h.target and h.path[:1] == b"/"
    elif h.method == b"OPTIONS" and h.target == b"*":
        assert h.path == b"*"
    elif h.method != b"CONNECT":
        assert h.path == h.target and h.target[:1] == b"/"
    if not h.absolute_form:
        assert h.host == (hosts[0] if hosts else None)
    conn = _tokens(h.get_all(b"connection"))
    assert h.keep_alive == (b"close" not in conn and (h.version == 11 or b"keep-alive" in conn))
    if h.expect_continue:
        assert h.version == 11 and b"100-continue" in [v.lower() for v in h.get_all(b"expect")]
    # The serializer's output must be a head the parser takes back with the same meaning.
    out = build_request_head(h, host=b"up.internal", client_ip=b"192.0.2.1", via=b"1.1 fz")
    up = parse_request_head(out, max_fields=256, max_head_bytes=1 << 20, max_target=1 << 20)
    assert up is not None and up.head_len == len(out)
    assert (up.method, up.target, up.keep_alive) == (h.method, h.path, True)
    assert (up.body_kind, up.content_length) == (h.body_kind, h.content_length)


def _check_response(h: ResponseHead, payload: bytes, max_fields: int, was_head: bool) -> None:
    assert 0 < h.head_len <= len(payload) and payload[: h.head_len] == h.raw
    start = _check_fields(h, max_fields)[0]
    assert 100 <= h.status <= 999 and REASON.fullmatch(h.reason)
    assert start in (
        b"HTTP/%s %d %s" % (h.http_version, h.status, h.reason),
        b"HTTP/%s %d" % (h.http_version, h.status),
    )
    _check_framing(h)
    if was_head or h.status < 200 or h.status in (204, 304):
        assert h.body_kind == BODY_NONE
    if h.body_kind == BODY_UNTIL_CLOSE:
        assert not h.keep_alive
    out = build_response_head(h, via=b"1.1 fz")
    down = parse_response_head(
        out, request_was_head=was_head, max_fields=256, max_head_bytes=1 << 20
    )
    assert down is not None and down.head_len == len(out)
    assert (down.status, down.reason) == (h.status, h.reason)
    assert (down.body_kind, down.content_length) == (h.body_kind, h.content_length)


def _chunked(pieces: list[bytes], decode: bool, kw: dict[str, Any]) -> tuple[Any, ...]:
    r = ChunkedReader(**kw)
    consumed, data = 0, bytearray()
    for piece in pieces:
        try:
            if decode:
                pos, out = r.decode(piece)
                for b in out:
                    data += b
            else:
                pos = r.scan(piece)
        except ProtocolError as exc:
            assert exc.status in (400, 502) and exc.close
            return ("err", exc.status)
        assert 0 <= pos <= len(piece) and (pos == len(piece) or r.done)
        consumed += pos
        if r.done:
            if decode:
                assert r.body_bytes == len(data)
            return ("ok", consumed, bytes(data) if decode else None)
    return ("incomplete",)


def _check_chunked(payload: bytes, cut: int, small: bool, response: bool) -> None:
    kw: dict[str, Any] = dict(response=response)
    if small:
        kw.update(max_line=16, max_trailer_bytes=32)
    whole = _chunked([payload], True, kw)
    splits = [[payload[:cut], payload[cut:]]]
    if len(payload) <= BYTEWISE_MAX:
        splits.append([payload[i : i + 1] for i in range(len(payload))])
    for pieces in [[payload], *splits]:
        scanned = _chunked(pieces, False, kw)
        decoded = _chunked(pieces, True, kw)
        assert decoded == whole, (decoded, whole)
        assert scanned[:2] == whole[:2], (scanned, whole)
    if whole[0] == "ok":
        assert whole[1] <= len(payload) and payload[whole[1] - 2 : whole[1]] == b"\r\n"


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, payload = data[0], data[1:]
    kind = mode & 3
    cut = ((mode >> 2) * len(payload)) // 63 if payload else 0
    if kind < 2:
        kw = REQUEST_LIMITS[kind]
        got = _check_splits(parse_request_head, payload, cut, kw)
        if got[0] == "ok":
            _check_request(got[1], payload, kw)
    elif kind == 2:
        was_head = bool(mode & 4)
        max_fields = 4 if mode & 8 else 100
        kw = dict(request_was_head=was_head, max_fields=max_fields)
        got = _check_splits(parse_response_head, payload, cut, kw)
        if got[0] == "ok":
            _check_response(got[1], payload, max_fields, was_head)
    else:
        _check_chunked(payload, cut, small=bool(mode & 4), response=bool(mode & 8))
