"""fastgw._core.acl against the plain-Python model (test_acl_model.py) on generated tables
and keys, for every match type, case-sensitive and not; then HAProxy's documented
examples for each match type, and the API's edges."""

from __future__ import annotations

import importlib.machinery
import ipaddress
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_acl_model import model_index

import fastgw._core.acl as acl
from fastgw._core.acl import KINDS, Map
from fastgw.errors import ConfigError

STRING_KINDS = ("str", "beg", "end", "dir", "dom", "sub")

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_acl_core_is_compiled() -> None:
    assert acl.__file__ is not None
    assert acl.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


# ---------------------------------------------------------------------------------------
# Strategies

# A small alphabet with every delimiter and both cases, so that generated keys overlap
# (shared prefixes, suffixes, substrings, words) and case folding matters.
ALPHABET = b"ab/.?:A B\x00\xc3"
atoms = st.binary(max_size=0) | st.sampled_from([bytes([c]) for c in ALPHABET])
words = st.lists(atoms, max_size=6).map(b"".join)


@st.composite
def string_tables(draw: st.DrawFn) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    keys = draw(st.lists(words, max_size=12))
    entries = [(k, b"v%d" % i) for i, k in enumerate(keys)]
    # Lookup keys: random ones, and ones built around the table's keys so that most
    # tables are hit, often by several entries at once.
    pool = keys or [b""]
    built = st.tuples(words, st.sampled_from(pool), words).map(b"".join)
    probes = draw(st.lists(words | built | st.sampled_from(pool), min_size=1, max_size=10))
    return entries, probes


@pytest.mark.parametrize("kind", STRING_KINDS)
@pytest.mark.parametrize("ignore_case", [False, True], ids=["cs", "icase"])
@SETTINGS
@given(data=string_tables())
def test_string_kinds_agree_with_model(
    kind: str, ignore_case: bool, data: tuple[list[tuple[bytes, bytes]], list[bytes]]
) -> None:
    entries, probes = data
    m = Map(kind, entries, ignore_case=ignore_case)
    assert len(m) == len(entries)
    for key in probes:
        want = model_index(kind, entries, key, ignore_case)
        assert m.lookup_index(key) == want, (kind, entries, key)
        assert m.lookup(key) == (entries[want][1] if want >= 0 else None)


# Regular expressions from a small grammar over the same alphabet: literal runs (the
# prefilter's food), classes, anchors, repeats, alternations, scoped flags.
_lit = st.lists(st.sampled_from(list(b"ab/.A")), min_size=1, max_size=4).map(
    lambda cs: re.escape(bytes(cs))
)
_piece = st.one_of(
    _lit,
    _lit,
    st.sampled_from([b"[ab]", b".", b"\\.", b"[^/]", b"\\d", b"\\w+", b"^", b"$"]),
    _lit.map(lambda b: b"(?:" + b + b")*"),
    _lit.map(lambda b: b"(" + b + b")+"),
    _lit.map(lambda b: b"(?i:" + b + b")"),
    st.tuples(_lit, _lit).map(lambda t: b"(" + t[0] + b"|" + t[1] + b")"),
    st.tuples(_lit, _lit).map(lambda t: b"(?:" + t[0] + b"|" + t[1] + b"?)"),
)
regexes = st.lists(_piece, min_size=0, max_size=4).map(b"".join) | st.sampled_from(
    [b"(?i)ab", b"a|", b"(?=a)b?", b"(a)\\1"]
)


@pytest.mark.parametrize("ignore_case", [False, True], ids=["cs", "icase"])
@SETTINGS
@given(
    pats=st.lists(regexes, max_size=10),
    probes=st.lists(words, min_size=1, max_size=8),
)
def test_reg_agrees_with_model(ignore_case: bool, pats: list[bytes], probes: list[bytes]) -> None:
    entries = [(p, b"v%d" % i) for i, p in enumerate(pats)]
    m = Map("reg", entries, ignore_case=ignore_case)
    for key in [*probes, b"".join(pats)]:
        want = model_index("reg", entries, key, ignore_case)
        assert m.lookup_index(key) == want, (entries, key)


