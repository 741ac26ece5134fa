"""Micro benchmark of the budget core (fastgw/_core/budget.pyx): ``BudgetTable.spend``.

A hit on an existing key of 10k, each call the next key of a random sequence (equal
copies, not the stored objects, as a gateway builds its key per request), in anonymous
memory (``private``) and in a file shared by processes (``shared``: the same lookup plus
an uncontended spinlock on the set's lock word). The limit is high enough that nothing
is refused (checked).

Group: ``budget_spend:10k_keys``.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator

import pytest

from fastgw._core.budget import BudgetTable

N_KEYS = 10_000
LIMIT = 10**15


def _keys() -> Iterator[bytes]:
    rng = random.Random(7)
    while True:
        yield b"daily/day\0apikey::caller-%d" % rng.randrange(N_KEYS)


@pytest.mark.benchmark(group="budget_spend:10k_keys")
@pytest.mark.parametrize("mode", ["private", "shared"])
def test_budget_spend(benchmark, mode: str) -> None:  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "budgets.bin") if mode == "shared" else None
        table = BudgetTable(4 * N_KEYS, path)
        for i in range(N_KEYS):
            table.spend(b"daily/day\0apikey::caller-%d" % i, 1, 1, LIMIT)
        keys = _keys()
        spend = table.spend
        benchmark(lambda: spend(next(keys), 1, 1, LIMIT))
        assert table.statistics()["refused"] == 0
