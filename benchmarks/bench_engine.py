"""Benchmark: the engine vs one big UPDATE vs the row-by-row loop, on 2,000,000 customers.

Run manually (not part of pytest; takes a few minutes):

    python benchmarks/bench_engine.py [--rows 2000000] [--repeats 5] [--row-by-row-ids 100000]
                                      [--target-ms 20,30] [--parallelism 1,2] [--walk key,ctid]

On a machine shared with other work, run it under ``nice -n -5`` (as root) so that the compared
strategies, not the neighbours, decide the numbers; the load average is printed with each run.

Every run starts from the same state, like the reference measurements
(``/work/shared/reference/pg-batch-baselines.md``): the run database is a physical copy of a
``VACUUM FREEZE ANALYZE``d seed (``CREATE DATABASE ... TEMPLATE ... STRATEGY FILE_COPY``), then
``pg_prewarm`` of table and primary key and a ``CHECKPOINT``. Server: fsync and
synchronous_commit on, shared_buffers=1GB, max_wal_size=4GB. Configurations run round-robin,
the medians are reported. Backfill: ``status = 'inactive'`` where ``last_login`` is older than
365 days and ``status IS NULL`` (about half the rows). ``--walk key,ctid`` runs every engine
configuration twice, batching by the primary key and by block ranges (``walk: ctid``, sizes in
blocks), side by side in the same round-robin (docs/ctid.md).

"Longest txn" is the longest time from a transaction's first statement to the end of its
COMMIT, measured by the client: the longest any row lock was held.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from backfill_api.manifest import parse_backfill
from backfill_cli.demo import seed_customers
from backfill_cli.localpg import LocalPostgres
from backfill_worker.observe.events import BatchCommitted, Event
from backfill_worker.run.engine import run_backfill

# A fixed cutoff (set from the seed time in main()): with now() the rows near the cutoff would
# drift into the where clause while the runs go on, and runs would not be comparable.
CUTOFF = "now() - interval '365 days'"
WHERE = ""
CUTOFF_TS = ""


def set_cutoff(timestamp: str) -> None:
    global WHERE, CUTOFF_TS
    CUTOFF_TS = timestamp
    WHERE = f"last_login < timestamptz '{timestamp}' AND status IS NULL"
SEED_DB, RUN_DB = "bench_seed", "bench_run"
SETTINGS = {"fsync": "on", "synchronous_commit": "on", "shared_buffers": "1GB", "max_wal_size": "4GB"}


@dataclass
class Result:
    name: str
    rows: int
    seconds: float
    longest_txn: float
    transactions: int
    note: str = ""

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def seed_database(server: LocalPostgres, rows: int, *, setup: str = "", name: str = SEED_DB) -> str:
    """The seed every run copies: ``rows`` demo customers (plus ``setup`` SQL), ``VACUUM FREEZE
    ANALYZE``d; sets the fixed cutoff (``WHERE``). Returns the seed's DSN."""
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    seed_dsn = server.dsn(dbname=name)
    with psycopg.connect(seed_dsn, autocommit=True) as conn:
        seed_customers(conn, rows)
        if setup:
            conn.execute(setup.encode())
        conn.execute("VACUUM (FREEZE, ANALYZE)")
        set_cutoff(str(conn.execute(f"SELECT ({CUTOFF})::text").fetchone()[0]))  # type: ignore[index]
    return seed_dsn


def fresh_run_db(server: LocalPostgres, *, seed: str = SEED_DB, run: str = RUN_DB, prewarm: tuple[str, ...] = (
    "customers", "customers_pkey",
)) -> str:
    """A physical copy of the seed, its ``prewarm`` relations in shared buffers, right after a CHECKPOINT:
    every run starts from identical pages."""
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(run)))
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(sql.Identifier(run), sql.Identifier(seed))
        )
    dsn = server.dsn(dbname=run)
    with psycopg.connect(dsn, autocommit=True) as conn:
        if prewarm:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
            for relation in prewarm:
                conn.execute("SELECT pg_prewarm(%s)", [relation])
        conn.execute("CHECKPOINT")
    return dsn


def expected_rows(dsn: str, max_id: int | None = None) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        query = f"SELECT count(*) FROM customers WHERE {WHERE}" + (" AND id <= %s" if max_id else "")
        row = conn.execute(query, [max_id] if max_id else None).fetchone()
    return int(row[0]) if row else 0


