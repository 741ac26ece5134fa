"""Run the micro benchmarks, compute fastgw's speed ratios and check them against floors.

    .venv/bin/python -m bench.check --quick     # CI: about 20 s, gated by bench/floors.toml
    .venv/bin/python -m bench.check             # longer rounds, every benchmark module
    .venv/bin/python -m bench.check --select gated   # longer rounds, gated benchmarks only
    .venv/bin/python -m bench.check --from-json bench/results/<file>.json   # no run

Strategy. Absolute times depend on the machine; a ratio between two implementations
timed in the same run, on the same bytes, minutes apart at most, mostly does not. So CI
gates ratios only: ``median(reference) / median(fastgw)`` per message, for each floor
in bench/floors.toml. Medians, not means, so that a neighbour's burst on a shared
machine moves few rounds and not the figure. A reference with several variants (the
``httptools`` family: a fresh parser, a reused one) counts with its fastest variant, so
a ratio can only under-state fastgw's lead. A ratio under its floor is measured once
more, alone and with twice the time, before it fails the run: a real regression fails
twice, a noisy minute rarely does.

Which benchmarks run. The full mode runs every ``bench/bench_*.py``. The quick mode (CI)
runs only the benchmark functions whose figures bench/floors.toml uses, a floor's or a
target's ``op``: other modules (the map, bucket, identity and routing benchmarks, whose
100k-entry builds and naive scans take minutes) have no floor and would only spend the
CI budget. The op is set inside each function (``extra_info["op"]``), so the selection
reads each module's source and keeps the ``test_*`` functions that name a gated op as a
string literal. An op named by no function (one computed at run time) makes the run
fall back to every module, with a note: slower, never a floor left unchecked.

Exit status: 0 when every ratio is at or above its floor, 1 when one is not (after
the retry), 2 when the benchmark run itself failed (a parser disagreed with the corpus,
a crash) or produced no figure for a floor.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
FLOORS_FILE = BENCH_DIR / "floors.toml"
# The micro benchmark modules, named explicitly: bench/ also holds the end-to-end bench,
# which is not ours to run here.
MICRO_MODULES = sorted(str(p.relative_to(ROOT)) for p in BENCH_DIR.glob("bench_*.py"))


@dataclass(frozen=True)
class Mode:
    name: str
    max_time_s: float  # pytest-benchmark's budget per benchmark
    min_rounds: int


# quick: the gated benchmarks only (see "Which benchmarks run"; 29 today, all in
# bench_http.py) x 0.4 s, plus calibration and pytest start-up: about 20 s, so the CI
# budget of a minute leaves room for a retry. A 0.4 s median is over hundreds of rounds
# of a few hundred calls (or thousands of single-call rounds): enough to hold the
# floors, not enough to quote to two digits; the full mode is for that.
QUICK = Mode("quick", max_time_s=0.4, min_rounds=20)
FULL = Mode("full", max_time_s=2.0, min_rounds=100)

# Each round lasts at least this long (pytest-benchmark calibrates the call count to
# it): a sub-microsecond call is then timed over a few hundred calls, and the timer's
# own cost (about 70 ns a read here) stays under 1 % of a round.
MIN_ROUND_S = 100e-6


# ---------------------------------------------------------------------------------------
# Running


def run_bench(mode: Mode, json_path: Path, node_ids: Iterable[str] = (), scale: float = 1.0) -> int:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *(node_ids or MICRO_MODULES),
        "--benchmark-only",
        f"--benchmark-json={json_path}",
        f"--benchmark-max-time={mode.max_time_s * scale}",
        f"--benchmark-min-rounds={mode.min_rounds}",
        f"--benchmark-min-time={MIN_ROUND_S}",
        "--benchmark-quiet",
        "-q",
        "-p",
        "no:randomly",
    ]
    print("$ " + " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


# ---------------------------------------------------------------------------------------
# Selecting


def gated_ops(floors: Floors, targets: dict[str, float]) -> set[str]:
    """The ops whose figures a floor or a target reads."""
    return {op for op, _ in floors} | {target_op(name) for name in targets}


def target_op(name: str) -> str:
    """The op of a target: ``<op>_max_us`` or ``<op>_vs_<ref>``."""
    if name.endswith("_max_us"):
        return name.removesuffix("_max_us")
    return name.rpartition("_vs_")[0]


def select_gated(
    ops: set[str], modules: Iterable[str] = MICRO_MODULES
) -> tuple[list[str], set[str]]:
    """Node ids (``bench/bench_x.py::test_y``) of the benchmark functions that name one of
    ``ops`` as a string literal, decorators included; also the ops no function names."""
    node_ids: list[str] = []
    found: set[str] = set()
    for module in modules:
        tree = ast.parse((ROOT / module).read_text(), filename=module)
        for node in tree.body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            named = {
                c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in ops
            }
            if named:
                node_ids.append(f"{module}::{node.name}")
                found |= named
    return node_ids, ops - found


# ---------------------------------------------------------------------------------------
# Reading results

# (op, message) -> impl -> (median seconds, pytest node id)
Results = dict[tuple[str, str], dict[str, tuple[float, str]]]


def load_results(path: Path) -> Results:
    with path.open() as f:
        data = json.load(f)
    out: Results = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info") or {}
        if not {"op", "message", "impl"} <= info.keys():
            continue
        key = (info["op"], info["message"])
        out.setdefault(key, {})[info["impl"]] = (b["stats"]["median"], b["fullname"])
    return out


# (op, reference) -> message -> floor; the message None holds the op's default.
Floors = dict[tuple[str, str], dict[str | None, float]]


def load_floors(path: Path = FLOORS_FILE) -> tuple[Floors, dict[str, float]]:
    """The ratio floors, and the issue's targets (reported, never gated).

    ``[op]`` holds ``reference = floor`` for every message of the op; a sub-table
    ``[op.message]`` overrides it for one message."""
    with path.open("rb") as f:
        data = tomllib.load(f)
    targets = {str(k): float(v) for k, v in data.pop("targets", {}).items()}
    floors: Floors = {}
    for op, table in data.items():
        for key, value in table.items():
            if isinstance(value, dict):
                for ref, floor in value.items():
                    floors.setdefault((op, ref), {})[key] = float(floor)
            else:
                floors.setdefault((op, key), {})[None] = float(value)
    return floors, targets


def family(impls: dict[str, tuple[float, str]], ref: str) -> dict[str, float]:
    """The variants of reference ``ref``: ``httptools`` and ``httptools_reuse`` for
    ``httptools``."""
    return {
        impl: median
        for impl, (median, _) in impls.items()
        if impl == ref or impl.startswith(ref + "_")
    }


@dataclass
class Ratio:
    op: str
    message: str
    ref: str
    ref_impl: str  # the fastest variant of the family, the one the ratio uses
    ratio: float
    floor: float
    retried: bool = False

    @property
    def ok(self) -> bool:
        return self.ratio >= self.floor


def compute_ratios(results: Results, floors: Floors) -> tuple[list[Ratio], list[str]]:
    """Ratios for every floor and every message of its op; also the floors that have
    no figure at all (a renamed benchmark must not pass silently)."""
    ratios: list[Ratio] = []
    missing: list[str] = []
    for (fop, ref), by_message in sorted(floors.items()):
        seen: set[str] = set()
        for (op, message), impls in sorted(results.items()):
            floor = by_message.get(message, by_message.get(None))
            if op != fop or floor is None:
                continue
            refs = family(impls, ref)
            if "fastgw" not in impls or not refs:
                missing.append(f"{op}:{message} has no fastgw or no {ref} figure")
                continue
            seen.add(message)
            ref_impl = min(refs, key=refs.__getitem__)
            ratio = refs[ref_impl] / impls["fastgw"][0]
            ratios.append(Ratio(op, message, ref, ref_impl, ratio, floor))
        for unseen in by_message.keys() - seen - {None}:
            missing.append(f"no benchmark for the floor {fop}.{unseen} vs {ref}")
        if not seen:
            missing.append(f"no benchmark for the floor {fop} vs {ref}")
    return ratios, missing


# ---------------------------------------------------------------------------------------
# Reporting


def _versions() -> str:
    parts = [f"Python {platform.python_version()}"]
    for dist in ("fastgw", "h11", "httptools", "pytest-benchmark"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} ?")
    parts.append(f"{os.cpu_count()} CPUs")
    return ", ".join(parts)


def print_table(results: Results, ratios: list[Ratio]) -> None:
    by_key = {(r.op, r.message, r.ref_impl): r for r in ratios}
    width = 40
    print()
    print(f"{'benchmark':<{width}} {'median us':>10} {'ratio':>8} {'floor':>8}  result")
    for (op, message), impls in sorted(results.items()):
        print(f"{op}:{message}")
        for impl in sorted(impls, key=lambda i: (i != "fastgw", impls[i][0])):
            median_us = impls[impl][0] * 1e6
            r = by_key.get((op, message, impl))
            if impl == "fastgw":
                line = f"  {impl:<{width - 2}} {median_us:>10.3f}"
            elif r is not None:
                result = ("OK" if r.ok else "FAIL") + (" (retry)" if r.retried else "")
                line = (
                    f"  {impl:<{width - 2}} {median_us:>10.3f} {r.ratio:>7.1f}x "
                    f"{r.floor:>7.1f}x  {result}"
                )
            else:
                # A slower variant of a reference family, or a reference without a floor:
                # its ratio for information, in parentheses.
                ratio = impls[impl][0] / impls["fastgw"][0] if "fastgw" in impls else 0.0
                line = f"  {impl:<{width - 2}} {median_us:>10.3f} {f'({ratio:.1f}x)':>8}"
            print(line)


def print_targets(results: Results, ratios: list[Ratio], targets: dict[str, float]) -> None:
    """The issue's requirements, against this run's figures, message by message."""
    if not targets:
        return
    print()
    print("issue targets (reported, not gated; the floors above gate CI):")
    for name, value in targets.items():
        op = target_op(name)
        if name.endswith("_max_us"):
            figures = {m: i["fastgw"][0] * 1e6 for (o, m), i in results.items() if o == op}
            met = {m: f <= value for m, f in figures.items()}
            shown = {m: f"{f:.3f} us" for m, f in figures.items()}
            label = f"{op} median <= {value:g} us"
        else:
            ref = name.rpartition("_vs_")[2]
            figures = {r.message: r.ratio for r in ratios if r.op == op and r.ref == ref}
            met = {m: f >= value for m, f in figures.items()}
            shown = {m: f"{f:.1f}x" for m, f in figures.items()}
            label = f"{op} vs {ref} >= {value:g}x"
        if not figures:
            print(f"  {label}: no figure")
            continue
        verdict = "met" if all(met.values()) else "NOT met"
        detail = ", ".join(
            f"{m} {shown[m]}" + ("" if met[m] else " (under)") for m in sorted(figures)
        )
        print(f"  {label}: {verdict} - {detail}")


# ---------------------------------------------------------------------------------------
# Main


def _stamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.check",
        description="Run the micro benchmarks and check their ratio floors.",
    )
    ap.add_argument("--quick", action="store_true", help="short rounds (CI): about 20 s")
    ap.add_argument(
        "--from-json",
        type=Path,
        metavar="PATH",
        help="check an existing --benchmark-json file instead of running (no retry)",
    )
    ap.add_argument(
        "--select",
        choices=("gated", "all"),
        help="run only the benchmarks a floor or target reads (default with --quick), "
        "or every benchmark module (default otherwise)",
    )
    ap.add_argument("--no-retry", action="store_true", help="fail at the first measurement")
    ap.add_argument(
        "--floors", type=Path, default=FLOORS_FILE, metavar="PATH", help="default: %(default)s"
    )
    args = ap.parse_args(argv)

    mode = QUICK if args.quick else FULL
    floors, targets = load_floors(args.floors)
    print(f"fastgw micro bench ({mode.name}): {_versions()}")

    if args.from_json:
        json_path = args.from_json
    else:
        RESULTS_DIR.mkdir(exist_ok=True)
        json_path = RESULTS_DIR / f"micro-{mode.name}-{_stamp()}.json"
        node_ids: list[str] = []
        if (args.select or ("gated" if args.quick else "all")) == "gated":
            node_ids, unnamed = select_gated(gated_ops(floors, targets))
            if unnamed:
                print(
                    "no benchmark function names the op(s) "
                    + ", ".join(sorted(unnamed))
                    + " as a string literal: running every module"
                )
                node_ids = []
        if run_bench(mode, json_path, node_ids) != 0:
            print("the benchmark run failed (see above): no ratios checked")
            return 2
    results = load_results(json_path)
    ratios, missing = compute_ratios(results, floors)

    failing = [r for r in ratios if not r.ok]
    if failing and not args.no_retry and not args.from_json:
        # Measure each failing group again, all its implementations, with twice the time.
        groups = {(r.op, r.message) for r in failing}
        node_ids = sorted(node for key in groups for _, node in results[key].values())
        print(f"{len(failing)} ratio(s) under the floor; measuring those groups once more")
        retry_path = json_path.with_name(json_path.stem + "-retry.json")
        if run_bench(mode, retry_path, node_ids, scale=2.0) != 0:
            print("the retry run failed (see above)")
            return 2
        retried = load_results(retry_path)
        results.update(retried)
        again, _ = compute_ratios(retried, floors)
        again_by_key = {(r.op, r.message, r.ref): r for r in again}
        for i, r in enumerate(ratios):
            new = again_by_key.get((r.op, r.message, r.ref))
            if (r.op, r.message) in groups and new is not None:
                new.retried = True
                ratios[i] = new

    print_table(results, ratios)
    print_targets(results, ratios, targets)
    print()
    print(
        f"results: {json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path}"
    )
    for m in missing:
        print(f"MISSING: {m}")
    failing = [r for r in ratios if not r.ok]
    for r in failing:
        print(
            f"FAIL: {r.op}:{r.message} fastgw vs {r.ref} is {r.ratio:.2f}x, "
            f"under its floor {r.floor:g}x"
        )
    if missing:
        return 2
    if failing:
        return 1
    print(f"OK: {len(ratios)} ratios at or above their floors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
