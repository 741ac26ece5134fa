"""A plain-Python model of every match type of fastgw._core.acl: a naive scan of the
entries with the documented winner rule, written to mirror HAProxy's src/pattern.c
(pat_match_* and match_word) rather than the core's indexes. test_acl.py checks that the
core agrees with it on generated tables; the tests here pin the model itself to
hand-worked answers, so a wrong model cannot pass silently.
"""

from __future__ import annotations

import ipaddress
import re

DIR_DELIMS = b"/?"
DOM_DELIMS = b"/?.:"


def _fold(b: bytes, ignore_case: bool) -> bytes:
    return b.lower() if ignore_case else b


def match_word(pattern: bytes, key: bytes, delims: bytes) -> bool:
    """HAProxy's match_word, byte for byte (an empty stripped pattern matches nothing)."""
    ps = pattern.strip(delims)
    pl = len(ps)
    if pl == 0 or pl > len(key):
        return False
    may_match = True
    end = len(key) - pl
    for c in range(end + 1):
        if key[c] in delims:
            may_match = True
            continue
        if not may_match:
            continue
        if key[c : c + pl] == ps and (c == end or key[c + pl] in delims):
            return True
        may_match = False
    return False


def _ip_network(p: bytes) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(p.decode("ascii"), strict=False)


def _ip_model(entries: list[tuple[bytes, bytes]], key: bytes) -> int:
    nets = [(i, _ip_network(k)) for i, (k, _) in enumerate(entries)]
    try:
        addr = ipaddress.ip_address(key.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return -1

    def longest(a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
        best, best_len = -1, -1
        for i, net in nets:
            if net.version == a.version and a in net and net.prefixlen > best_len:
                best, best_len = i, net.prefixlen
        return best

    found = longest(addr)
    if found >= 0:
        return found
    if isinstance(addr, ipaddress.IPv4Address):
        return longest(ipaddress.IPv6Address("::ffff:" + str(addr)))
    if addr.ipv4_mapped is not None:
        return longest(addr.ipv4_mapped)
    return -1


def model_index(
    kind: str, entries: list[tuple[bytes, bytes]], key: bytes, ignore_case: bool = False
) -> int:
    """Index of the winning entry for ``key``, or -1: a scan in file order."""
    if kind == "ip":
        return _ip_model(entries, key)
    if kind == "reg":
        flags = re.IGNORECASE if ignore_case else 0
        for i, (p, _) in enumerate(entries):
            if re.search(p, key, flags):
                return i
        return -1
    k = _fold(key, ignore_case)
    pats = [_fold(p, ignore_case) for p, _ in entries]
    if kind == "beg" and not ignore_case:
        # HAProxy's prefix tree: the longest prefix; equal keys, the first.
        best, best_len = -1, -1
        for i, p in enumerate(pats):
            if k.startswith(p) and len(p) > best_len:
                best, best_len = i, len(p)
        return best
    tests = {
        "str": lambda p: k == p,
        "beg": lambda p: k.startswith(p),
        "end": lambda p: k.endswith(p),
        "sub": lambda p: p in k,
        "dir": lambda p: match_word(p, k, DIR_DELIMS),
        "dom": lambda p: match_word(p, k, DOM_DELIMS),
    }
    test = tests[kind]
    for i, p in enumerate(pats):
        if test(p):
            return i
    return -1


# ---------------------------------------------------------------------------------------
# The model itself, on hand-worked answers


def test_model_word_matches() -> None:
    assert match_word(b"/api", b"/api", DIR_DELIMS)
    assert match_word(b"/api", b"/api/x", DIR_DELIMS)
    assert match_word(b"/api/", b"/v1/api?x=1", DIR_DELIMS)
    assert not match_word(b"/api", b"/apix", DIR_DELIMS)
    assert not match_word(b"/api", b"/xapi", DIR_DELIMS)
    assert match_word(b"a/b", b"/x/a/b/c", DIR_DELIMS)
    assert not match_word(b"/", b"/", DIR_DELIMS)
    assert match_word(b"example.com", b"a.example.com", DOM_DELIMS)
    assert match_word(b"example.com", b"example.com:443", DOM_DELIMS)
    assert not match_word(b"example.com", b"badexample.com", DOM_DELIMS)


def test_model_winner_rules() -> None:
    e = [(b"/a", b"0"), (b"/a/b", b"1"), (b"/a", b"2")]
    assert model_index("beg", e, b"/a/b/c") == 1  # longest
    assert model_index("beg", e, b"/A/B", ignore_case=True) == 0  # first, as HAProxy -i
    assert model_index("end", [(b"b", b""), (b"ab", b"")], b"xab") == 0
    assert model_index("sub", [(b"zz", b""), (b"b", b""), (b"a", b"")], b"ab") == 1
    assert model_index("reg", [(b"z", b""), (b"a", b"")], b"za") == 0
    assert model_index("str", e, b"/a") == 0


def test_model_ip() -> None:
    e = [(b"10.0.0.0/8", b""), (b"10.1.0.0/16", b""), (b"::ffff:0:0/96", b"")]
    assert model_index("ip", e, b"10.1.2.3") == 1
    assert model_index("ip", e, b"10.2.0.1") == 0
    assert model_index("ip", e, b"11.0.0.1") == 2  # as ::ffff:11.0.0.1
    assert model_index("ip", e, b"::ffff:10.1.0.1") == 2  # IPv6 trie first
    assert model_index("ip", [(b"10.0.0.0/8", b"")], b"::ffff:10.1.0.1") == 0
    assert model_index("ip", e, b"not an address") == -1
