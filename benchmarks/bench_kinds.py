"""Benchmark: batched DELETE and copy (the engine) vs one big ``DELETE`` / ``INSERT … SELECT``.

Run manually (not part of pytest):

    python benchmarks/bench_kinds.py [--rows 500000] [--repeats 3] [--target-ms 20]

The method and helpers are ``bench_engine.py``'s: the demo's ``customers`` table, every phase on
its own physical copy of one ``VACUUM FREEZE ANALYZE``d seed (``CREATE DATABASE … TEMPLATE …
STRATEGY FILE_COPY``, ``pg_prewarm``, ``CHECKPOINT``), phases round-robin within a repeat, ratios
paired within a repeat (median over repeats). The rows: ``last_login`` older than a fixed cutoff
and ``status IS NULL`` (about half). DELETE: ``spec.delete`` vs ``DELETE FROM customers WHERE …``.
Copy: ``spec.copy`` into ``archive.customers`` (same columns, primary key ``id``, empty) with
``onConflict: doNothing`` vs ``INSERT INTO archive.customers SELECT … ON CONFLICT (id) DO NOTHING``.
"Longest txn": the longest batch transaction (engine events), or the one statement's duration.
Every run is checked: exactly the expected rows deleted or copied.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import bench_engine
import psycopg
from bench_engine import Result, fresh_run_db, median_result, paired_ratio, run_engine_spec, run_single_statement

from backfill_cli.localpg import LocalPostgres

ARCHIVE = "CREATE SCHEMA archive; CREATE TABLE archive.customers (LIKE public.customers INCLUDING ALL)"


def scalar(dsn: str, query: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query.encode()).fetchone()
    return int(row[0]) if row else 0


def phases(target_ms: int, rows: int) -> dict[str, tuple[Callable[[str], Result], str]]:
    """name -> (run, the query that must afterwards return the run's row count)."""
    where = bench_engine.WHERE
    deleted = f"SELECT {rows} - count(*) FROM customers"
    copied = "SELECT count(*) FROM archive.customers"
    copy = {"table": "archive.customers", "onConflict": "doNothing"}
    return {
        "delete-engine": (lambda dsn: run_engine_spec(dsn, {"delete": {}, "where": where}, target_ms, 1,
                                                      f"engine delete, targetDuration {target_ms}ms"), deleted),
        "delete-one": (lambda dsn: run_single_statement(dsn, "one big DELETE", f"DELETE FROM customers WHERE {where}"), deleted),
        "copy-engine": (lambda dsn: run_engine_spec(dsn, {"copy": copy, "where": where}, target_ms, 1,
                                                    f"engine copy, targetDuration {target_ms}ms"), copied),
        "copy-one": (lambda dsn: run_single_statement(
            dsn, "one big INSERT … SELECT",
            f"INSERT INTO archive.customers SELECT * FROM customers WHERE {where} ON CONFLICT (id) DO NOTHING"), copied),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target-ms", type=int, default=20, help="engine targetDuration in ms")
    args = parser.parse_args()

    with LocalPostgres(settings=bench_engine.SETTINGS) as server:
        seed_dsn = bench_engine.seed_database(server, args.rows, setup=ARCHIVE)
        expected = scalar(seed_dsn, f"SELECT count(*) FROM customers WHERE {bench_engine.WHERE}")
        print(f"seeded {args.rows:,} rows, {expected:,} of them matching: {bench_engine.WHERE}", flush=True)

        configs = phases(args.target_ms, args.rows)
        results: dict[str, list[Result]] = {name: [] for name in configs}
        for repeat in range(args.repeats):
            for name, (run, check) in configs.items():
                dsn = fresh_run_db(server)
                result = run(dsn)
                assert result.rows == expected == scalar(dsn, check), (name, result.rows, expected)
                results[name].append(result)
                print(f"[{repeat + 1}/{args.repeats}] (load {os.getloadavg()[0]:.1f}) {result.name}: {result.rows:,} rows in "
                      f"{result.seconds:.2f} s = {result.rows_per_second / 1000:.0f}k rows/s, longest txn "
                      f"{result.longest_txn * 1000:.0f} ms, {result.transactions} txns {result.note}", flush=True)
        print_table(results)


def print_table(results: dict[str, list[Result]]) -> None:
    print("\n| Strategy | Rows | Wall s (median) | Rows/s (median) | × one statement | Longest txn (max over runs) | Txns |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        baseline = results[name.split("-")[0] + "-one"]
        m = median_result(runs)
        print(f"| {m.name} | {m.rows:,} | {m.seconds:.2f} | {m.rows_per_second / 1000:.0f}k | "
              f"{paired_ratio(runs, baseline):.2f} | {max(r.longest_txn for r in runs) * 1000:.0f} ms | {m.transactions} |")
    print("\n(× one statement: median of per-repeat ratios of rows/s against the same kind's one statement)")
    for name, runs in results.items():
        print(f"{name} per-run rows/s: {[round(r.rows_per_second) for r in runs]}; median run: {median_result(runs).note}")


if __name__ == "__main__":
    main()
