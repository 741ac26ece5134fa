"""ChunkedReader (RFC 9112 7.1): every body is scanned and decoded whole, byte by byte
and in random splits; scan and decode must stop at the same place, and decode must give
back the original data."""

from __future__ import annotations

import pytest
from httpsupport import chunked_three_ways
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgw._core.http import ChunkedReader
from fastgw.errors import BadRequest, BadResponse


def chunk(data: bytes, ext: bytes = b"") -> bytes:
    return b"%x%s\r\n%s\r\n" % (len(data), ext, data)


LAST = b"0\r\n\r\n"

# (id, body, decoded data)
VALID: list[tuple[str, bytes, bytes]] = [
    ("empty-body", LAST, b""),
    ("one-chunk", chunk(b"hello") + LAST, b"hello"),
    (
        "several-chunks",
        chunk(b"ab") + chunk(b"c" * 300) + chunk(b"\r\n") + LAST,
        b"abc" + b"c" * 299 + b"\r\n",
    ),
    ("binary-data", chunk(bytes(range(256))) + LAST, bytes(range(256))),
    ("upper-hex", b"A\r\n0123456789\r\n" + LAST, b"0123456789"),
    ("leading-zeros", b"000000000000005\r\nhello\r\n" + LAST, b"hello"),
    ("last-chunk-zeros", chunk(b"x") + b"000\r\n\r\n", b"x"),
    ("ext-name", chunk(b"hello", b";name") + LAST, b"hello"),
    ("ext-token-value", chunk(b"hello", b";a=b;c=d") + LAST, b"hello"),
    ("ext-quoted-value", chunk(b"hello", b';a="x;y=\\"z\\" \t"') + LAST, b"hello"),
    ("ext-bws", chunk(b"hello", b" ; a = b ;\tc") + LAST, b"hello"),
    ("ext-on-last-chunk", chunk(b"x") + b"0;end=1\r\n\r\n", b"x"),
    ("whitespace-before-crlf", b"5 \t\r\nhello\r\n" + LAST, b"hello"),
    ("ext-then-whitespace", b"5;a=b  \r\nhello\r\n" + LAST, b"hello"),
    ("trailers", chunk(b"x") + b"0\r\nX-Sum: abc\r\nX-Empty:\r\nx-obs: \xe9 \t\r\n\r\n", b"x"),
]


