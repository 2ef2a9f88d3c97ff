"""Benchmark: the seed's naive Django ``RunPython`` vs the Backfill ORM handler vs the Backfill SQL set.

Run manually (not part of pytest; heavy: at 1,000,000 rows the naive migration alone takes minutes):

    python benchmarks/bench_django.py [--rows 1000000] [--interval-ms 20]

The example shop (``examples/django``) on a throwaway PostgreSQL (fsync on): ``--rows`` customers,
every second one not seen for two years (the rows to deactivate). Every variant starts from a
physical copy of the same ``VACUUM FREEZE ANALYZE``d seed and runs as the user would run it, in a
``manage.py`` subprocess, while an application thread (this process) reads and writes one random
customer every ``--interval-ms`` (``SELECT`` then ``UPDATE`` of that row, one transaction each):

* naive ``RunPython`` — ``SHOP_MIGRATIONS=naive manage.py migrate``: ``Customer.objects.all()``,
  ``save()`` per row, one transaction (customers/migrations_naive/0002);
* Backfill, ORM handler — ``manage.py migrate`` (``QueueBackfill("backfill-orm.yaml")``, local
  mode): ``save()`` per row of each batch, the post_save receiver writes an audit row, in the
  batch's transaction;
* Backfill, SQL ``set`` — ``manage.py backfill run backfill.yaml``: one set-based UPDATE per batch.

Reported per variant: wall time of the subprocess (Django's start-up included, about a second),
rows changed per second, the application's longest wait for one transaction while it ran, and
the subprocess's peak memory (``ru_maxrss`` from ``wait4``). Ratios are against the naive run of
the same invocation. Each variant is verified (changed rows == stale rows; audit rows == changed
rows for the ORM handler).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from bench_engine import fresh_run_db
from psycopg import sql

from backfill_cli.localpg import LocalPostgres

ROOT = Path(__file__).resolve().parents[1]
SHOP = ROOT / "examples" / "django"
SEED_DB, RUN_DB = "bench_django_seed", "bench_django_run"
SETTINGS = {"fsync": "on", "synchronous_commit": "on", "shared_buffers": "512MB", "max_wal_size": "4GB"}


@dataclass(frozen=True)
class Variant:
    key: str
    name: str
    arguments: tuple[str, ...]
    environment: tuple[tuple[str, str], ...] = ()
    audits: bool = False


VARIANTS = (
    Variant("naive", "naive RunPython (one transaction, save() per row)", ("migrate", "customers", "0002"), (("SHOP_MIGRATIONS", "naive"),)),
    Variant("orm", "Backfill, ORM handler (save() + post_save audit row)", ("migrate", "customers", "0002"), audits=True),
    Variant("sql", "Backfill, SQL set (manage.py backfill run)", ("backfill", "run", "backfill.yaml")),
)


@dataclass
class Result:
    variant: Variant
    rows: int
    seconds: float
    longest_wait: float
    app_transactions: int
    peak_rss_mb: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


class Application(threading.Thread):
    """One random customer read and written every ``interval`` seconds; remembers the longest wait."""

    def __init__(self, dsn: str, max_id: int, interval: float, seed: int) -> None:
        super().__init__(daemon=True)
        self.dsn, self.max_id, self.interval = dsn, max_id, interval
        self.random = random.Random(seed)
        self.stopping = threading.Event()
        self.longest, self.transactions = 0.0, 0

    def run(self) -> None:
        with psycopg.connect(self.dsn) as conn:
            while not self.stopping.is_set():
                customer = self.random.randint(1, self.max_id)
                started = time.perf_counter()
                conn.execute("SELECT status, last_login FROM customers_customer WHERE id = %s", [customer]).fetchone()
                conn.execute("UPDATE customers_customer SET email = email WHERE id = %s", [customer])
                conn.commit()
                waited = time.perf_counter() - started
                self.longest, self.transactions = max(self.longest, waited), self.transactions + 1
                self.stopping.wait(max(0.0, self.interval - waited))

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def manage(dsn: str, *arguments: str, environment: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``manage.py`` to the end: (seconds, peak RSS in MB, stderr tail); raises on failure."""
    env = {k: v for k, v in os.environ.items() if k not in ("BACKFILL_DSN", "BACKFILL_MODE", "SHOP_MIGRATIONS")}
    env.update({"SHOP_DSN": dsn, **(environment or {})})
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "manage.py", *arguments], cwd=SHOP, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"manage.py {' '.join(arguments)} failed ({process.returncode}): {stderr[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, stderr[-500:]


