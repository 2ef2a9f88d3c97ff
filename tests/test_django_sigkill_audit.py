"""Exactly once with model code and signals, under SIGKILL: the example shop's ORM handler
(``save()`` per customer, a ``post_save`` receiver writing an audit row) runs as a real
``manage.py backfill run`` subprocess over 8,000 customers (4,000 to change), is SIGKILLed at random moments
mid-run at least 10 times, and resumed each time. Afterwards: one audit row per changed
customer, no customer changed twice, none skipped. The kill delays are random: the seed is
printed (``FAULT-FIGURES`` line) and ``BACKFILL_TEST_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import yaml
from django_shop import SHOP, scalar, seed_customers, shop_environment

ROWS = 8_000
KILLS = 10
IDENTITY = "shop/customers-inactive-orm"

pytestmark = pytest.mark.timeout(240)


def rows_done(conn: psycopg.Connection) -> int:
    """Rows the committed batches changed (the checkpoint), 0 before the first commit."""
    if not conn.execute("SELECT to_regclass('backfill.checkpoints')").fetchone()[0]:  # type: ignore[index]
        return 0
    row = conn.execute("SELECT coalesce(sum(rows_updated), 0) FROM backfill.checkpoints WHERE identity = %s", [IDENTITY]).fetchone()
    return int(row[0]) if row else 0


def fast_manifest(directory: Path) -> Path:
    """The example's ORM manifest (the same change: same fingerprint) without the application-impact
    throttle (no application runs here, and the test's time budget is small), with small first
    batches so that every kill lands a few batches into a run."""
    document = yaml.safe_load((SHOP / "backfill-orm.yaml").read_text())
    document["spec"]["limits"] = {"applicationImpact": {"mode": "fast"}}
    document["spec"]["batch"] = {"size": 100}
    path = directory / "backfill-orm-fast.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def start_worker(dsn: str, manifest: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "manage.py", "backfill", "run", str(manifest), "--json-progress"],
        cwd=SHOP, env=shop_environment(dsn), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def test_orm_handler_with_post_save_audit_is_exactly_once_across_sigkills(database: str, tmp_path: Path):
    seed = int(os.environ.get("BACKFILL_TEST_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    print(f"seed={seed} (replay: BACKFILL_TEST_SEED={seed})")
    env = shop_environment(database)
    migrated = subprocess.run([sys.executable, "manage.py", "migrate", "customers", "0001"], cwd=SHOP, env=env,
                              capture_output=True, text=True, check=False)
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    stale = seed_customers(database, ROWS)
    manifest = fast_manifest(tmp_path)

    kills, progress_at_kill = 0, []
    with psycopg.connect(database, autocommit=True) as watcher:
        while kills < KILLS:
            before = rows_done(watcher)
            worker = start_worker(database, manifest)
            deadline = time.monotonic() + 60
            while rows_done(watcher) == before and worker.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.25))  # somewhere in the next batches: mid-transaction or between
            if worker.poll() is not None:  # finished (or failed) before the kill: the run is too short
                break
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            kills += 1
            progress_at_kill.append(rows_done(watcher))
    assert kills == KILLS, f"the backfill ended after {kills} kills (progress {progress_at_kill}): too few rows per kill"
    assert progress_at_kill[-1] < stale, "every kill must land mid-run"

    final = start_worker(database, manifest)
    _, stderr = final.communicate(timeout=180)
    assert final.returncode == 0, stderr.decode(errors="replace")[-3000:]

    changed = scalar(database, "SELECT count(*) FROM customers_customer WHERE status = 'inactive'")
    audits = scalar(database, "SELECT count(*) FROM customers_customeraudit")
    audited_customers = scalar(database, "SELECT count(DISTINCT customer_id) FROM customers_customeraudit")
    strays = scalar(database, "SELECT count(*) FROM customers_customeraudit a JOIN customers_customer c ON c.id = a.customer_id "
                              "WHERE c.last_login >= now() - interval '365 days' OR a.status IS DISTINCT FROM 'inactive'")
    print(f"FAULT-FIGURES test=django-orm-sigkill seed={seed} kills={kills} rows={ROWS} changed={changed} "
          f"audits={audits} progress_at_kills={progress_at_kill}")
    assert changed == stale
    assert audits == audited_customers == stale  # one audit row per customer: saved exactly once
    assert strays == 0  # only the customers the backfill was meant to change
    with psycopg.connect(database, autocommit=True) as conn:
        assert rows_done(conn) == stale
