"""Benchmark: what a backfill costs the application, with PostgreSQL's own pgbench as the application.

Run manually (not part of pytest):

    python benchmarks/bench_app_impact.py [--scale 20] [--clients 4] [--repeats 3]
        [--apps none,random,ahead,read] [--phases none,update,protect,fast,protect-sync,cause-cpu,cause-wal,base]
        [--base-tree /tmp/backfill-base] [--lead-in 3] [--baseline-seconds 10]
        [--out benchmarks/results/app-impact-....json]

Quick look: ``--scale 5 --repeats 1 --apps random --phases none,update,protect,fast``.

The application is ``pgbench`` (Debian's postgresql-15 client, on ``PATH``): ``--clients``
clients, closed loop (each starts its next transaction when the previous one ends), either the
built-in TPC-B-like script on random accounts (``random``), or a script that updates accounts
just ahead of the backfill's checkpoint (``ahead``: it reads the backfill's progress each
transaction, so it runs into the rows the next batches lock), a read-mostly application
(``read``: pgbench's built-in ``select-only`` and ``tpcb-like`` scripts drawn 9:1), or no
application (``none``).
The backfill sets a new column ``migrated = true`` on every ``pgbench_accounts`` row
(``100,000 * scale`` rows) with ``where: migrated IS NOT TRUE``.

Every run starts from an identical physical copy of the seeded, ``VACUUM FREEZE ANALYZE``d
database (``CREATE DATABASE ... TEMPLATE ... STRATEGY FILE_COPY``, ``pg_prewarm``,
``CHECKPOINT``); server: fsync and synchronous_commit on, shared_buffers=1GB, max_wal_size=4GB.
pgbench runs ``--lead-in`` seconds before the backfill starts. Its per-transaction log (``-l``)
gives every transaction's start and latency; the application figures cover the transactions
that *started* inside the backfill's window (for phase ``none``: a ``--baseline-seconds`` window).
Phases of one repeat run back to back, round-robin, so ratios are taken within one repeat.

Phases: ``none`` (application alone), ``update`` (one big UPDATE), ``protect`` (the engine's
default spec: the application-impact throttle), ``fast`` (default spec with
``applicationImpact.mode: fast``, i.e. the engine before the throttle), ``protect-sync``
(``protect`` with every batch committed synchronously), and two cause-separation phases that
run ``fast`` on a copy of the table the application never touches: ``cause-wal`` (a logged
copy: the CPU and the WAL, no row locks shared) and ``cause-cpu`` (an UNLOGGED copy: only the
CPU). Causes and protect-sync run only with the ``random`` application. ``protect@R`` is
``protect`` with ``applicationImpact.minThroughputRatio: R`` (e.g. ``protect@0.7``), to compare
budgets within one run. ``base`` is the default spec run by the engine of another source tree
(``--base-tree``, e.g. ``git archive <commit> worker | tar -x -C /tmp/backfill-base``) in a
subprocess: the engine before a change, side by side with it in the same run.

Every figure is reported as median (min-max) over the repeats; per run the longest backfill
transaction, the application's max latency, how long each signal limited the speed
(``limitedBy`` of the throttle's decisions) and the batches that yielded to an application's
row lock.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from backfill_api.manifest import parse_backfill
from backfill_cli.localpg import LocalPostgres
from backfill_worker.checkpoints.checkpoint import CheckpointTable
from backfill_worker.observe.events import BatchCommitted, Event, ImpactObserved, Throttled
from backfill_worker.run.engine import run_backfill
from backfill_worker.throttles import impact_governor

SETTINGS = {"fsync": "on", "synchronous_commit": "on", "shared_buffers": "1GB", "max_wal_size": "4GB"}
SEED_DB, CAUSES_DB, RUN_DB = "app_seed", "app_seed_causes", "app_run"
TABLE = "pgbench_accounts"
WHERE = "migrated IS NOT TRUE"
CAUSE_TABLES = {"cause-cpu": "accounts_unlogged", "cause-wal": "accounts_copy"}
RANDOM_ONLY = ("protect-sync", "cause-cpu", "cause-wal")

AHEAD_SCRIPT = """\
SELECT coalesce(max(last_key[1]::int), 0) AS pos FROM backfill.checkpoints
\\gset
\\set aid least(:pos + random(1, 5000), 100000 * :scale)
\\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
END;
"""
"""The application that updates rows the backfill is about to reach: a random account among the
5,000 after the backfill's checkpoint (what its next batch or two will lock)."""


