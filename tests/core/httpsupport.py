"""Helpers shared by the HTTP core tests: run a parser over one input whole, byte by byte
and in random splits, and reduce each run to a comparable outcome.

An outcome is ``("ok", summary)``, ``("err", error class name, status)`` or
``("incomplete",)`` when the input ended before the head (or body) did. The split
runners follow the core's documented contract: bytes are appended to one buffer, and each
call passes ``scan_from`` = the buffer length before the append, minus 3, so the parser
rescans only the new bytes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

from fastgw._core.http import ChunkedReader, RequestHead, ResponseHead
from fastgw.errors import ProtocolError

Outcome = tuple[Any, ...]
Parser = Callable[..., RequestHead | ResponseHead | None]


def request_summary(h: RequestHead) -> tuple[Any, ...]:
    return (
        h.method,
        h.target,
        h.http_version,
        tuple(h.headers),
        h.keep_alive,
        h.body_kind,
        h.content_length,
        h.head_len,
        h.expect_continue,
        h.absolute_form,
        h.host,
        h.path,
        h.upgrade,
        h.raw,
    )


def response_summary(h: ResponseHead) -> tuple[Any, ...]:
    return (
        h.status,
        h.reason,
        h.http_version,
        tuple(h.headers),
        h.keep_alive,
        h.body_kind,
        h.content_length,
        h.head_len,
        h.upgrade,
        h.raw,
    )


def summary(h: RequestHead | ResponseHead) -> tuple[Any, ...]:
    if isinstance(h, RequestHead):
        return request_summary(h)
    return response_summary(h)


def err(exc: ProtocolError) -> Outcome:
    return ("err", type(exc).__name__, exc.status)


def parse_whole(parse: Parser, data: bytes, **kw: Any) -> Outcome:
    try:
        h = parse(data, **kw)
    except ProtocolError as exc:
        return err(exc)
    return ("incomplete",) if h is None else ("ok", summary(h))


def parse_pieces(parse: Parser, pieces: Iterable[bytes], **kw: Any) -> Outcome:
    """Feed ``pieces`` one after another into a growing buffer, as a connection would."""
    buf = bytearray()
    for piece in pieces:
        before = len(buf)
        buf += piece
        try:
            h = parse(buf, scan_from=max(0, before - 3), **kw)
        except ProtocolError as exc:
            return err(exc)
        if h is not None:
            return ("ok", summary(h))
    return ("incomplete",)


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def random_pieces(data: bytes, rng: random.Random) -> list[bytes]:
    """Cut ``data`` at a random number of random places (seeded by the caller)."""
    if not data:
        return []
    cuts = sorted(rng.sample(range(1, len(data) + 1), k=min(len(data), rng.randint(1, 8))))
    if cuts[-1] != len(data):
        cuts.append(len(data))
    out, prev = [], 0
    for c in cuts:
        out.append(data[prev:c])
        prev = c
    return out


def parse_three_ways(parse: Parser, data: bytes, seed: int = 0, **kw: Any) -> Outcome:
    """Parse whole, byte by byte and in a few random splits; all must agree."""
    whole = parse_whole(parse, data, **kw)
    assert parse_pieces(parse, bytewise(data), **kw) == whole, "byte by byte differs"
    rng = random.Random(seed)
    for _ in range(3):
        pieces = random_pieces(data, rng)
        assert parse_pieces(parse, pieces, **kw) == whole, f"split {pieces!r} differs"
    return whole


def chunked_pieces(
    pieces: Iterable[bytes], *, decode: bool, **kw: Any
) -> tuple[Outcome, int, bytes]:
    """Run one ChunkedReader over ``pieces`` (each handed over as its own buffer, the
    way a connection hands over each read). Returns (outcome, bytes consumed, data):
    the outcome is ("ok", body length) at the end of the body, else "incomplete" or the
    error. Consumed counts only up to the end of the body."""
    r = ChunkedReader(**kw)
    consumed = 0
    data = bytearray()
    for piece in pieces:
        try:
            if decode:
                pos, out = r.decode(piece)
                for b in out:
                    data += b
            else:
                pos = r.scan(piece)
        except ProtocolError as exc:
            return err(exc), consumed, bytes(data)
        assert 0 <= pos <= len(piece)
        assert pos == len(piece) or r.done, "stopped early without finishing the body"
        consumed += pos
        if r.done:
            if decode:
                assert r.body_bytes == len(data)
            return ("ok", consumed), consumed, bytes(data)
    return ("incomplete",), consumed, bytes(data)


def chunked_three_ways(body: bytes, seed: int = 0, **kw: Any) -> tuple[Outcome, bytes]:
    """Decode and scan ``body`` whole, byte by byte and in random splits: every run
    must end the same way, consume the same bytes and (decode) give the same data."""
    whole = chunked_pieces([body], decode=True, **kw)
    rng = random.Random(seed)
    runs = [bytewise(body)] + [random_pieces(body, rng) for _ in range(3)] + [[body]]
    for pieces in runs:
        got = chunked_pieces(pieces, decode=True, **kw)
        scanned = chunked_pieces(pieces, decode=False, **kw)
        if whole[0][0] == "err":
            # How far a reader got before the bad byte depends on the split; only the
            # verdict must not.
            assert got[0] == scanned[0] == whole[0], f"over {pieces!r}: {got!r}, {scanned!r}"
        else:
            assert got == whole, f"decode over {pieces!r}: {got!r} != {whole!r}"
            assert scanned[:2] == whole[:2], f"scan over {pieces!r}: {scanned!r} != {whole!r}"
    return whole[0], whole[2]


def make_request(
    method: bytes = b"GET",
    target: bytes = b"/",
    version: bytes = b"HTTP/1.1",
    headers: Iterable[tuple[bytes, bytes]] = ((b"Host", b"example.com"),),
) -> bytes:
    lines = [b"%s %s %s" % (method, target, version)]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"
