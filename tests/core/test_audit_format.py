"""The core's audit line formatter: every line is valid JSON with the values given."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from fastgw._core.metrics import AUDIT_FIELD_COUNT, format_audit_lines
from fastgw.audit import FIELDS

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
