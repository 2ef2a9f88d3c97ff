"""Benchmark: where a run's fixed cost goes (validation, plan checks, the look for an application,
the final verification), on the engine benchmark's table.

Run manually (not part of pytest):

    python benchmarks/bench_fixed_cost.py [--rows 2000000] [--repeats 3] [--base-tree /tmp/backfill-base]

Each repeat runs the engine (default spec, one connection, ``targetDuration: 20ms``) from an
identical physical copy of the seed (``bench_engine.py``'s seed: demo customers, about half
matching ``where``) and times its phases by wrapping the engine's own functions: ``_validate``
(target, permissions, fragments, health query), ``checkpointing.plan`` (plan checks, shard
bounds, checkpoint rows), the throttle's pre-run look (``Governor.begin`` and, where it exists,
``PreRunLook.finish``), the batches (first batch start to last batch end) and ``_Shard._verify``
(the final count). ``--base-tree`` runs the same measurement, round-robin in the same repeat, with
the engine of another source tree (e.g. ``git archive <commit> worker | tar -x -C /tmp/base``)
in a subprocess: the before/after of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PHASES = ("validate", "plan", "look", "batches", "verify", "other", "total")


def measure(dsn: str, where: str) -> dict[str, float]:
    """One run in this process (whatever ``backfill_worker`` is importable): seconds per phase."""
    from backfill_api.manifest import parse_backfill
    try:  # the layered engine (issue 18)
        from backfill_worker.observe.events import BatchCommitted, Event
        from backfill_worker.run import checkpointing, engine
        from backfill_worker.throttles import impact_governor
    except ImportError:  # a base tree from before the layers (--base)
        from backfill_worker import checkpointing, engine, impact_governor  # type: ignore[attr-defined,no-redef]
        from backfill_worker.events import BatchCommitted, Event  # type: ignore[import-not-found,no-redef]

    spent: dict[str, float] = {}
    originals: list[tuple[Any, str, Any]] = []

    def timed(owner: Any, name: str, phase: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)
        originals.append((owner, name, original))

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - started

        setattr(owner, name, wrapper)

    timed(engine, "_validate", "validate")
    timed(checkpointing, "plan", "plan")
    timed(impact_governor.Governor, "begin", "look")
    if hasattr(impact_governor, "PreRunLook"):
        timed(impact_governor.PreRunLook, "finish", "look")
    timed(engine._Shard, "_verify", "verify")
    batches: list[float] = []

    def listen(event: Event) -> None:
        if isinstance(event, BatchCommitted):
            now = time.perf_counter()
            if not batches:
                batches.append(now - event.duration_seconds)
            batches[1:] = [now]

    backfill = parse_backfill({
        "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": "fixed", "namespace": "bench"},
        "spec": {"table": "customers", "set": {"status": "'inactive'"}, "where": where,
                 "batch": {"size": 5000, "minSize": 1000, "maxSize": 1_000_000, "targetDuration": "20ms"}},
    })
    started = time.perf_counter()
    try:
        report = engine.run_backfill(backfill, dsn, listeners=[listen])
    finally:
        for owner, name, original in originals:  # the next run wraps them afresh
            setattr(owner, name, original)
    total = time.perf_counter() - started
    assert report.state == "done" and report.remaining_matches == 0, report
    spent["batches"] = batches[-1] - batches[0]
    spent["total"] = total
    # Between the batches' end and the end of the run, less the verification; before the first
    # batch, less what is timed: connection set-up, locks, thread start.
    spent["other"] = total - sum(spent.get(p, 0.0) for p in ("validate", "plan", "look", "batches", "verify"))
    spent["rows"] = report.rows_updated
    return spent


def measure_in(tree: str, dsn: str, where: str) -> dict[str, float]:
    """:func:`measure` with the engine of another source tree, in a subprocess."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tree) / "worker"), str(HERE)])}
    out = subprocess.run([sys.executable, str(Path(__file__)), "--child", dsn, where], env=env, check=True,
                         capture_output=True, text=True).stdout
    figures: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base-tree", default=None, help="another source tree to measure side by side (before)")
    parser.add_argument("--child", nargs=2, metavar=("DSN", "WHERE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    sys.path.insert(0, str(HERE))
    import bench_engine

    from backfill_cli.localpg import LocalPostgres

    variants = (["base"] if args.base_tree else []) + ["this"]
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with LocalPostgres(settings=bench_engine.SETTINGS) as server:
        started = time.perf_counter()
        bench_engine.seed_database(server, args.rows)
        print(f"seeded {args.rows:,} rows in {time.perf_counter() - started:.1f} s; load {os.getloadavg()[0]:.1f}", flush=True)
        for repeat in range(args.repeats):
            for variant in variants:
                dsn = bench_engine.fresh_run_db(server)
                load = os.getloadavg()[0]
                got = measure_in(args.base_tree, dsn, bench_engine.WHERE) if variant == "base" else measure(
                    dsn, bench_engine.WHERE)
                results[variant].append(got)
                print(f"[{repeat + 1}] {variant:<4} load {load:.1f} " + " ".join(
                    f"{p} {got.get(p, 0.0) * 1000:.0f}ms" for p in PHASES), flush=True)
    print("\n| phase | " + " | ".join(f"{v} ms, median (min–max)" for v in variants) + " |")
    print("|---|" + "---:|" * len(variants))
    for phase in PHASES:
        cells = []
        for variant in variants:
            values = [r.get(phase, 0.0) * 1000 for r in results[variant]]
            cells.append(f"{statistics.median(values):.0f} ({min(values):.0f}–{max(values):.0f})")
        print(f"| {phase} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
