"""The compiled core must be what runs: a pure-Python fallback would pass every behaviour
test and lose the reason fastgw exists."""

import importlib.machinery

import fastgw._core.http as core_http


def test_http_core_is_compiled() -> None:
    assert core_http.__file__ is not None
    assert core_http.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), (
        f"fastgw._core.http loaded from {core_http.__file__}, not a compiled extension; "
        "run `pip install -e .` to build it"
    )