def changed_rows(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM customers WHERE status = 'inactive'").fetchone()
    return int(row[0]) if row else 0


BLOCK_BATCH = {"size": 100, "minSize": 20, "maxSize": 1_000_000}
"""``walk: ctid`` sizes count blocks: ~107 seeded customers per 8 kB block, so 100 blocks ~ 10,700 rows."""


def run_engine(dsn: str, target_ms: int, parallelism: int = 1, walk: str = "key") -> Result:
    return run_engine_spec(
        dsn, {"set": {"status": "'inactive'"}, "where": WHERE, "walk": walk}, target_ms, parallelism,
        f"engine, walk {walk}, parallelism {parallelism}, targetDuration {target_ms}ms",
    )


def run_engine_spec(dsn: str, change: dict[str, object], target_ms: int, parallelism: int, name: str) -> Result:
    """The engine unthrottled with ``change`` (``set``/``delete``/``copy``, ``where``, ``walk``) on customers,
    timed per batch transaction by the engine's own events."""
    sizes = BLOCK_BATCH if change.get("walk") == "ctid" else {"size": 5000, "minSize": 1000, "maxSize": 1_000_000}
    backfill = parse_backfill({
        "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": "bench", "namespace": "bench"},
        "spec": {
            "table": "customers", **change,
            "batch": {**sizes, "targetDuration": f"{target_ms}ms"},
            "limits": {"maxReplicationLag": "0"},
            "parallelism": parallelism,
        },
    })
    durations: list[float] = []
    first_batch: list[float] = []
    last_batch: list[float] = []

    def listen(event: Event) -> None:
        if isinstance(event, BatchCommitted):
            now = time.perf_counter()
            durations.append(event.duration_seconds)
            if not first_batch:
                first_batch.append(now - event.duration_seconds)
            last_batch[:] = [now]

    started = time.perf_counter()
    report = run_backfill(backfill, dsn, listeners=[listen])
    seconds = time.perf_counter() - started
    assert report.state == "done" and report.remaining_matches == 0
    batches = last_batch[0] - first_batch[0]
    return Result(
        name, report.rows_updated, seconds, max(durations), len(durations),
        f"batch phase {batches:.2f} s = {report.rows_updated / batches / 1000:.0f}k rows/s; "
        f"median txn {statistics.median(durations) * 1000:.0f} ms, "
        f"p99 {sorted(durations)[int(len(durations) * 0.99)] * 1000:.0f} ms, {sum(d > 0.05 for d in durations)} txns > 50 ms",
    )


def run_bare_ranges(dsn: str, walk: str, rows_per_batch: int = 20_000) -> Result:
    """The issue's bare-SQL comparison: a loop of UPDATE + COMMIT over fixed ranges of about
    ``rows_per_batch`` rows, by id (``id > lo AND id <= hi``) or by blocks (``ctid >= '(lo,0)' AND
    ctid < '(hi,0)'``), no checkpoint, no engine."""
    with psycopg.connect(dsn) as conn:
        max_id, blocks, rows = conn.execute(
            "SELECT max(id), pg_relation_size('customers') / current_setting('block_size')::int, count(*) FROM customers"
        ).fetchone()  # type: ignore[misc]
        conn.commit()
        end, step = (max_id, rows_per_batch) if walk == "key" else (blocks, max(1, round(rows_per_batch * blocks / rows)))
        statement = (
            f"UPDATE customers SET status = 'inactive' WHERE id > %s AND id <= %s AND {WHERE}" if walk == "key" else
            f"UPDATE customers SET status = 'inactive' WHERE ctid >= format('(%s,0)', %s::bigint)::tid "
            f"AND ctid < format('(%s,0)', %s::bigint)::tid AND {WHERE}".replace("'(%s,0)'", "'(%%s,0)'")
        )
        changed, longest, transactions = 0, 0.0, 0
        started = time.perf_counter()
        for lower in range(0, end, step):
            txn_started = time.perf_counter()
            changed += conn.execute(statement, [lower, min(lower + step, end)]).rowcount
            conn.commit()
            longest = max(longest, time.perf_counter() - txn_started)
            transactions += 1
        seconds = time.perf_counter() - started
    unit = f"{step:,} ids" if walk == "key" else f"{step:,} blocks"
    return Result(f"bare SQL loop, {walk} ranges of ~{rows_per_batch // 1000}k rows ({unit})", changed, seconds, longest, transactions)


def run_single_update(dsn: str) -> Result:
    return run_single_statement(dsn, "one big UPDATE", f"UPDATE customers SET status = 'inactive' WHERE {WHERE}")


def run_single_statement(dsn: str, name: str, statement: str) -> Result:
    """``statement`` as one transaction: its duration is also its longest transaction."""
    with psycopg.connect(dsn) as conn:
        started = time.perf_counter()
        rows = conn.execute(statement.encode()).rowcount
        conn.commit()
        seconds = time.perf_counter() - started
    return Result(name, rows, seconds, seconds, 1)