@pytest.mark.parametrize(("body", "data"), [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_chunked(body: bytes, data: bytes) -> None:
    outcome, got = chunked_three_ways(body, seed=len(body))
    assert outcome == ("ok", len(body))
    assert got == data
    # Whatever follows the body (the next pipelined request) is left alone.
    r = ChunkedReader()
    pos, out = r.decode(body + b"GET / HTTP/1.1\r\n")
    assert r.done and pos == len(body) and b"".join(out) == data
    assert r.body_bytes == len(data)
    # A finished reader consumes nothing more.
    assert r.scan(b"more", 0) == 0


# (id, body)
INVALID: list[tuple[str, bytes]] = [
    ("bare-lf-after-size", b"5\nhello\r\n" + LAST),
    ("bare-lf-after-data", b"5\r\nhello\n" + LAST),
    ("bare-lf-last-chunk", b"0\n\r\n"),
    ("bare-lf-final", b"0\r\n\n"),
    ("bare-lf-after-trailer", b"0\r\nX: y\n\r\n"),
    ("bare-cr-after-size", b"5\rhello\r\n" + LAST),
    ("data-longer-than-size", b"5\r\nhelloX\r\n" + LAST),
    ("data-shorter-than-size", b"5\r\nhell\r\n" + LAST),
    ("empty-size", b"\r\nhello\r\n" + LAST),
    ("not-hex", b"g\r\n" + LAST),
    ("hex-prefix", b"0x5\r\nhello\r\n" + LAST),
    ("plus-sign", b"+5\r\nhello\r\n" + LAST),
    ("minus-sign", b"-5\r\nhello\r\n" + LAST),
    ("leading-space", b" 5\r\nhello\r\n" + LAST),
    ("size-16-digits", b"0000000000000005\r\nhello\r\n" + LAST),
    ("size-overflow", b"ffffffffffffffffff\r\n"),
    ("ext-without-semicolon", b"5 abc\r\nhello\r\n" + LAST),
    ("ext-empty", b"5;\r\nhello\r\n" + LAST),
    ("ext-empty-name", b"5;=x\r\nhello\r\n" + LAST),
    ("ext-empty-value", b"5;a=\r\nhello\r\n" + LAST),
    ("ext-double-semicolon", b"5;a;;b\r\nhello\r\n" + LAST),
    ("ext-two-values", b"5;a=b=c\r\nhello\r\n" + LAST),
    ("ext-space-inside-value", b"5;a=b c\r\nhello\r\n" + LAST),
    ("ext-nul", b"5;a\x00\r\nhello\r\n" + LAST),
    ("ext-ctl", b"5;a=\x01\r\nhello\r\n" + LAST),
    ("ext-quoted-unterminated", b'5;a="b\r\nhello\r\n' + LAST),
    ("ext-quoted-ctl", b'5;a="\x01"\r\nhello\r\n' + LAST),
    ("ext-quoted-pair-ctl", b'5;a="\\\x01"\r\nhello\r\n' + LAST),
    ("ext-quote-in-token", b'5;a=b"c"\r\nhello\r\n' + LAST),
    ("ext-line-too-long", b"5;a=" + b"b" * 5000 + b"\r\nhello\r\n" + LAST),
    ("trailer-obs-fold", b"0\r\nX: a\r\n b\r\n\r\n"),
    ("trailer-no-colon", b"0\r\nX-Foo\r\n\r\n"),
    ("trailer-space-before-colon", b"0\r\nX-Foo : a\r\n\r\n"),
    ("trailer-empty-name", b"0\r\n: a\r\n\r\n"),
    ("trailer-nul", b"0\r\nX: \x00\r\n\r\n"),
    ("trailer-bare-cr", b"0\r\nX: a\rb\r\n\r\n"),
    ("trailer-too-large", b"0\r\nX: " + b"a" * 33000 + b"\r\n\r\n"),
    ("final-crlf-broken", b"0\r\n\rX"),
]


@pytest.mark.parametrize("body", [c[1] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_chunked(body: bytes) -> None:
    outcome, _ = chunked_three_ways(body, seed=len(body))
    assert outcome == ("err", "BadRequest", 400)
    outcome, _ = chunked_three_ways(body, seed=len(body), response=True)
    assert outcome == ("err", "BadResponse", 502)


def test_limits_are_configurable() -> None:
    line = b"5;a=" + b"b" * 20 + b"\r\nhello\r\n" + LAST
    assert chunked_three_ways(line, max_line=40)[0][0] == "ok"
    assert chunked_three_ways(line, max_line=10)[0] == ("err", "BadRequest", 400)
    trailer = b"0\r\nX: " + b"a" * 20 + b"\r\n\r\n"
    assert chunked_three_ways(trailer, max_trailer_bytes=30)[0][0] == "ok"
    assert chunked_three_ways(trailer, max_trailer_bytes=10)[0] == ("err", "BadRequest", 400)
    r = ChunkedReader(max_line=7, max_trailer_bytes=9)
    assert (r.max_line, r.max_trailer_bytes) == (7, 9)


def test_largest_size_is_accepted_and_counted() -> None:
    r = ChunkedReader()
    pos = r.scan(b"fffffffffffffff\r\nabc")
    assert pos == 20 and not r.done and r.body_bytes == 3


def test_a_failed_reader_stays_failed() -> None:
    r = ChunkedReader()
    with pytest.raises(BadRequest):
        r.scan(b"5\r\nhelloXX")
    with pytest.raises(BadRequest):
        r.scan(b"\r\n0\r\n\r\n")
    r = ChunkedReader(response=True)
    with pytest.raises(BadResponse):
        r.decode(b"zz")
    with pytest.raises(BadResponse):
        r.decode(LAST)


def test_start_and_end() -> None:
    buf = b"junk" + chunk(b"hello") + LAST + b"next"
    r = ChunkedReader()
    end = len(buf) - 4
    pos = r.scan(buf, 4, 10)
    assert pos == 10 and not r.done
    pos, out = r.decode(buf, 10)
    assert pos == end and r.done and out == [b"lo"]
    with pytest.raises(ValueError):
        ChunkedReader().scan(buf, 5, 4)
    with pytest.raises(ValueError):
        ChunkedReader().scan(buf, -1)
    # end beyond the buffer means "to the end".
    assert ChunkedReader().scan(buf, 4, 10**9) == end


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    pieces = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=6))
    exts = st.sampled_from([b"", b";a", b";a=b", b' ; q="x\\"y"', b" "])
    body = b"".join(
        b"%s%s\r\n%s\r\n" % (draw(st.sampled_from([b"%x", b"%X", b"00%x"])) % len(p), draw(exts), p)
        for p in pieces
    )
    trailers = draw(st.lists(st.sampled_from([b"X-A: 1", b"x-b:", b"T: \xe9 v"]), max_size=2))
    body += b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"
    return body, b"".join(pieces)


@settings(max_examples=150, deadline=None)
@given(chunked_bodies(), st.integers(0, 2**32))
def test_generated_bodies_decode_to_their_data(case: tuple[bytes, bytes], seed: int) -> None:
    body, data = case
    outcome, got = chunked_three_ways(body, seed=seed)
    assert outcome == ("ok", len(body))
    assert got == data
