"""pytest glue for the micro benchmarks.

The benchmark modules are named ``bench_*.py``, a pattern pytest does not collect by
itself: this hook collects them, and it only runs when pytest is pointed at ``bench/``.
So the main test run (``testpaths = ["tests"]``) never picks them up, and nothing has to
be said in pyproject.toml.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest's python plugin collects it
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def pedantic_rounds(request: pytest.FixtureRequest) -> Callable[[float], int]:
    """For the benchmarks that need ``benchmark.pedantic`` (a setup outside the timed
    region): ``pedantic_rounds(round_s)`` is how many rounds of about ``round_s`` seconds
    each, setup included, fit in ``--benchmark-max-time``, like the automatic benchmarks.
    At least ``--benchmark-min-rounds``; at most 20000, enough for a stable median."""
    max_time_s = float(request.config.getoption("benchmark_max_time"))
    min_rounds = int(request.config.getoption("benchmark_min_rounds"))

    def rounds(round_s: float) -> int:
        return max(min_rounds, 20, min(20000, int(max_time_s / round_s)))

    return rounds