@dataclass
class AppStats:
    transactions: int
    seconds: float
    tps: float
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class Run:
    repeat: int
    app: str
    phase: str
    load_before: float
    load_after: float
    backfill_seconds: float | None = None
    rows: int | None = None
    rows_per_second: float | None = None
    longest_txn_ms: float | None = None
    p99_txn_ms: float | None = None
    batches: int | None = None
    throttled_seconds: dict[str, float] = field(default_factory=dict)
    impact_last: str | None = None
    limited_by: dict[str, int] = field(default_factory=dict)
    """Decisions of the throttle by what limited the speed."""
    lock_yields: int = 0
    app_stats: AppStats | None = None


def psql(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def seed(server: LocalPostgres, scale: int, causes: bool) -> None:
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(SEED_DB)))
    started = time.perf_counter()
    subprocess.run(
        ["pgbench", "-i", "-q", "-I", "dtGvp", "-s", str(scale), "-h", "127.0.0.1", "-p", str(server.port),
         "-U", "postgres", SEED_DB], check=True, capture_output=True,
    )
    dsn = server.dsn(dbname=SEED_DB)
    psql(dsn, f"ALTER TABLE {TABLE} ADD COLUMN migrated boolean", "CREATE EXTENSION pg_prewarm")
    with psycopg.connect(dsn, autocommit=True) as conn:
        CheckpointTable("backfill").ensure(conn)  # the `ahead` script reads it from the first second
    psql(dsn, "VACUUM (FREEZE, ANALYZE)")
    if causes:
        with psycopg.connect(server.dsn(), autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(CAUSES_DB), sql.Identifier(SEED_DB)))
        psql(
            server.dsn(dbname=CAUSES_DB),
            f"CREATE TABLE accounts_copy AS SELECT * FROM {TABLE}",
            "ALTER TABLE accounts_copy ADD PRIMARY KEY (aid)",
            f"CREATE UNLOGGED TABLE accounts_unlogged AS SELECT * FROM {TABLE}",
            "ALTER TABLE accounts_unlogged ADD PRIMARY KEY (aid)",
            "VACUUM (FREEZE, ANALYZE)",
        )
    print(f"seeded scale {scale} ({100_000 * scale:,} accounts) in {time.perf_counter() - started:.1f} s", flush=True)


def fresh_run_db(server: LocalPostgres, template: str, table: str) -> str:
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(RUN_DB)))
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
            sql.Identifier(RUN_DB), sql.Identifier(template)))
    dsn = server.dsn(dbname=RUN_DB)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for relation in {TABLE, f"{TABLE}_pkey", table, f"{table}_pkey"}:
            conn.execute("SELECT pg_prewarm(%s)", [relation])
        conn.execute("CHECKPOINT")
    return dsn


class Pgbench:
    """pgbench in the background with a per-transaction log; stopped by ending its sessions."""

    def __init__(self, server: LocalPostgres, app: str, clients: int, workdir: Path) -> None:
        self.workdir = workdir
        self.server = server
        args = ["pgbench", "-n", "-c", str(clients), "-j", str(min(clients, 2)), "-T", "3600", "-l",
                "--log-prefix", str(workdir / "pgb"), "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres"]
        if app == "ahead":
            script = workdir / "ahead.sql"
            script.write_text(AHEAD_SCRIPT)
            args += ["-f", str(script), "-D", "scale=" + str(_scale(server))]
        elif app == "read":  # read-mostly: 9 point reads to 1 TPC-B-like write transaction
            args += ["-b", "select-only@9", "-b", "tpcb-like@1"]
        else:
            args += ["-b", "tpcb-like"]
        self.process = subprocess.Popen([*args, RUN_DB], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self) -> list[tuple[float, float]]:
        """(start epoch seconds, latency ms) of every finished transaction."""
        psql(self.server.dsn(), "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pgbench'")
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=30)
        transactions: list[tuple[float, float]] = []
        for log in self.workdir.glob("pgb.*"):
            for line in log.read_text().splitlines():
                parts = line.split()
                if len(parts) < 6 or parts[2] == "failed" or not parts[2].isdigit():
                    continue
                latency_us = int(parts[2])
                end = int(parts[4]) + int(parts[5]) / 1e6
                transactions.append((end - latency_us / 1e6, latency_us / 1000))
            log.unlink()
        return transactions


