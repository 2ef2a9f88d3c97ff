"""Benchmark: a Python handler (``spec.handler``) vs the same change as SQL ``set``, side by side.

Run manually (not part of pytest):

    python benchmarks/bench_handler.py [--rows 200000] [--repeats 3] [--batch 5000]

Same seed and per-run state as ``bench_engine.py`` (its helpers: the demo's ``customers``, a
``VACUUM FREEZE ANALYZE``d seed copied per run with ``CREATE DATABASE … TEMPLATE … STRATEGY
FILE_COPY``, ``pg_prewarm``, ``CHECKPOINT``), the same change (``status = 'inactive'`` where
``last_login`` is older than a fixed cutoff and ``status IS NULL``: about half the rows), the same
fixed batch of ``--batch`` keys (``targetDuration: 0``, so every variant does the same batches),
round-robin, medians of per-repeat ratios:

* ``set``: the SQL ``set`` (one set-based UPDATE per batch);
* ``handler, one UPDATE``: a handler running that same UPDATE over ``batch.predicate()``;
* ``handler, per row``: ``batch.rows()`` (the locking SELECT), a per-row decision in Python,
  then ``executemany`` of one ``UPDATE … WHERE id = %s`` per row;
* ``handler, per row, one write``: the same rows and Python, written back by one
  ``UPDATE … FROM unnest(%s::bigint[], %s::text[])`` per batch.

Where the time of the per-row handlers goes is measured inside them, per batch: *fetch* (the
``SELECT … FOR NO KEY UPDATE`` and turning rows into dicts), *python* (the per-row loop), *write*
(``executemany``); *engine* is the rest of the batch (key walk, guard, checkpoint, COMMIT).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import bench_engine
import psycopg
from psycopg import sql

from backfill_api.manifest import parse_backfill
from backfill_cli.localpg import LocalPostgres
from backfill_worker.changes.handlers import Batch
from backfill_worker.observe.events import BatchCommitted, Event
from backfill_worker.run.engine import run_backfill

SPLIT: dict[str, float] = {"fetch": 0.0, "python": 0.0, "write": 0.0}
CUTOFF: list[datetime] = []


def one_update(batch: Batch) -> int:
    """The ``set`` change, written by hand as a handler."""
    predicate, params = batch.predicate()
    statement = sql.SQL("UPDATE {} SET status = 'inactive' WHERE {}").format(batch.table_identifier, predicate)
    return int(batch.connection.execute(statement, params).rowcount)


def per_row(batch: Batch) -> int:
    """The seed's loop, per batch: read the rows, decide in Python, update each by id."""
    started = time.perf_counter()
    rows = list(batch.rows())
    fetched = time.perf_counter()
    cutoff = CUTOFF[0]
    ids = [(row["id"],) for row in rows if row["last_login"] < cutoff and row["status"] is None]
    decided = time.perf_counter()
    with batch.connection.cursor() as cursor:
        cursor.executemany("UPDATE customers SET status = 'inactive' WHERE id = %s", ids)
    SPLIT["fetch"] += fetched - started
    SPLIT["python"] += decided - fetched
    SPLIT["write"] += time.perf_counter() - decided
    return len(ids)


def per_row_one_write(batch: Batch) -> int:
    """Per-row Python as in :func:`per_row`, but the batch's new values go back in one statement."""
    started = time.perf_counter()
    rows = list(batch.rows())
    fetched = time.perf_counter()
    cutoff = CUTOFF[0]
    ids = [row["id"] for row in rows if row["last_login"] < cutoff and row["status"] is None]
    statuses = ["inactive"] * len(ids)
    decided = time.perf_counter()
    batch.connection.execute(
        "UPDATE customers SET status = v.status FROM unnest(%s::bigint[], %s::text[]) AS v(id, status) WHERE customers.id = v.id",
        [ids, statuses],
    )
    SPLIT["fetch"] += fetched - started
    SPLIT["python"] += decided - fetched
    SPLIT["write"] += time.perf_counter() - decided
    return len(ids)


