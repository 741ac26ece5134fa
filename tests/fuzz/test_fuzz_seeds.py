"""Keeps the fuzz harness alive: its one-input function runs over its seeds (and a few
hostile inputs) on every test run, without atheris."""

from __future__ import annotations

import fuzz_http
import pytest

EXTRA = [
    b"",
    b"\x00",
    b"\x03",
    b"\x01" + b"\r\n" * 200,
    b"\x00GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
    b"\x02HTTP/1.1 200 OK\r\nHost: <\r\n\r\n",
    b"\x07" + b"f" * 20 + b"\r\n",
]


@pytest.mark.parametrize("data", fuzz_http.SEEDS + EXTRA)
def test_harness_runs_on_seed(data: bytes) -> None:
    fuzz_http.TestOneInput(data)
