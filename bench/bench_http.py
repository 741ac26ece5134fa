"""Micro benchmarks of the HTTP/1.1 core against h11 and httptools, on bench/corpus.py.

Naming, relied on by bench/check.py: every benchmark records
``extra_info = {"op": ..., "message": ..., "impl": ...}`` and its group is
``"<op>:<message>"``, so one ``--benchmark-json`` file holds, per group, fastgw and its
references measured in the same run. Ratios are reference median / fastgw median.

What each implementation does per message is described in bench/drivers.py. Each
benchmark first parses once untimed and checks the result against the corpus, so a
driver that parses less than the others cannot win.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bench import corpus
from bench import drivers as d
from fastgw._core import http as core

REQUEST_IMPLS = ("fastgw", "h11", "httptools", "httptools_reuse")
RESPONSE_IMPLS = ("fastgw", "h11", "httptools", "httptools_reuse")

Rounds = Callable[[float], int]


def _cases(messages: tuple[corpus.Message, ...], impls: tuple[str, ...]) -> Any:
    # One flat list, message-major, so the implementations compared with each other run
    # back to back (less exposed to a noisy neighbour than a run spread over minutes).
    return [pytest.param(m, impl, id=f"{m.name}-{impl}") for m in messages for impl in impls]


def _tag(benchmark: Any, op: str, message: str, impl: str) -> None:
    benchmark.group = f"{op}:{message}"
    benchmark.extra_info.update(op=op, message=message, impl=impl)


# ---------------------------------------------------------------------------------------
# Request heads


@pytest.mark.parametrize(("message", "impl"), _cases(corpus.REQUESTS, REQUEST_IMPLS))
def test_parse_request(benchmark: Any, message: corpus.Message, impl: str) -> None:
    _tag(benchmark, "parse_request", message.name, impl)
    head = message.head
    if impl == "fastgw":
        assert d.fastgw_request_meaning(core.parse_request_head(head)) == message.expect
        benchmark(core.parse_request_head, head)
    elif impl == "h11":
        assert d.h11_request_meaning(d.h11_parse_request(head)) == message.expect
        benchmark(d.h11_parse_request, head)
    elif impl == "httptools":
        assert d.httptools_request_meaning(*d.httptools_parse_request(head)) == message.expect
        benchmark(d.httptools_parse_request, head)
    elif impl == "httptools_reuse":
        parse, sink = d.httptools_request_reuser()
        wire = message.wire
        parse(wire)
        parser, _ = d.httptools_parse_request(wire)  # for get_method() only
        assert d.httptools_request_meaning(parser, sink) == message.expect
        benchmark(parse, wire)
    else:
        raise AssertionError(impl)


# ---------------------------------------------------------------------------------------
# Response heads


@pytest.mark.parametrize(("message", "impl"), _cases(corpus.RESPONSES, RESPONSE_IMPLS))
def test_parse_response(
    benchmark: Any, pedantic_rounds: Rounds, message: corpus.Message, impl: str
) -> None:
    _tag(benchmark, "parse_response", message.name, impl)
    head = message.head
    if impl == "fastgw":
        assert d.fastgw_response_meaning(core.parse_response_head(head)) == message.expect
        benchmark(core.parse_response_head, head)
    elif impl == "h11":
        request = corpus.REQUEST_FOR[message.name].wire
        conn = d.h11_client_after(request)
        assert d.h11_response_meaning(d.h11_parse_response(conn, head)) == message.expect

        def setup() -> tuple[tuple[Any, bytes], dict[str, Any]]:
            return (d.h11_client_after(request), head), {}

        rounds = pedantic_rounds(50e-6)
        benchmark.pedantic(
            d.h11_parse_response, setup=setup, rounds=rounds, warmup_rounds=min(100, rounds)
        )
    elif impl == "httptools":
        assert d.httptools_response_meaning(*d.httptools_parse_response(head)) == message.expect
        benchmark(d.httptools_parse_response, head)
    elif impl == "httptools_reuse":
        parse, sink = d.httptools_response_reuser()
        wire = message.wire
        parse(wire)
        parser, _ = d.httptools_parse_response(wire)  # for get_status_code() only
        assert d.httptools_response_meaning(parser, sink) == message.expect
        benchmark(parse, wire)
    else:
        raise AssertionError(impl)


# ---------------------------------------------------------------------------------------
# Serialization: absolute figures (no reference serializer does the same job)

UPSTREAM_HOST = b"orders-create-3kq7x2mzpa-ew.a.run.app"
CLIENT_IP = b"203.0.113.7"
REQUEST_ID = b"4d1f7c2a-9b3e-4f60-8a21-6c5d0e9f7b13"
VIA = b"1.1 fastgw"


@pytest.mark.parametrize("message", corpus.REQUESTS, ids=lambda m: m.name)
def test_build_request_head(benchmark: Any, message: corpus.Message) -> None:
    _tag(benchmark, "build_request_head", message.name, "fastgw")
    head = core.parse_request_head(message.head)
    kwargs = {
        "host": UPSTREAM_HOST,
        "client_ip": CLIENT_IP,
        "proto": b"https",
        "request_id": REQUEST_ID,
        "via": VIA,
    }
    out = core.build_request_head(head, **kwargs)
    rebuilt = core.parse_request_head(out)
    assert rebuilt.host == UPSTREAM_HOST and rebuilt.get(b"x-forwarded-for") == CLIENT_IP
    assert rebuilt.body_kind == head.body_kind
    benchmark(core.build_request_head, head, **kwargs)


@pytest.mark.parametrize("message", corpus.RESPONSES, ids=lambda m: m.name)
def test_build_response_head(benchmark: Any, message: corpus.Message) -> None:
    _tag(benchmark, "build_response_head", message.name, "fastgw")
    head = core.parse_response_head(message.head)
    out = core.build_response_head(head, via=VIA)
    assert core.parse_response_head(out).status == head.status
    benchmark(core.build_response_head, head, via=VIA)


# ---------------------------------------------------------------------------------------
# Chunked body framing


@pytest.mark.parametrize("impl", ("fastgw", "httptools"))
def test_chunked_scan(benchmark: Any, pedantic_rounds: Rounds, impl: str) -> None:
    """Walk a 64 KiB chunked body (16 chunks of 4 KiB), validating the framing.

    httptools cannot walk a body without a head first, so both sides are timed the
    same way: a setup outside the timed region makes the state object (a fresh
    ``ChunkedReader``; a fresh parser already past the request head), and one timed
    call walks the whole body. One call per round, so both medians carry the same
    timer overhead (a few tens of ns)."""
    _tag(benchmark, "chunked_scan", "body_64k", impl)
    body = corpus.CHUNKED_64K
    head = corpus.POST_CHUNKED_UPLOAD.head
    if impl == "fastgw":
        reader = core.ChunkedReader()
        assert reader.scan(body) == len(body) and reader.done

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (core.ChunkedReader().scan, body), {}

    else:
        sink = d.BodySink()
        d.httptools_body_parser(head, sink).feed_data(body)
        assert sink.complete

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (d.httptools_body_parser(head, d.BodySink()).feed_data, body), {}

    rounds = pedantic_rounds(5e-6)
    benchmark.pedantic(_call, setup=setup, rounds=rounds, warmup_rounds=min(200, rounds))


def _call(fn: Callable[[bytes], object], arg: bytes) -> object:
    return fn(arg)