@dataclass
class Result:
    name: str
    rows: int
    seconds: float
    batch_seconds: float
    batches: int
    split: dict[str, float] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def run(dsn: str, name: str, change: dict[str, Any], batch: int) -> Result:
    backfill = parse_backfill({
        "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": "bench", "namespace": "bench"},
        "spec": {
            "table": "customers", "where": bench_engine.WHERE, **change,
            "batch": {"size": batch, "minSize": 1, "maxSize": batch, "targetDuration": "0"},
            "limits": {"maxReplicationLag": "0", "applicationImpact": {"mode": "fast"}},
        },
    })
    module = sys.modules.get("bench_handler")  # the handler's copy of this module (imported by the engine)
    if module is not None:
        module.SPLIT.update(fetch=0.0, python=0.0, write=0.0)
    durations: list[float] = []

    def listen(event: Event) -> None:
        if isinstance(event, BatchCommitted):
            durations.append(event.duration_seconds)

    started = time.perf_counter()
    report = run_backfill(backfill, dsn, listeners=[listen])
    seconds = time.perf_counter() - started
    assert report.state == "done" and report.remaining_matches == 0, report
    module = sys.modules.get("bench_handler")
    split = dict(module.SPLIT) if module is not None and name.startswith("handler, per row") else {}
    return Result(name, report.rows_updated, seconds, sum(durations), len(durations), split)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=5000)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    with LocalPostgres(settings=bench_engine.SETTINGS) as server:
        seed_dsn = bench_engine.seed_database(server, args.rows)
        with psycopg.connect(seed_dsn, autocommit=True) as conn:
            cutoff = conn.execute("SELECT %s::timestamptz", [bench_engine.CUTOFF_TS]).fetchone()[0]  # type: ignore[index]
        import bench_handler  # the module the engine imports for the handlers: give it the cutoff

        bench_handler.CUTOFF[:] = [cutoff]
        print(f"seeded {args.rows:,} rows; where: {bench_engine.WHERE}; batch {args.batch} keys", flush=True)

        configs: list[tuple[str, dict[str, Any]]] = [
            ("set", {"set": {"status": "'inactive'"}}),
            ("handler, one UPDATE", {"handler": {"callable": "bench_handler:one_update"}}),
            ("handler, per row", {"handler": {"callable": "bench_handler:per_row"}}),
            ("handler, per row, one write", {"handler": {"callable": "bench_handler:per_row_one_write"}}),
        ]
        results: dict[str, list[Result]] = {name: [] for name, _ in configs}
        for repeat in range(args.repeats):
            for name, change in configs:
                dsn = bench_engine.fresh_run_db(server)
                expected = bench_engine.expected_rows(dsn)
                result = run(dsn, name, change, args.batch)
                assert result.rows == expected == bench_engine.changed_rows(dsn), (name, result.rows, expected)
                results[name].append(result)
                print(f"[{repeat + 1}/{args.repeats}] (load {os.getloadavg()[0]:.1f}) {name}: {result.rows:,} rows in "
                      f"{result.seconds:.2f} s = {result.rows_per_second / 1000:.0f}k rows/s, {result.batches} batches "
                      f"{describe_split(result)}", flush=True)
        print_table(results)


def describe_split(result: Result) -> str:
    if not result.split:
        return ""
    engine = result.batch_seconds - sum(result.split.values())
    parts = {**result.split, "engine": engine}
    return "; " + ", ".join(f"{k} {v:.2f} s ({v / result.batch_seconds:.0%})" for k, v in parts.items())


def paired_ratio(runs: list[Result], baseline: list[Result]) -> float:
    return statistics.median(r.rows_per_second / b.rows_per_second for r, b in zip(runs, baseline, strict=True))


def print_table(results: dict[str, list[Result]]) -> None:
    median: Callable[[list[Result]], Result] = lambda runs: sorted(runs, key=lambda r: r.rows_per_second)[len(runs) // 2]  # noqa: E731
    print("\n| Variant | Rows changed | Wall s (median) | Rows/s (median) | × set | Batches |")
    print("|---|---:|---:|---:|---:|---:|")
    for runs in results.values():
        m = median(runs)
        print(f"| {m.name} | {m.rows:,} | {m.seconds:.2f} | {m.rows_per_second / 1000:.0f}k | "
              f"{paired_ratio(runs, results['set']):.2f} | {m.batches} |")
    print("\n(× set: median of per-repeat ratios; wall includes validation, planning and verification)")
    for name in ("handler, per row", "handler, per row, one write"):
        print(f"{name}: where the batch time goes (median run){describe_split(median(results[name]))}")


if __name__ == "__main__":
    main()