_SCALE: dict[int, int] = {}


def _scale(server: LocalPostgres) -> int:
    assert server.port is not None
    return _SCALE[server.port]


def app_stats(transactions: list[tuple[float, float]], start: float, end: float) -> AppStats:
    inside = sorted(latency for started, latency in transactions if start <= started <= end)
    seconds = end - start
    if not inside:
        return AppStats(0, seconds, 0.0, 0.0, 0.0, 0.0)
    return AppStats(
        len(inside), seconds, len(inside) / seconds, inside[len(inside) // 2],
        inside[min(len(inside) - 1, int(len(inside) * 0.99))], inside[-1],
    )


def backfill_manifest(phase: str, table: str) -> Any:
    spec: dict[str, Any] = {"table": table, "set": {"migrated": "true"}, "where": WHERE}
    if phase in ("fast", "cause-cpu", "cause-wal"):
        spec["limits"] = {"applicationImpact": {"mode": "fast"}}
    elif phase.startswith("protect@"):  # another throughput budget, side by side with the default
        spec["limits"] = {"applicationImpact": {"minThroughputRatio": float(phase.split("@", 1)[1])}}
    return parse_backfill({"apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill",
                           "metadata": {"name": f"bench-{phase.replace('@', '-')}"}, "spec": spec})


def run_engine(dsn: str, phase: str, table: str, run: Run, base_tree: str | None = None) -> None:
    if phase == "base":
        if not base_tree:
            raise SystemExit("phase base needs --base-tree (a source tree with the engine to compare with)")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(base_tree) / "worker"), str(Path(__file__).parent)])}
        out = subprocess.run([sys.executable, __file__, "--child", dsn, "protect", table], env=env, check=True,
                             capture_output=True, text=True).stdout
        measured = json.loads(out.strip().splitlines()[-1])
    else:
        measured = engine_figures(dsn, phase, table)
    for key, value in measured.items():
        setattr(run, key, value)


def engine_figures(dsn: str, phase: str, table: str) -> dict[str, Any]:
    """One engine run in this process (whichever engine is importable): the Run fields it fills."""
    durations: list[float] = []
    throttled: dict[str, float] = {}
    impact: list[str] = []
    limited: dict[str, int] = {}
    yields = [0]

    def listen(event: Event) -> None:
        if isinstance(event, BatchCommitted):
            durations.append(event.duration_seconds)
        elif isinstance(event, Throttled):
            throttled[event.reason] = throttled.get(event.reason, 0.0) + event.seconds
        elif isinstance(event, ImpactObserved):
            impact.append(event.summary)
            key = str(event.limited_by) or "-"
            limited[key] = limited.get(key, 0) + 1
            yields[0] = max(yields[0], getattr(event, "lock_yields", 0))

    impact_governor.SYNCHRONOUS_COMMIT = phase == "protect-sync"
    try:
        report = run_backfill(backfill_manifest(phase, table), dsn, listeners=[listen])
    finally:
        impact_governor.SYNCHRONOUS_COMMIT = False
    durations.sort()
    return {
        "backfill_seconds": report.duration, "rows": report.rows_updated,
        "rows_per_second": report.rows_updated / report.duration, "longest_txn_ms": durations[-1] * 1000,
        "p99_txn_ms": durations[min(len(durations) - 1, int(len(durations) * 0.99))] * 1000,
        "batches": report.batches, "throttled_seconds": {k: round(v, 2) for k, v in throttled.items()},
        "impact_last": impact[-1] if impact else None, "limited_by": limited, "lock_yields": yields[0],
    }


