"""The core's audit line formatter: every line is valid JSON with the values given; the
audit ring (the request path's records) writes the same bytes as the formatter."""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgw._core.metrics import AUDIT_FIELD_COUNT, AuditRing, format_audit_lines
from fastgw.audit import FIELDS
from fastgw.identity.base import Identity

TP = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def rec(**kw: object) -> tuple:
    base = dict.fromkeys(FIELDS)
    base.update(
        time=1.5, request_id=b"rid", client=b"127.0.0.1", status=200, retries=0, duration_s=0.25
    )
    base.update(kw)
    return tuple(base[f] for f in FIELDS)


def test_field_order_matches_the_python_side() -> None:
    assert len(FIELDS) == AUDIT_FIELD_COUNT
    line = json.loads(format_audit_lines([rec()], {}))
    assert list(line) == list(FIELDS)


def test_trace_id_only_from_a_wellformed_traceparent() -> None:
    ok = json.loads(format_audit_lines([rec(trace_id=TP)], {}))
    assert ok["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    for bad in (TP[:-1], TP.upper(), TP.replace(b"-", b"_"), b'"},"x":1', b"", None):
        assert json.loads(format_audit_lines([rec(trace_id=bad)], {}))["trace_id"] is None


@settings(max_examples=300, deadline=None)
@given(
    route=st.one_of(st.none(), st.text()),
    reason=st.one_of(st.none(), st.text(max_size=20)),
    status=st.integers(-(2**40), 2**40),
    dur=st.floats(min_value=-1e9, max_value=1e9, allow_nan=False),
    n=st.one_of(st.none(), st.integers(0, 2**62)),
)
def test_lines_are_json_with_the_values(route, reason, status, dur, n) -> None:  # type: ignore[no-untyped-def]
    cache: dict[object, bytes] = {}
    out = format_audit_lines(
        [rec(route=route, reason=reason, status=status, duration_s=dur, bytes_in=n)] * 2, cache
    )
    lines = out.decode().splitlines()
    assert len(lines) == 2
    for line in lines:
        got = json.loads(line)
        assert got["route"] == route and got["reason"] == reason
        assert got["status"] == status and got["bytes_in"] == n
        assert abs(got["duration_s"] - dur) <= 5e-7 + abs(dur) * 1e-15


# --- AuditRing: the request path's records, formatted exactly as format_audit_lines ----

ALICE = Identity("jwt", "alice", "https://issuer.example", key="k1")
RING_DEFAULTS: dict[str, object] = dict(
    time=1.5, request_id=b"rid", client=b"127.0.0.1", route=None, backend=None,
    endpoint=None, status=200, decision="allow", reason=None, identity=None,
    duration_s=0.25, upstream_first_byte_s=None, bytes_in=0, bytes_out=None, retries=0,
    traceparent=None,
)  # fmt: skip


def ring_args(**kw: object) -> tuple:
    a = dict(RING_DEFAULTS, **kw)
    return tuple(a.values())


def as_record(args: tuple) -> tuple:
    """The format_audit_lines tuple for AuditRing.add's arguments."""
    a = dict(zip(RING_DEFAULTS, args, strict=True))
    ident = a.pop("identity")
    who: dict[str, object] = (
        dict(subject=None, issuer=None, key=None)
        if ident is None
        else dict(subject=ident.subject or None, issuer=ident.issuer, key=ident.key)
    )
    return rec(**a, **who, trace_id=a.pop("traceparent"))


def drain(ring: AuditRing, offset: float = 0.0) -> list[dict]:
    return [json.loads(x) for x in ring.drain_to_bytes(offset).splitlines()]


def test_ring_line_matches_the_reference() -> None:
    ring = AuditRing(4)
    args = ring_args(
        route="r", backend="fn", endpoint="http://127.0.0.1:9", identity=ALICE, traceparent=TP,
        upstream_first_byte_s=0.125, bytes_out=2, reason="rate limit ip",
    )  # fmt: skip
    ring.add(*args)
    assert len(ring) == 1
    out = ring.drain_to_bytes(100.0)
    assert out == format_audit_lines([as_record(args)], {}, 100.0)
    assert list(json.loads(out)) == list(FIELDS)
    assert len(ring) == 0 and ring.drain_to_bytes() == b""


def test_ring_identity_fields() -> None:
    ring = AuditRing(4)
    ring.add(*ring_args(identity=Identity("anonymous", "")))  # empty subject: null
    ring.add(*ring_args(identity=Identity("apikey", 'é"\n\x7f', None, key="")))
    anon, key = drain(ring)
    assert (anon["subject"], anon["issuer"], anon["key"]) == (None, None, None)
    assert (key["subject"], key["issuer"], key["key"]) == ('é"\n\x7f', None, "")


