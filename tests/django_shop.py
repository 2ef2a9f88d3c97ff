"""Driving the example Django project (examples/django) as a user would: ``manage.py`` in a subprocess.

Each call is a fresh process (Django's settings are per process), pointed at the test's own
throwaway database by ``$SHOP_DSN``; ``migrations`` picks a migration package of
tests/django_migrations (``SHOP_MIGRATIONS``) instead of the example's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
SHOP = ROOT / "examples" / "django"
MIGRATION_PACKAGES = Path(__file__).resolve().parent / "django_migrations"


def shop_environment(dsn: str, migrations: str | None = None, **extra: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key not in ("BACKFILL_DSN", "BACKFILL_MODE")}
    environment.update({"SHOP_DSN": dsn, "PYTHONPATH": str(MIGRATION_PACKAGES), **extra})
    if migrations:
        environment["SHOP_MIGRATIONS"] = migrations
    return environment


def manage(dsn: str, *arguments: str, migrations: str | None = None, timeout: float = 120,
           **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *arguments], cwd=SHOP, env=shop_environment(dsn, migrations, **extra),
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def seed_customers(dsn: str, rows: int) -> int:
    """``rows`` customers, every second one not seen for two years; returns how many are stale."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers_customer (email, last_login) "
            "SELECT 'customer' || i || '@example.com', "
            "CASE WHEN i %% 2 = 0 THEN now() - interval '2 years' ELSE now() - interval '1 day' END "
            "FROM generate_series(1, %s) AS i",
            [rows],
        )
        conn.execute("ANALYZE customers_customer")
    return rows // 2


def scalar(dsn: str, query: str) -> object:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
        return row[0] if row else None


def wrong_rows(dsn: str) -> int:
    """Customers whose status disagrees with their last login (examples/django/verify.sql)."""
    return int(scalar(dsn, (SHOP / "verify.sql").read_text()))  # type: ignore[arg-type]