def seed(server: LocalPostgres, rows: int) -> None:
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(SEED_DB)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(SEED_DB)))
    dsn = server.dsn(dbname=SEED_DB)
    manage(dsn, "migrate", "customers", "0001")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers_customer (id, email, last_login) "
            "SELECT i, 'customer' || i || '@example.com', "
            "CASE WHEN i %% 2 = 0 THEN now() - interval '2 years' ELSE now() - interval '1 day' END "
            "FROM generate_series(1, %s) AS i",
            [rows],
        )
        conn.execute("SELECT setval(pg_get_serial_sequence('customers_customer', 'id'), %s)", [rows])
        conn.execute("VACUUM FREEZE ANALYZE")


def count(dsn: str, query: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def run_variant(server: LocalPostgres, variant: Variant, rows: int, interval: float, app_seed: int) -> Result:
    dsn = fresh_run_db(server, seed=SEED_DB, run=RUN_DB, prewarm=())
    application = Application(dsn, rows, interval, app_seed)
    application.start()
    try:
        seconds, rss, _ = manage(dsn, *variant.arguments, environment=dict(variant.environment))
    finally:
        application.stop()
    changed = count(dsn, "SELECT count(*) FROM customers_customer WHERE status = 'inactive'")
    assert changed == rows // 2, f"{variant.name}: {changed} rows changed, expected {rows // 2}"
    if variant.audits:
        audits = count(dsn, "SELECT count(*) FROM customers_customeraudit")
        distinct = count(dsn, "SELECT count(DISTINCT customer_id) FROM customers_customeraudit")
        assert audits == distinct == changed, f"{variant.name}: {audits} audit rows ({distinct} customers) for {changed} changes"
    return Result(variant, changed, seconds, application.longest, application.transactions, rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--variants", default="naive,orm,sql", help="Which to run, in this order (ratios: against the first).")
    parser.add_argument("--seed", type=int, default=None, help="The application's random customers (printed).")
    args = parser.parse_args()
    app_seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"rows={args.rows:,} interval={args.interval_ms} ms app_seed={app_seed} load={os.getloadavg()}", flush=True)
    with LocalPostgres(settings=SETTINGS) as server:
        started = time.perf_counter()
        seed(server, args.rows)
        print(f"seeded in {time.perf_counter() - started:.1f} s", flush=True)
        results = []
        chosen = [next(v for v in VARIANTS if v.key == key) for key in args.variants.split(",")]
        for variant in chosen:
            result = run_variant(server, variant, args.rows, args.interval_ms / 1000, app_seed)
            print(f"{variant.name}: {result.seconds:.1f} s, {result.rows_per_second:,.0f} rows/s, longest app wait "
                  f"{result.longest_wait * 1000:,.0f} ms over {result.app_transactions:,} app txns, peak RSS "
                  f"{result.peak_rss_mb:,.0f} MB; load={os.getloadavg()}", flush=True)
            results.append(result)
    naive = results[0]
    print(f"\n| variant | wall | rows/s | × {naive.variant.key} rows/s | application's longest wait | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.variant.name} | {r.seconds:.1f} s | {r.rows_per_second:,.0f} | {r.rows_per_second / naive.rows_per_second:.2f} "
              f"| {r.longest_wait * 1000:,.0f} ms | {r.peak_rss_mb:,.0f} MB |")


if __name__ == "__main__":
    main()