def test_ring_wraps_around_dropping_the_oldest() -> None:
    ring = AuditRing(3)
    for status in range(5):
        ring.add(*ring_args(status=status))
    assert len(ring) == 3 and ring.dropped == 2
    assert [x["status"] for x in drain(ring)] == [2, 3, 4]
    # After a drain it starts over; a second lap wraps past the end of the array.
    for status in range(10, 14):
        ring.add(*ring_args(status=status))
    assert [x["status"] for x in drain(ring)] == [11, 12, 13]
    assert ring.dropped == 3


def test_ring_drops_when_full_and_releases_references() -> None:
    rid = b"x" * 40  # a fresh object: its reference count is the test's alone
    base = sys.getrefcount(rid)
    ring = AuditRing(2)
    for _ in range(5):
        ring.add(*ring_args(request_id=rid))
    assert sys.getrefcount(rid) == base + 2  # only the records still held
    assert ring.dropped == 3
    assert len(drain(ring)) == 2
    assert sys.getrefcount(rid) == base
    ring.add(*ring_args(request_id=rid))
    del ring  # pending records are released with the ring
    assert sys.getrefcount(rid) == base


def test_ring_add_that_raises_changes_nothing() -> None:
    ring = AuditRing(2)
    ring.add(*ring_args(status=1))
    with pytest.raises(TypeError):
        ring.add(*ring_args(status=2, bytes_in="12"))
    with pytest.raises(TypeError):
        ring.add(*ring_args(status=3, route=["unhashable"]))
    assert len(ring) == 1 and ring.dropped == 0
    assert [x["status"] for x in drain(ring)] == [1]


def test_ring_names_escaped_once_per_name() -> None:
    ring = AuditRing(8)
    odd = 'a"b\\c\n\x00é\u2028\ud800'
    for _ in range(3):
        # Equal names built at run time (distinct objects) share one table entry.
        ring.add(*ring_args(route="".join(["r", "1"]), reason=odd, decision="deny"))
    assert ring.name_count() == 3
    lines = ring.drain_to_bytes()
    one = as_record(ring_args(route="r1", reason=odd, decision="deny"))
    assert lines == format_audit_lines([one] * 3, {})
    assert json.loads(lines.splitlines()[0])["reason"] == odd


def test_ring_name_table_is_bounded() -> None:
    ring = AuditRing(5000)
    for i in range(5000):
        ring.add(*ring_args(reason=f"reason {i}"))
    assert ring.name_count() > 4096  # grows only until the drain...
    assert [x["reason"] for x in drain(ring)] == [f"reason {i}" for i in range(5000)]
    assert ring.name_count() == 0  # ...which starts it over
    ring.add(*ring_args(reason="again", route="r"))
    assert drain(ring)[0]["reason"] == "again"


def test_ring_capacity_is_at_least_one() -> None:
    with pytest.raises(ValueError):
        AuditRing(0)


names = st.one_of(st.none(), st.sampled_from(["ok", "fn", "x\\y", "", "é"]), st.text(max_size=8))
micros = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e13, max_value=1e13),
    # Exact halves of a microsecond: rounding must go the way llround does.
    st.integers(-(10**12), 10**12).map(lambda k: (k + 0.5) / 1e6),
)
identities = st.one_of(
    st.none(),
    st.builds(
        Identity,
        st.just("jwt"),
        st.text(max_size=8),
        st.one_of(st.none(), st.text(max_size=8)),
        key=st.one_of(st.none(), st.text(max_size=8)),
    ),
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=2e9),
            st.one_of(st.none(), st.binary(max_size=30).map(lambda b: b.hex().encode())),
            st.sampled_from([b"127.0.0.1", b"::1", None]),
            names, names, names,
            st.integers(-(2**62), 2**62),
            names, names, identities, micros,
            st.one_of(st.none(), micros),
            st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
            st.one_of(st.none(), st.integers(0, 2**62)),
            st.integers(0, 10),
            st.one_of(st.none(), st.just(TP), st.binary(min_size=55, max_size=55)),
        ),
        min_size=1,
        max_size=12,
    ),
    st.integers(1, 6),
    st.floats(min_value=-2e9, max_value=2e9),
)  # fmt: skip
def test_ring_differs_in_nothing_from_the_reference(records, capacity, offset) -> None:  # type: ignore[no-untyped-def]
    ring = AuditRing(capacity)
    for args in records:
        ring.add(*args)
    kept = records[-capacity:]
    assert ring.dropped == len(records) - len(kept)
    assert ring.drain_to_bytes(offset) == format_audit_lines(
        [as_record(a) for a in kept], {}, offset
    )