def run_update(dsn: str, run: Run) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.monotonic()
        rows = conn.execute(f"UPDATE {TABLE} SET migrated = true WHERE {WHERE}").rowcount
        run.backfill_seconds = time.monotonic() - started
    run.rows = rows
    run.rows_per_second = rows / run.backfill_seconds
    run.longest_txn_ms = run.backfill_seconds * 1000


def one_run(server: LocalPostgres, args: argparse.Namespace, repeat: int, app: str, phase: str) -> Run:
    table = CAUSE_TABLES.get(phase, TABLE)
    dsn = fresh_run_db(server, CAUSES_DB if phase in CAUSE_TABLES else SEED_DB, table)
    expected = 100_000 * args.scale
    run = Run(repeat, app, phase, os.getloadavg()[0], 0.0)
    workdir = Path(tempfile.mkdtemp(prefix="bench-pgb-"))
    bench = Pgbench(server, app, args.clients, workdir) if app != "none" else None
    try:
        time.sleep(args.lead_in if bench else 0.5)
        start = time.time()
        if phase == "none":
            time.sleep(args.baseline_seconds)
        elif phase == "update":
            run_update(dsn, run)
        else:
            run_engine(dsn, phase, table, run, args.base_tree)
        end = time.time()
        if bench:
            time.sleep(1.0)  # let transactions that started in the window finish
            run.app_stats = app_stats(bench.stop(), start, end)
            bench = None
    finally:
        if bench:
            bench.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if phase != "none":
        with psycopg.connect(dsn) as conn:
            left = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE migrated IS NOT TRUE").format(
                sql.Identifier(table))).fetchone()
        assert run.rows == expected and left == (0,), (phase, run.rows, expected, left)
    run.load_after = os.getloadavg()[0]
    return run


def describe(run: Run) -> str:
    parts = [f"[{run.repeat + 1}] {run.app:>6} {run.phase:<12} load {run.load_before:.1f}->{run.load_after:.1f}"]
    if run.rows_per_second:
        parts.append(f"backfill {run.backfill_seconds:.2f} s = {run.rows_per_second / 1000:.0f}k rows/s, "
                     f"longest txn {run.longest_txn_ms:.0f} ms")
    if run.app_stats:
        a = run.app_stats
        parts.append(f"app {a.tps:.0f} tps p50 {a.p50_ms:.2f} p99 {a.p99_ms:.2f} max {a.max_ms:.1f} ms")
    if run.throttled_seconds:
        parts.append(f"throttled {run.throttled_seconds}")
    if run.impact_last:
        parts.append(f"impact: {run.impact_last}")
    if run.limited_by:
        parts.append(f"limited by {run.limited_by}")
    if run.lock_yields:
        parts.append(f"lock yields {run.lock_yields}")
    return "; ".join(parts)


def _span(values: list[float], digits: int = 2) -> str:
    if not values:
        return "–"
    low, high = min(values), max(values)
    median = statistics.median(values)
    if len(values) == 1 or round(low, digits) == round(high, digits):
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def _limits(runs: list[Run]) -> str:
    """What limited the speed, over all decisions of these runs: the two most frequent, with their share."""
    counts: dict[str, int] = {}
    for r in runs:
        for key, n in r.limited_by.items():
            counts[key] = counts.get(key, 0) + n
    total = sum(counts.values())
    if not total:
        return "–"
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:2]
    return ", ".join(f"{key} {n / total:.0%}" for key, n in top)


