"""The word-at-a-time scans of field values and request targets (http.pyx,
``_scan_value`` and ``_scan_target``) against a plain-Python model of RFC 9110 5.5 and
RFC 9112 3.2.

The scans test 8 bytes per step and fall back to the byte table for a word that holds
anything else than plain visible bytes, so a bug would show at one position of a word,
at one alignment of the word against the value, or near the end of the head where
fewer than 8 bytes are left. Every byte value is placed at every position of three
words, at every alignment of the value's start, and in the last field of the head.
"""

from __future__ import annotations

import random

import pytest
from httpsupport import parse_three_ways

from fastgw._core.http import parse_request_head
from fastgw.errors import BadRequest

# field-value bytes (RFC 9110 5.5): field-vchar (VCHAR, obs-text), SP and HTAB.
VALUE_BYTES = frozenset([0x09, 0x20, *range(0x21, 0x7F), *range(0x80, 0x100)])
# request-target bytes: visible ASCII only (RFC 3986 characters, checked as VCHAR).
TARGET_BYTES = frozenset(range(0x21, 0x7F))
FILLER = bytes(range(0x41, 0x41 + 26))  # "A".."Z": plain bytes around the one under test
WORDS = 3 * 8  # positions covered: three words


def value_model(value: bytes) -> tuple[str, object]:
    """What parsing ``X-V: <value>`` must give: the trimmed value or the error message."""
    if 0x0A in value:
        return ("err", "bare LF line ending")  # pass one, before any field is read
    if any(b not in VALUE_BYTES for b in value):
        return ("err", "invalid character in field value")
    return ("ok", value.strip(b" \t"))


def parse_value(name: bytes, value: bytes, last: bool) -> tuple[str, object]:
    field = name + b": " + value + b"\r\n"
    host = b"Host: example.com\r\n"
    data = b"GET / HTTP/1.1\r\n" + (host + field if last else field + host) + b"\r\n"
    try:
        head = parse_request_head(data)
    except BadRequest as exc:
        return ("err", str(exc))
    assert head is not None
    return ("ok", head.get(name))


@pytest.mark.parametrize("last", [False, True], ids=["followed-by-field", "last-field"])
@pytest.mark.parametrize("align", range(8))
def test_every_byte_at_every_position_of_a_value(align: int, last: bool) -> None:
    # The value starts at len("GET / HTTP/1.1\r\n") + len(name) + 2 (with Host last):
    # ``align`` extra name bytes shift it through every offset within a word.
    name = b"X-V" + b"v" * align
    for length in (1, 7, 8, 9, 15, 16, 17, WORDS):
        for pos in range(length):
            for b in range(256):
                value = FILLER[:pos] + bytes([b]) + FILLER[pos + 1 : length]
                got = parse_value(name, value, last)
                assert got == value_model(value), (align, last, value)


def test_tabs_and_obs_text_do_not_end_a_value() -> None:
    # HTAB sends a word to the byte loop; the word scan must resume after it.
    rng = random.Random(5)
    alphabet = b"\t \x80\xffaZ~!" + bytes(range(0x21, 0x7F))
    for _ in range(2000):
        n = rng.randint(0, 80)
        value = bytes(rng.choice(alphabet) for _ in range(n))
        for last in (False, True):
            assert parse_value(b"X-V", value, last) == value_model(value), value


def test_random_values_with_rare_invalid_bytes() -> None:
    rng = random.Random(9)
    for _ in range(5000):
        n = rng.randint(1, 64)
        value = bytearray(rng.choice(FILLER) for _ in range(n))
        for _ in range(rng.randint(0, 2)):
            value[rng.randrange(n)] = rng.randrange(256)
        value_b = bytes(value)
        if b"\r\n" in value_b:
            continue  # a line break, not a byte of the value: the other tests' business
        assert parse_value(b"X-V", value_b, rng.random() < 0.5) == value_model(value_b)


def target_model(target: bytes) -> tuple[str, object]:
    if 0x0A in target:
        return ("err", "bare LF line ending")
    if 0x20 in target:
        return ("err", None)  # a second SP: the version is malformed (message not pinned)
    if any(b not in TARGET_BYTES for b in target):
        return ("err", "invalid character in request target")
    return ("ok", target)


def parse_target(method: bytes, target: bytes) -> tuple[str, object]:
    data = method + b" " + target + b" HTTP/1.1\r\nHost: example.com\r\n\r\n"
    try:
        head = parse_request_head(data)
    except BadRequest as exc:
        return ("err", str(exc))
    assert head is not None
    return ("ok", head.target)


@pytest.mark.parametrize("align", range(8))
def test_every_byte_at_every_position_of_a_target(align: int) -> None:
    method = b"M" * (align + 1)  # the target starts at len(method) + 1
    for length in (2, 8, 9, 16, 17, WORDS):
        for pos in range(1, length):  # position 0 is the origin-form "/"
            for b in range(256):
                target = b"/" + FILLER[: pos - 1] + bytes([b]) + FILLER[pos : length - 1]
                want = target_model(target)
                got = parse_target(method, target)
                if want == ("err", None):
                    assert got[0] == "err", target
                else:
                    assert got == want, (align, target)


@pytest.mark.parametrize("b", [0x00, 0x01, 0x09, 0x0B, 0x0D, 0x1F, 0x7F, 0x80, 0xFF])
@pytest.mark.parametrize("pos", [0, 3, 7, 8, 12, 23])
def test_word_scan_splits_agree(b: int, pos: int) -> None:
    """The same verdict whole, byte by byte and in random splits (pass two only runs on
    a whole head, but the scan must not depend on what follows the head either)."""
    value = FILLER[:pos] + bytes([b]) + FILLER[pos + 1 : WORDS]
    data = b"GET /" + FILLER + b" HTTP/1.1\r\nHost: a\r\nX-V: " + value + b"\r\n\r\n"
    whole = parse_three_ways(parse_request_head, data, seed=b * 31 + pos)
    assert (whole[0] == "ok") == (b in VALUE_BYTES)
    if whole[0] == "err":
        assert whole[1:] == ("BadRequest", 400)
    # Pipelined bytes after the head must not change the verdict.
    assert parse_three_ways(parse_request_head, data + b"GET / HTTP/1.1\r\n") == whole
