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
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import yaml
from django_shop import SHOP, scalar, seed_customers, shop_environment
from support_faults.sigkill import kill_mid_run, run_to_the_end

ROWS = 8_000
KILLS = 10
IDENTITY = "shop/customers-inactive-orm"
MANAGE_RUN = (sys.executable, "manage.py", "backfill", "run")

pytestmark = pytest.mark.timeout(240)


def rows_done(conn: psycopg.Connection) -> int:
    """Rows the committed batches changed (the checkpoint)."""
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

    kills = kill_mid_run(manifest, env, KILLS, rng, max_delay=0.25, command=MANAGE_RUN, cwd=SHOP)
    assert kills == KILLS, f"the backfill ended after {kills} kills: too few rows per kill"
    with psycopg.connect(database, autocommit=True) as conn:
        progress_at_last_kill = rows_done(conn)
    assert progress_at_last_kill < stale, "every kill must land mid-run"

    final = run_to_the_end(manifest, env, command=MANAGE_RUN, cwd=SHOP)
    assert final.returncode == 0, final.stderr[-3000:]

    changed = scalar(database, "SELECT count(*) FROM customers_customer WHERE status = 'inactive'")
    audits = scalar(database, "SELECT count(*) FROM customers_customeraudit")
    audited_customers = scalar(database, "SELECT count(DISTINCT customer_id) FROM customers_customeraudit")
    strays = scalar(database, "SELECT count(*) FROM customers_customeraudit a JOIN customers_customer c ON c.id = a.customer_id "
                              "WHERE c.last_login >= now() - interval '365 days' OR a.status IS DISTINCT FROM 'inactive'")
    print(f"FAULT-FIGURES test=django-orm-sigkill seed={seed} kills={kills} rows={ROWS} changed={changed} "
          f"audits={audits} rows_at_last_kill={progress_at_last_kill}")
    assert changed == stale
    assert audits == audited_customers == stale  # one audit row per customer: saved exactly once
    assert strays == 0  # only the customers the backfill was meant to change
    with psycopg.connect(database, autocommit=True) as conn:
        assert rows_done(conn) == stale