def table(runs: list[Run], apps: list[str], phases: list[str]) -> str:
    """Medians over repeats of per-repeat ratios (min-max in brackets)."""
    lines = [
        ("| application | phase | backfill rows/s vs one UPDATE | app tps vs no backfill | app p99 vs no backfill "
         "| app max latency ms | longest backfill txn ms | backfill s | lock yields | limited by (share of decisions) "
         "| load avg |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    by_key = {(r.repeat, r.app, r.phase): r for r in runs}
    repeats = sorted({r.repeat for r in runs})
    for app in apps:
        for phase in phases:
            mine = [by_key[(i, app, phase)] for i in repeats if (i, app, phase) in by_key]
            if not mine:
                continue
            speed, tps, p99 = [], [], []
            for r in mine:
                update, alone = by_key.get((r.repeat, app, "update")), by_key.get((r.repeat, app, "none"))
                if r.rows_per_second and update and update.rows_per_second:
                    speed.append(r.rows_per_second / update.rows_per_second)
                if r.app_stats and alone and alone.app_stats and alone.app_stats.tps:
                    tps.append(r.app_stats.tps / alone.app_stats.tps)
                    p99.append(r.app_stats.p99_ms / alone.app_stats.p99_ms if r.app_stats.transactions else float("nan"))
            if phase == "none" and mine[0].app_stats:
                tps_cell = f"1.00 ({_span([r.app_stats.tps for r in mine if r.app_stats], 0)} tps)"
                p99_cell = f"1.00 ({_span([r.app_stats.p99_ms for r in mine if r.app_stats], 1)} ms)"
            else:
                tps_cell, p99_cell = _span(tps), _span(p99)
            lines.append(
                f"| {app} | {phase} | {_span(speed)} | {tps_cell} | {p99_cell} "
                f"| {_span([r.app_stats.max_ms for r in mine if r.app_stats], 0)} "
                f"| {_span([r.longest_txn_ms for r in mine if r.longest_txn_ms], 0)} "
                f"| {_span([r.backfill_seconds for r in mine if r.backfill_seconds], 1)} "
                f"| {_span([float(r.lock_yields) for r in mine], 0) if any(r.lock_yields for r in mine) else '–'} "
                f"| {_limits(mine)} "
                f"| {_span([r.load_before for r in mine], 1)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--apps", default="none,random,ahead,read")
    parser.add_argument("--phases", default="none,update,protect,fast,protect-sync,cause-wal,cause-cpu")
    parser.add_argument("--lead-in", type=float, default=3.0, help="seconds of pgbench before the backfill starts")
    parser.add_argument("--baseline-seconds", type=float, default=10.0, help="window of the no-backfill phase")
    parser.add_argument("--out", default=None, help="raw JSON results (default: benchmarks/results/app-impact-<UTC>.json)")
    parser.add_argument("--base-tree", default=None, help="source tree whose engine runs phase base (the before)")
    parser.add_argument("--child", nargs=3, metavar=("DSN", "PHASE", "TABLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(engine_figures(*args.child)))
        return
    apps, phases = args.apps.split(","), args.phases.split(",")
    if shutil.which("pgbench") is None:
        raise SystemExit("pgbench not found: install postgresql-client (Debian: postgresql-client-15)")
    out = Path(args.out or Path(__file__).parent / "results" / f"app-impact-{time.strftime('%Y-%m-%dT%H%M', time.gmtime())}.json")

    runs: list[Run] = []
    with LocalPostgres(settings=SETTINGS) as server:
        assert server.port is not None
        _SCALE[server.port] = args.scale
        seed(server, args.scale, causes="random" in apps and any(p in CAUSE_TABLES for p in phases))
        plan = [(app, phase) for app in apps for phase in phases
                if not (app != "random" and phase in RANDOM_ONLY) and not (app == "none" and phase == "none")]
        for repeat in range(args.repeats):
            for app, phase in plan:
                run = one_run(server, args, repeat, app, phase)
                runs.append(run)
                print(describe(run), flush=True)
    result = table(runs, apps, phases)
    print("\n" + result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "settings": SETTINGS, "cpus": os.cpu_count(),
                               "runs": [asdict(r) for r in runs], "table": result}, indent=1))
    print(f"\nraw results: {out}")


if __name__ == "__main__":
    main()
