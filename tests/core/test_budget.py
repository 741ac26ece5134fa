"""The budget core (fastgw._core.budget): all-or-nothing spends per window, eviction,
the shared file (restarts, two processes, damaged and mismatched files), and a property:
whatever the calls, no key ever spends more than its limit in one window."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastgw._core.budget as core_budget
from fastgw._core.budget import (
    FILE_MAGIC,
    INLINE_KEY_BYTES,
    MAX_KEY_BYTES,
    MAX_KEYS_LIMIT,
    WAYS,
    BudgetTable,
)


def test_budget_core_is_compiled() -> None:
    assert core_budget.__file__ is not None
    assert core_budget.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def test_stubs_match_the_module(tmp_path: Path) -> None:
    """mypy.stubtest compares every name and signature with budget.pyi."""
    pytest.importorskip("mypy")
    allow = tmp_path / "allowlist.txt"
    allow.write_text(
        "fastgw\\._core\\.budget\\.__test__\n"
        "fastgw\\._core\\.budget\\.(.*\\.)?__reduce_cython__\n"
        "fastgw\\._core\\.budget\\.(.*\\.)?__setstate_cython__\n"
        # The __init__ of a cdef class shows as (*args, **kwargs) at runtime:
        "fastgw\\._core\\.budget\\.BudgetTable\\.__init__\n"
    )
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nfollow_imports = silent\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy.stubtest",
            "fastgw._core.budget",
            "--allowlist",
            str(allow),
            "--mypy-config-file",
            str(config),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_magic_spells_the_file_kind() -> None:
    assert FILE_MAGIC.to_bytes(8, "little") == b"FGWBUDGT"


# ---------------------------------------------------------------------------------------
# Exact counts


def test_spend_all_or_nothing() -> None:
    t = BudgetTable(64)
    assert t.spend(b"k", 3, 1, 5) == 2
    assert t.spend(b"k", 3, 1, 5) == -1  # 3 > 2 left: nothing spent
    assert t.remaining(b"k", 1, 5) == 2
    assert t.spend(b"k", 2, 1, 5) == 0
    assert t.spend(b"k", 1, 1, 5) == -1
    assert t.spend(b"k", 0, 1, 5) == 0  # a zero cost only asks
    stats = t.statistics()
    assert (stats["allowed"], stats["refused"], stats["keys"]) == (3, 2, 1)


def test_a_new_window_starts_from_zero_and_old_ids_count_into_the_newer() -> None:
    t = BudgetTable(64)
    assert t.spend(b"k", 5, 100, 5) == 0
    assert t.spend(b"k", 1, 100, 5) == -1
    assert t.remaining(b"k", 200, 5) == 5  # read-only: the next window is untouched
    assert t.spend(b"k", 1, 200, 5) == 4
    # A caller a hair behind (still at window 100) counts into window 200.
    assert t.spend(b"k", 1, 100, 5) == 3
    assert t.remaining(b"k", 100, 5) == 3
    assert t.remaining(b"k", 200, 5) == 3


def test_cost_over_limit_on_new_key_inserts_nothing() -> None:
    t = BudgetTable(64)
    assert t.spend(b"k", 6, 1, 5) == -1
    assert t.spend(b"k", 0, 1, 5) == 5
    assert len(t) == 0


def test_lowered_limit_leaves_nothing_until_next_window() -> None:
    t = BudgetTable(64)
    assert t.spend(b"k", 8, 1, 10) == 2
    assert t.remaining(b"k", 1, 5) == 0
    assert t.spend(b"k", 1, 1, 5) == -1
    assert t.spend(b"k", 1, 2, 5) == 4


def test_refund() -> None:
    t = BudgetTable(64)
    t.spend(b"k", 4, 1, 10)
    t.refund(b"k", 3, 1)
    assert t.remaining(b"k", 1, 10) == 9
    t.refund(b"k", 100, 1)
    assert t.remaining(b"k", 1, 10) == 10
    t.spend(b"k", 2, 2, 10)
    t.refund(b"k", 1, 1)  # an older window's refund goes to the counter's window
    assert t.remaining(b"k", 2, 10) == 9


def test_long_keys_are_told_apart() -> None:
    t = BudgetTable(64)
    a = b"a" * 40 + b"1"
    b = b"a" * 40 + b"2"
    assert len(a) > INLINE_KEY_BYTES
    assert t.spend(a, 3, 1, 3) == 0
    assert t.spend(b, 1, 1, 3) == 2
    assert t.spend(a, 1, 1, 3) == -1
    assert t.spend(b"x" * MAX_KEY_BYTES, 1, 1, 3) == 2


def test_bad_arguments() -> None:
    t = BudgetTable(64)
    with pytest.raises(ValueError):
        t.spend(b"k", -1, 1, 5)
    with pytest.raises(ValueError):
        t.spend(b"k", 1, 1, -5)
    with pytest.raises(ValueError):
        t.spend(b"k" * (MAX_KEY_BYTES + 1), 1, 1, 5)
    with pytest.raises(TypeError):
        t.spend("k", 1, 1, 5)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        t.spend(b"k", 1 << 64, 1, 5)
    with pytest.raises(ValueError):
        BudgetTable(0)
    with pytest.raises(ValueError):
        BudgetTable(MAX_KEYS_LIMIT + 1)


# ---------------------------------------------------------------------------------------
# Eviction


def test_eviction_prefers_past_windows_then_least_recently_used() -> None:
    t = BudgetTable(WAYS)  # one set: every key competes for the same 8 slots
    assert t.statistics()["slots"] == WAYS
    for i in range(WAYS):
        t.spend(b"old%d" % i if i < 2 else b"k%d" % i, 1, 1 if i < 2 else 2, 10)
    t.spend(b"k2", 1, 2, 10)  # k3 is now the least recently used current counter
    t.spend(b"new1", 1, 2, 10)
    t.spend(b"new2", 1, 2, 10)
    assert t.statistics()["evictions"] == 2
    for i in range(2, WAYS):
        assert t.remaining(b"k%d" % i, 2, 10) < 10  # the current counters stayed
    t.spend(b"new3", 1, 2, 10)  # no past window left: the LRU goes (k3)
    assert t.remaining(b"k3", 2, 10) == 10
    assert t.remaining(b"k2", 2, 10) == 8
    assert len(t) == WAYS


# ---------------------------------------------------------------------------------------
# The file


def test_file_survives_reopen(tmp_path: Path) -> None:
    p = str(tmp_path / "budgets.bin")
    t = BudgetTable(1000, p)
    assert (t.loaded, t.reset_reason, t.path) == (False, None, p)
    assert t.spend(b"k", 7, 1, 10) == 3
    del t
    t = BudgetTable(1000, p)
    assert (t.loaded, t.reset_reason) == (True, None)
    assert t.spend(b"k", 1, 1, 10) == 2
    assert t.statistics()["keys"] == 1
    assert os.stat(p).st_mode & 0o777 == 0o600


def test_two_tables_on_one_file_in_one_process(tmp_path: Path) -> None:
    p = str(tmp_path / "budgets.bin")
    a = BudgetTable(1000, p)
    assert a.spend(b"k", 1, 1, 3) == 2
    b = BudgetTable(1000, p)  # opens while the first still maps the file
    assert b.loaded
    assert b.spend(b"k", 1, 1, 3) == 1
    assert a.spend(b"k", 1, 1, 3) == 0
    assert b.spend(b"k", 1, 1, 3) == -1


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda b: b"junk", "shorter than its header"),
        (lambda b: b"X" + b[1:], "bad magic"),
        (lambda b: b[:8] + b"\x09" + b[9:], "layout version"),
        (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], "checksum"),
        (lambda b: b + b"\0" * 64, "bytes, its header says"),
    ],
)
def test_damaged_file_is_replaced_and_reported(tmp_path: Path, damage, reason: str) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "budgets.bin"
    t = BudgetTable(100, str(p))
    t.spend(b"k", 7, 1, 10)
    del t
    p.write_bytes(damage(p.read_bytes()))
    t = BudgetTable(100, str(p))
    assert not t.loaded
    assert t.reset_reason is not None and reason in t.reset_reason
    assert t.remaining(b"k", 1, 10) == 10  # never read as counters
    assert t.spend(b"k", 1, 1, 10) == 9
    assert sorted(os.listdir(tmp_path)) == ["budgets.bin"]


def test_other_size_is_replaced_and_an_old_mapping_stays_valid(tmp_path: Path) -> None:
    p = str(tmp_path / "budgets.bin")
    old = BudgetTable(100, p)
    old.spend(b"k", 7, 1, 10)
    new = BudgetTable(1000, p)
    assert new.reset_reason is not None and "max_keys=1000" in new.reset_reason
    assert new.remaining(b"k", 1, 10) == 10
    # The first table maps the replaced file: still readable and writable.
    assert old.spend(b"k", 1, 1, 10) == 2


_CHILD = """
import sys
from fastgw._core.budget import BudgetTable
t = BudgetTable(4096, sys.argv[1])
ok = sum(t.spend(b"key%d" % (i % 7), 1, 5, 1000) >= 0 for i in range(int(sys.argv[2])))
print(ok)
"""


def test_two_processes_share_one_file(tmp_path: Path) -> None:
    """Two processes spend from the same seven counters at once; together they get
    exactly the 7 x 1000 units, no more (the per-set locks make each spend atomic)."""
    p = str(tmp_path / "budgets.bin")
    BudgetTable(4096, p)  # created here, so neither child re-creates it
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, p, "6000"], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [int(proc.communicate(timeout=120)[0]) for proc in procs]
    assert sum(outs) == 7 * 1000
    t = BudgetTable(4096, p)
    assert all(t.remaining(b"key%d" % i, 5, 1000) == 0 for i in range(7))


def test_a_dead_lock_owner_is_taken_over(tmp_path: Path) -> None:
    """A process killed while holding a set's lock: its pid is gone, the next spender
    takes the lock over instead of spinning for ever."""
    p = tmp_path / "budgets.bin"
    t = BudgetTable(8, str(p))
    del t
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(proc.stdout)
    raw = bytearray(p.read_bytes())
    raw[128:132] = dead_pid.to_bytes(4, sys.byteorder)  # the one set's lock word
    p.write_bytes(bytes(raw))
    t = BudgetTable(8, str(p))
    assert t.spend(b"k", 1, 1, 10) == 9


# ---------------------------------------------------------------------------------------
# Property: never more than the limit per window


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),  # key
            st.integers(0, 4),  # cost
            st.integers(0, 3),  # window step
            st.booleans(),  # refund some of it
        ),
        max_size=120,
    ),
    st.integers(0, 12),
    st.integers(1, 16),
)
def test_never_spends_more_than_limit_per_window(ops, limit: int, max_keys: int) -> None:  # type: ignore[no-untyped-def]
    """Spent per (key, window), counted from the answers, never exceeds the limit; and
    the answers agree with a plain-Python model while no key was evicted."""
    t = BudgetTable(max_keys)
    window = 0
    spent: dict[tuple[int, int], int] = {}
    model: dict[int, tuple[int, int]] = {}  # key -> (window, spent)
    for key, cost, step, refund in ops:
        window += step
        k = b"key%d" % key
        left = t.spend(k, cost, window, limit)
        if left >= 0:
            spent[(key, window)] = spent.get((key, window), 0) + cost
        if t.statistics()["evictions"] == 0:
            w, s = model.get(key, (window, 0))
            s = s if w == window else 0
            expect = limit - s - cost if cost <= limit - s else -1
            assert left == expect
            if expect >= 0:
                model[key] = (window, s + cost)
        if refund and left >= 0 and cost:
            t.refund(k, 1, window)
            spent[(key, window)] -= 1
            if key in model and model[key][0] == window:
                model[key] = (window, max(0, model[key][1] - 1))
    assert all(v <= limit for v in spent.values())
