"""The type stubs of the compiled HTTP core must match what the module really exports:
mypy.stubtest imports it and compares every name and signature with http.pyi."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("mypy")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_stubs_match_the_compiled_module() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy.stubtest",
            "fastgw._core.http",
            "--allowlist",
            os.path.join(HERE, "http_stubtest_allowlist.txt"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
