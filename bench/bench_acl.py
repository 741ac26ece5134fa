"""Micro benchmarks of the map-matching core (fastgw/_core/acl.pyx) against a naive
Python scan of the same table, per match type, at 100, 10k and 100k entries.

Naming, as in bench_http.py: every benchmark records ``extra_info = {"op", "message",
"impl"}``; ``op`` is ``acl_lookup`` or ``acl_build``, ``message`` is ``<kind>-<size>``,
``impl`` is ``fastgw`` or ``naive``. One call of a lookup benchmark looks up the same
``PROBES`` keys (mostly hits at random places in the table, a few misses) one after the
other, so the per-lookup time is the median divided by ``PROBES``, and a large table is
not flattered by one key's path staying in cache.

The naive scan is what a Python router would do without an index: a loop over the
entries in file order with the type's winner rule (stop at the first match; for ``beg``
and ``ip``, scan everything and keep the longest). Before timing, both answer every
probe key and must agree. At 100k entries the naive scan takes tens of milliseconds per
lookup, so it runs a few rounds only.

``acl_build`` times building the 100k-entry map from a list of entries (``reg``: one
round, it takes seconds; see the module docstring of acl.pyx).
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Callable
from typing import Any

import pytest

from fastgw._core.acl import Map

KINDS = ("str", "beg", "end", "dir", "dom", "sub", "reg", "ip")
SIZES = (100, 10_000, 100_000)
PROBES = 16
HITS = 12  # of the PROBES keys; the rest miss

Entries = list[tuple[bytes, bytes]]


# ---------------------------------------------------------------------------------------
# Tables: realistic keys for each type, deterministic per (kind, size)


def _table(kind: str, size: int) -> tuple[Entries, list[bytes]]:
    rng = random.Random(f"{kind}-{size}")
    ids = rng.sample(range(10 * size), size)  # distinct numbers, random order
    if kind == "str":
        keys = [b"fn-%d.t%d.example.com" % (i, i % 997) for i in ids]

        def probe(k: bytes) -> bytes:
            return k

        misses = [b"fn-x%d.example.com" % i for i in range(PROBES)]
    elif kind == "beg":
        keys = [b"/t%d/fn%d" % (i % 997, i) for i in ids]
        keys[:: max(1, size // 50)] = [b"/t%d" % (i % 997) for i in ids[:: max(1, size // 50)]]

        def probe(k: bytes) -> bytes:
            return k + b"/v1/items?id=42"

        misses = [b"/static/%d.css" % i for i in range(PROBES)]
    elif kind == "end":
        keys = [b".fn%d.example.com" % i for i in ids]

        def probe(k: bytes) -> bytes:
            return b"api" + k

        misses = [b"api.fn%d.example.org" % i for i in range(PROBES)]
    elif kind == "dir":
        keys = [b"/svc%d/api" % i for i in ids]

        def probe(k: bytes) -> bytes:
            return b"/v1" + k + b"/users/7?page=2"

        misses = [b"/v1/svc%d/apix/users" % i for i in range(PROBES)]
    elif kind == "dom":
        keys = [b"tenant%d.example.com" % i for i in ids]

        def probe(k: bytes) -> bytes:
            return b"api." + k + b":443"

        misses = [b"api.tenant%d.example.net:443" % i for i in range(PROBES)]
    elif kind == "sub":
        keys = [b"tok%08d" % i for i in ids]

        def probe(k: bytes) -> bytes:
            return b"/v1/items?session=" + k + b"&page=2"

        misses = [b"/v1/items?session=tok-%d&page=2" % i for i in range(PROBES)]
    elif kind == "reg":
        keys = [b"^/api/v[12]/user%d/[0-9]+$" % i for i in ids]

        def probe(k: bytes) -> bytes:
            return b"/api/v2/user%s/1234" % k[len(b"^/api/v[12]/user") : -len(b"/[0-9]+$")]

        misses = [b"/api/v3/user%d/1" % i for i in range(PROBES)]
    elif kind == "ip":
        keys = []
        for i in ids:
            r = i % 4
            if r == 0:
                keys.append(b"%d.%d.%d.0/24" % (10 + i % 100, (i >> 8) & 255, i & 255))
            elif r == 1:
                keys.append(b"%d.%d.0.0/16" % (100 + i % 100, i & 255))
            elif r == 2:
                keys.append(b"2001:db8:%x:%x::/64" % ((i >> 16) & 0xFFFF, i & 0xFFFF))
            else:
                keys.append(b"%d.%d.%d.%d" % (172, 16 + (i >> 16) % 16, (i >> 8) & 255, i & 255))

        def probe(k: bytes) -> bytes:
            net = ipaddress.ip_network(k.decode())
            return str(net.network_address + (net.num_addresses - 1) // 2).encode()

        misses = [b"203.0.113.%d" % i for i in range(PROBES)]
    else:
        raise AssertionError(kind)
    entries = [(k, b"backend-%d" % n) for n, k in enumerate(keys)]
    hits = [probe(k) for k in rng.sample(keys, min(HITS, len(keys)))]
    probes = hits + misses[: PROBES - len(hits)]
    return entries, probes


# ---------------------------------------------------------------------------------------
# The naive scan


def _naive(kind: str, entries: Entries) -> Callable[[bytes], bytes | None]:
    if kind == "str":

        def look(key: bytes) -> bytes | None:
            for k, v in entries:
                if k == key:
                    return v
            return None

    elif kind == "beg":

        def look(key: bytes) -> bytes | None:
            best, best_len = None, -1
            for k, v in entries:
                if len(k) > best_len and key.startswith(k):
                    best, best_len = v, len(k)
            return best

    elif kind in ("end", "sub"):
        test = bytes.endswith if kind == "end" else bytes.__contains__

        def look(key: bytes) -> bytes | None:
            for k, v in entries:
                if test(key, k):
                    return v
            return None

    elif kind in ("dir", "dom"):
        delims = b"/?" if kind == "dir" else b"/?.:"
        # A word match is a run of whole segments of the key: with every delimiter
        # turned into NUL and NULs around, a substring test (keys have no NUL).
        split = re.compile(b"[" + re.escape(delims) + b"]")
        words = [
            (b"\0" + split.sub(b"\0", k.strip(delims)) + b"\0", v)
            for k, v in entries
            if k.strip(delims)
        ]

        def look(key: bytes) -> bytes | None:
            padded = b"\0" + split.sub(b"\0", key) + b"\0"
            for w, v in words:
                if w in padded:
                    return v
            return None

    elif kind == "reg":
        compiled = [(re.compile(k), v) for k, v in entries]

        def look(key: bytes) -> bytes | None:
            for rx, v in compiled:
                if rx.search(key):
                    return v
            return None

    elif kind == "ip":
        nets = [ipaddress.ip_network(k.decode(), strict=False) for k, _ in entries]
        table = [(int(n.network_address), int(n.netmask), n.version, n.prefixlen) for n in nets]
        values = [v for _, v in entries]

        def look(key: bytes) -> bytes | None:
            try:
                a = ipaddress.ip_address(key.decode())
            except ValueError:
                return None
            x, ver = int(a), a.version
            best, best_len = None, -1
            for i, (net, mask, v, plen) in enumerate(table):
                if v == ver and x & mask == net and plen > best_len:
                    best, best_len = values[i], plen
            return best

    else:
        raise AssertionError(kind)
    return look


# Built tables, maps and scanners are kept for the module: building 100k entries (and
# compiling 100k regular expressions for the naive ``reg`` scan) is not repeated.
_tables: dict[tuple[str, int], tuple[Entries, list[bytes]]] = {}
_maps: dict[tuple[str, int], Map] = {}
_naives: dict[tuple[str, int], Callable[[bytes], bytes | None]] = {}


def _get_table(kind: str, size: int) -> tuple[Entries, list[bytes]]:
    if (kind, size) not in _tables:
        _tables[kind, size] = _table(kind, size)
    return _tables[kind, size]


def _get_map(kind: str, size: int) -> Map:
    if (kind, size) not in _maps:
        _maps[kind, size] = Map(kind, _get_table(kind, size)[0])
    return _maps[kind, size]


def _tag(benchmark: Any, op: str, message: str, impl: str) -> None:
    benchmark.group = f"{op}:{message}"
    benchmark.extra_info.update(op=op, message=message, impl=impl)


# ---------------------------------------------------------------------------------------
# Build


@pytest.mark.parametrize("kind", KINDS)
def test_build(benchmark: Any, kind: str) -> None:
    entries, _ = _get_table(kind, 100_000)
    _tag(benchmark, "acl_build", f"{kind}-100000", "fastgw")
    m = benchmark.pedantic(Map, args=(kind, entries), rounds=1 if kind == "reg" else 3)
    assert len(m) == len(entries)
    _maps[kind, 100_000] = m


# ---------------------------------------------------------------------------------------
# Lookups


def _cases() -> Any:
    # Size-major, fastgw next to naive, so the figures compared are measured close in time.
    return [
        pytest.param(kind, size, impl, id=f"{kind}-{size}-{impl}")
        for kind in KINDS
        for size in SIZES
        for impl in ("fastgw", "naive")
    ]


@pytest.mark.parametrize(("kind", "size", "impl"), _cases())
def test_lookup(benchmark: Any, kind: str, size: int, impl: str) -> None:
    entries, probes = _get_table(kind, size)
    m = _get_map(kind, size)
    if (kind, size) not in _naives:
        _naives[kind, size] = _naive(kind, entries)
    naive = _naives[kind, size]
    answers = [m.lookup(k) for k in probes]
    assert answers == [naive(k) for k in probes], (kind, size)
    assert sum(a is not None for a in answers) >= HITS, (kind, size)  # the probes do hit
    _tag(benchmark, "acl_lookup", f"{kind}-{size}", impl)
    benchmark.extra_info["lookups_per_call"] = len(probes)
    look = m.lookup if impl == "fastgw" else naive

    def run() -> None:
        for k in probes:
            look(k)

    if impl == "naive" and size >= 10_000:
        # Milliseconds per call: a fixed small number of rounds.
        benchmark.pedantic(run, rounds=3 if size == 100_000 else 10, iterations=1)
    else:
        benchmark(run)