@st.composite
def networks(draw: st.DrawFn) -> tuple[bytes, ipaddress.IPv4Network | ipaddress.IPv6Network]:
    v6 = draw(st.booleans())
    width = 128 if v6 else 32
    plen = draw(st.sampled_from([0, 1, width // 2, width - 1, width]) | st.integers(0, width))
    # Addresses from a few clusters, so that prefixes nest and collide.
    hi = draw(st.sampled_from([0, 0xFFFF, 0x20010DB8, 0x0A000000 >> 8, (1 << 32) - 1]))
    bits = (hi << (width - 32)) | draw(st.integers(0, (1 << (width - 32)) - 1))
    if draw(st.booleans()):
        bits = draw(st.integers(0, (1 << width) - 1))
    net: ipaddress.IPv4Network | ipaddress.IPv6Network
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    if v6:
        net, addr = ipaddress.IPv6Network((bits, plen), strict=False), ipaddress.IPv6Address(bits)
    else:
        net, addr = ipaddress.IPv4Network((bits, plen), strict=False), ipaddress.IPv4Address(bits)
    form = draw(st.integers(0, 3))
    if form == 0:
        text = str(net)  # canonical
    elif form == 1:
        text = f"{addr}/{plen}"  # host bits set: ignored, as in HAProxy
    elif form == 2 and plen == width:
        text = str(addr)  # a plain address is /32 or /128
    elif form == 3 and not v6:
        text = f"{net.network_address}/{net.netmask}"  # dotted mask
    else:
        text = str(net)
    return text.encode(), net


@st.composite
def ip_tables(draw: st.DrawFn) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    nets = draw(st.lists(networks(), max_size=12))
    entries = [(text, b"v%d" % i) for i, (text, _) in enumerate(nets)]
    probes: list[bytes] = []
    for _, net in nets:
        host = draw(st.integers(0, net.num_addresses - 1))
        probes.append(str(net.network_address + host).encode())
    probes += draw(
        st.lists(
            st.integers(0, (1 << 32) - 1).map(lambda i: str(ipaddress.IPv4Address(i)).encode())
            | st.integers(0, (1 << 128) - 1).map(lambda i: str(ipaddress.IPv6Address(i)).encode())
            | st.integers(0, (1 << 32) - 1).map(
                lambda i: ("::ffff:" + str(ipaddress.IPv4Address(i))).encode()
            )
            | st.sampled_from([b"", b"1.2.3", b"1.2.3.4.5", b"::g", b"10.0.0.1/8", b"x"]),
            max_size=8,
        )
    )
    return entries, probes


@SETTINGS
@given(data=ip_tables())
def test_ip_agrees_with_model(data: tuple[list[tuple[bytes, bytes]], list[bytes]]) -> None:
    entries, probes = data
    m = Map("ip", entries)
    for key in probes:
        assert m.lookup_index(key) == model_index("ip", entries, key), (entries, key)


@pytest.mark.parametrize("kind", (*STRING_KINDS, "reg"))
@settings(max_examples=50, deadline=None)
@given(entries=st.lists(st.tuples(words, words), max_size=5), key=words)
def test_empty_key_and_empty_patterns(
    kind: str, entries: list[tuple[bytes, bytes]], key: bytes
) -> None:
    entries = [(b"", b"empty"), *entries]
    if kind == "reg":
        entries = [(re.escape(k), v) for k, v in entries]
    m = Map(kind, entries)
    for probe in (b"", key):
        assert m.lookup_index(probe) == model_index(kind, entries, probe)


# ---------------------------------------------------------------------------------------
# HAProxy's documented examples, one or more per match type (facts from its
# configuration manual, section "Matching strings" / "Matching IPv4 and IPv6 addresses")


def test_str_exact_match() -> None:
    m = Map("str", [(b"www.example.com", b"web"), (b"api.example.com", b"api")])
    assert m.lookup(b"www.example.com") == b"web"
    assert m.lookup(b"www.example.com.") is None
    assert m.lookup(b"WWW.example.com") is None
    assert (
        Map("str", [(b"www.example.com", b"web")], ignore_case=True).lookup(b"WWW.Example.COM")
        == b"web"
    )


def test_beg_static_prefixes_longest_wins() -> None:
    m = Map(
        "beg",
        [
            (b"/static", b"s"),
            (b"/images", b"i"),
            (b"/img", b"g"),
            (b"/css", b"c"),
            (b"/images/thumbs", b"t"),
        ],
    )
    assert m.lookup(b"/images/logo.png") == b"i"
    assert m.lookup(b"/images/thumbs/1.png") == b"t"  # the tree's longest prefix
    assert m.lookup(b"/imgs/x") == b"g"
    assert m.lookup(b"/api") is None
    # With -i HAProxy has no tree: first in file order.
    mi = Map("beg", [(b"/images", b"i"), (b"/images/thumbs", b"t")], ignore_case=True)
    assert mi.lookup(b"/IMAGES/thumbs/1.png") == b"i"


def test_end_file_extensions_first_in_file_order() -> None:
    m = Map("end", [(b".gif", b"img"), (b".png", b"img"), (b".css", b"css"), (b".js", b"js")])
    assert m.lookup(b"/a/b.png") == b"img"
    assert m.lookup(b"/app.js") == b"js"
    assert m.lookup(b"/app.jsx") is None
    # Overlapping suffixes: HAProxy scans, so the first listed wins, not the longest.
    m2 = Map("end", [(b".com", b"generic"), (b".example.com", b"specific")])
    assert m2.lookup(b"www.example.com") == b"generic"
    assert Map("end", [(b".PNG", b"x")], ignore_case=True).lookup(b"/a.png") == b"x"


def test_dir_slash_delimited_segments() -> None:
    m = Map("dir", [(b"/api", b"api")])
    assert m.lookup(b"/api") == b"api"
    assert m.lookup(b"/api/x") == b"api"
    assert m.lookup(b"/api?x=1") == b"api"
    assert m.lookup(b"/apix") is None
    assert m.lookup(b"/xapi") is None
    assert m.lookup(b"/v1/api/users") == b"api"  # anywhere in the path, as in HAProxy
    m2 = Map("dir", [(b"/images/thumbs", b"t"), (b"images", b"i")])
    assert m2.lookup(b"/static/images/thumbs/a.png") == b"t"
    assert m2.lookup(b"/images/full/a.png") == b"i"
    assert Map("dir", [(b"/", b"never")]).lookup(b"/") is None


def test_dom_dot_delimited_labels() -> None:
    m = Map("dom", [(b"example.com", b"ex")])
    assert m.lookup(b"example.com") == b"ex"
    assert m.lookup(b"a.example.com") == b"ex"
    assert m.lookup(b"a.b.example.com:8443") == b"ex"
    assert m.lookup(b"badexample.com") is None
    assert m.lookup(b"example.community") is None
    assert m.lookup(b"example.com.evil.net") == b"ex"  # HAProxy's word match, as is
    assert Map("dom", [(b"www", b"w")]).lookup(b"www.example.com") == b"w"
    assert (
        Map("dom", [(b"Example.COM", b"ex")], ignore_case=True).lookup(b"WWW.EXAMPLE.com") == b"ex"
    )


def test_sub_substring_first_in_file_order() -> None:
    m = Map("sub", [(b"curl", b"cli"), (b"wget", b"cli"), (b"bot", b"bot"), (b"Mozilla", b"web")])
    assert m.lookup(b"curl/8.5.0") == b"cli"
    assert m.lookup(b"Googlebot/2.1") == b"bot"
    assert m.lookup(b"Mozilla/5.0 (compatible; Googlebot/2.1)") == b"bot"  # listed first
    assert m.lookup(b"python-requests") is None
    assert Map("sub", [(b"CURL", b"cli")], ignore_case=True).lookup(b"xcUrLx") == b"cli"


def test_reg_first_in_file_order() -> None:
    m = Map(
        "reg",
        [(rb"\.(cgi|php)$", b"script"), (rb"^/api/v[0-9]+/", b"api"), (rb"^/", b"any")],
    )
    assert m.lookup(b"/api/v2/index.php") == b"script"
    assert m.lookup(b"/api/v2/users") == b"api"
    assert m.lookup(b"/static/x.css") == b"any"
    assert m.lookup(b"relative") is None
    mi = Map("reg", [(rb"^(bbs|forum)\.example\.com$", b"bbs")], ignore_case=True)
    assert mi.lookup(b"FORUM.example.COM") == b"bbs"
    assert mi.lookup(b"forum.example.com.evil") is None


def test_ip_networks_longest_prefix() -> None:
    m = Map(
        "ip",
        [
            (b"192.168.0.0/16", b"lan"),
            (b"172.16.0.0/12", b"lan"),
            (b"10.0.0.0/8", b"lan"),
            (b"127.0.0.1", b"lo"),
            (b"10.1.0.0/255.255.0.0", b"ten-one"),
            (b"::1", b"lo6"),
            (b"2001:db8::/32", b"doc"),
        ],
    )
    assert m.lookup(b"192.168.1.20") == b"lan"
    assert m.lookup(b"10.1.2.3") == b"ten-one"
    assert m.lookup(b"10.2.2.3") == b"lan"
    assert m.lookup(b"127.0.0.1") == b"lo"
    assert m.lookup(b"127.0.0.2") is None
    assert m.lookup(b"::1") == b"lo6"
    assert m.lookup(b"2001:db8:1::5") == b"doc"
    assert m.lookup(b"8.8.8.8") is None
    # IPv4-mapped IPv6 addresses match IPv4 networks, and IPv4 addresses IPv6 ones.
    assert m.lookup(b"::ffff:10.1.9.9") == b"ten-one"
    m6 = Map("ip", [(b"::ffff:192.0.2.0/120", b"mapped")])
    assert m6.lookup(b"192.0.2.7") == b"mapped"
    assert Map("ip", [(b"0.0.0.0/0", b"all4"), (b"::/0", b"all6")]).lookup(b"::2") == b"all6"


def test_duplicate_keys_first_wins() -> None:
    for kind in KINDS:
        k = b"10.0.0.0/8" if kind == "ip" else b"/a"
        m = Map(kind, [(k, b"first"), (k, b"second")])
        probe = b"10.0.0.1" if kind == "ip" else b"/a"
        assert m.lookup(probe) == b"first", kind
    m = Map("str", [(b"/A", b"first"), (b"/a", b"second")], ignore_case=True)
    assert m.lookup(b"/a") == b"first"


# ---------------------------------------------------------------------------------------
# API edges


def test_bad_entries_raise_config_error_naming_the_entry() -> None:
    with pytest.raises(ConfigError) as ei:
        Map(
            "ip",
            [
                (b"10.0.0.0/8", b""),
                (b"10.0.0.0/33", b""),
                (b"bogus", b""),
                (b"10.0.0.0/255.0.255.0", b""),
                (b"::/129", b""),
            ],
            source="inline",
        )
    assert [p[:2] for p in ei.value.problems] == [
        ("inline", "entries[1]"),
        ("inline", "entries[2]"),
        ("inline", "entries[3]"),
        ("inline", "entries[4]"),
    ]
    assert "contiguous" in ei.value.problems[2][2]
    with pytest.raises(ConfigError) as ei:
        Map("reg", [(b"ok", b""), (b"(unclosed", b"")])
    assert ei.value.problems[0][:2] == ("<entries>", "entries[1]")
    assert "regular expression" in ei.value.problems[0][2]
    with pytest.raises(ConfigError) as ei:
        Map("regex", [])
    assert ei.value.problems[0][1] == "kind"


def test_keys_must_be_bytes() -> None:
    with pytest.raises(TypeError):
        Map("str", [("a", b"b")])  # type: ignore[list-item]
    m = Map("str", [(b"a", b"b")])
    with pytest.raises(TypeError):
        m.lookup("a")  # type: ignore[arg-type]


def test_accessors() -> None:
    m = Map("beg", iter([(b"/a", b"A"), (b"/b", b"B")]), ignore_case=True, source="x.map")
    assert (m.kind, m.ignore_case, m.source, len(m)) == ("beg", True, "x.map", 2)
    assert m.entry(1) == (b"/b", b"B")
    assert m.location(1) == ("x.map", "entries[1]")
    with pytest.raises(IndexError):
        m.location(2)
    assert "beg -i 2 entries" in repr(m)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_map(kind: str) -> None:
    m = Map(kind, [])
    assert len(m) == 0
    assert m.lookup(b"") is None
    assert m.lookup_index(b"10.0.0.1") == -1


def test_long_keys_take_the_heap_path() -> None:
    tail = b"x" * 5000
    m = Map("end", [(tail, b"long"), (b"y" + tail, b"longer")])
    assert m.lookup(b"a" + tail) == b"long"
    assert m.lookup(b"Y" + tail) == b"long"
    mi = Map("end", [(b"Y" + tail, b"longer")], ignore_case=True)
    assert mi.lookup(b"ay" + tail.upper()) == b"longer"


def test_reg_prefilter_keeps_file_order_across_literals() -> None:
    # The third expression has no literal (always tried); the others are found by
    # their literals. The answer must still be the lowest index that matches.
    pats = [rb"zzz", rb"b.*c", rb"^[a-c]+$", rb"abc", rb"(?i)ABC"]
    m = Map("reg", [(p, b"%d" % i) for i, p in enumerate(pats)])
    for key in (b"abc", b"xabcx", b"ABC", b"bxc", b"zzz", b"q"):
        assert m.lookup_index(key) == model_index("reg", [(p, b"") for p in pats], key)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_larger_tables_agree_with_model(data: st.DataObject) -> None:
    # A few hundred entries with shared prefixes, so the tries have deep, wide nodes.
    kind = data.draw(st.sampled_from(STRING_KINDS))
    segs = st.sampled_from([b"/api", b"/v1", b"/users", b".example", b".com", b"/a", b"b"])
    keys = data.draw(
        st.lists(st.lists(segs, min_size=1, max_size=4).map(b"".join), min_size=50, max_size=300)
    )
    entries = [(k, b"%d" % i) for i, k in enumerate(keys)]
    ignore_case = data.draw(st.booleans())
    m = Map(kind, entries, ignore_case=ignore_case)
    probes = data.draw(st.lists(st.lists(segs, max_size=6).map(b"".join), max_size=20))
    for key in probes:
        assert m.lookup_index(key) == model_index(kind, entries, key, ignore_case)