def run_row_by_row(dsn: str, max_id: int) -> Result:
    """The seed's loop (the reference's S2): read every row through a server-side cursor, test it
    in Python, UPDATE each match by id, commit every 1000 updates."""
    rows = 0
    longest = 0.0
    transactions = 0
    with psycopg.connect(dsn) as reader, psycopg.connect(dsn) as writer:
        cutoff = reader.execute("SELECT %s::timestamptz", [CUTOFF_TS]).fetchone()[0]  # type: ignore[index]
        started = time.perf_counter()
        txn_started = started
        pending = 0
        with reader.cursor(name="all_customers") as cursor:
            cursor.itersize = 1000
            cursor.execute("SELECT id, last_login, status FROM customers WHERE id <= %s ORDER BY id", [max_id])
            for customer_id, last_login, status in cursor:
                if last_login < cutoff and status is None:
                    if pending == 0:
                        txn_started = time.perf_counter()
                    writer.execute("UPDATE customers SET status = 'inactive' WHERE id = %s", [customer_id])
                    rows += 1
                    pending += 1
                    if pending == 1000:
                        writer.commit()
                        longest = max(longest, time.perf_counter() - txn_started)
                        transactions += 1
                        pending = 0
        writer.commit()
        if pending:
            longest = max(longest, time.perf_counter() - txn_started)
            transactions += 1
        seconds = time.perf_counter() - started
    return Result(f"row-by-row (seed loop), commit/1000, ids <= {max_id:,}", rows, seconds, longest, transactions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--row-by-row-ids", type=int, default=100_000)
    parser.add_argument("--target-ms", default="20,30", help="engine targetDuration(s) in ms, comma-separated")
    parser.add_argument("--parallelism", default="1,2", help="engine parallelism value(s), comma-separated")
    parser.add_argument("--walk", default="key", help="engine walk(s): key, ctid or key,ctid")
    parser.add_argument("--bare", action="store_true", help="also the bare-SQL loops of ~20k-row key and ctid ranges")
    args = parser.parse_args()

    with LocalPostgres(settings=SETTINGS) as server:
        started = time.perf_counter()
        seed_database(server, args.rows)
        print(f"seeded {args.rows:,} rows in {time.perf_counter() - started:.1f} s; where: {WHERE}", flush=True)

        configs: list[tuple[str, Callable[[str], Result]]] = [
            (f"engine-{w}-{t}-{p}", lambda dsn, t=int(t), p=int(p), w=w: run_engine(dsn, t, p, w))
            for t in args.target_ms.split(",") for p in args.parallelism.split(",") for w in args.walk.split(",")
        ]
        if args.bare:
            configs += [(f"bare-{w}", lambda dsn, w=w: run_bare_ranges(dsn, w)) for w in ("key", "ctid")]
        configs += [
            ("update", run_single_update),
            ("rowbyrow", lambda dsn: run_row_by_row(dsn, args.row_by_row_ids)),
        ]
        results: dict[str, list[Result]] = {name: [] for name, _ in configs}
        for repeat in range(args.repeats):
            for name, run in configs:
                dsn = fresh_run_db(server)
                subset = args.row_by_row_ids if name == "rowbyrow" else None
                expected = expected_rows(dsn, subset)
                result = run(dsn)
                assert result.rows == expected == changed_rows(dsn), (name, result.rows, expected)
                results[name].append(result)
                load = os.getloadavg()[0]
                print(f"[{repeat + 1}/{args.repeats}] (load {load:.1f}) {result.name}: {result.rows:,} rows in {result.seconds:.2f} s "
                      f"= {result.rows_per_second / 1000:.0f}k rows/s, longest txn {result.longest_txn * 1000:.0f} ms, "
                      f"{result.transactions} txns {result.note}", flush=True)
        print_table(results)


def median_result(runs: list[Result]) -> Result:
    return sorted(runs, key=lambda r: r.rows_per_second)[len(runs) // 2]


def paired_ratio(runs: list[Result], baseline: list[Result]) -> float:
    """Median over repeats of (this run's rows/s / the same repeat's baseline rows/s).

    Runs of one repeat are seconds apart, so a shared machine's changing load hits both alike.
    """
    return statistics.median(r.rows_per_second / b.rows_per_second for r, b in zip(runs, baseline, strict=False))


def print_table(results: dict[str, list[Result]]) -> None:
    print("\n| Strategy | Rows updated | Wall s (median) | Rows/s (median) | × one UPDATE | × row-by-row | Longest txn (max over runs) | Txns |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for runs in results.values():
        m = median_result(runs)
        longest = max(r.longest_txn for r in runs)
        print(
            f"| {m.name} | {m.rows:,} | {m.seconds:.2f} | {m.rows_per_second / 1000:.0f}k | "
            f"{paired_ratio(runs, results['update']):.2f} | {paired_ratio(runs, results['rowbyrow']):.1f} | "
            f"{longest * 1000:.0f} ms | {m.transactions} |"
        )
    print("\n(× columns: median of per-repeat ratios)")
    for name, runs in results.items():
        print(f"{name} per-run rows/s: {[round(r.rows_per_second) for r in runs]}; median run: {median_result(runs).note}")


if __name__ == "__main__":
    main()
