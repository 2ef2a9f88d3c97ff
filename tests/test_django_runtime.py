"""Handlers on Django's connection (``spec.handler.django``), through the real ``backfill`` CLI in
a subprocess (Django is set up once per process) against a real PostgreSQL: ``save()`` and a
``post_save`` receiver commit with the checkpoint, failures roll the batch back, bad settings are
refused before any write."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from manifests import backfill_document, write_manifest
from support_faults.secrets import CANARY_PASSWORD

pytest.importorskip("django")

TESTS = Path(__file__).resolve().parent
SCHEMA = """
CREATE TABLE customers_customer (id serial PRIMARY KEY, email text NOT NULL, status text, last_login timestamptz NOT NULL,
                                 visits int NOT NULL DEFAULT 0);
CREATE TABLE customers_audit (id bigserial PRIMARY KEY, customer_id int NOT NULL, status text);
INSERT INTO customers_customer (email, status, last_login)
SELECT 'c' || g || '@example.com', CASE WHEN g % 7 = 0 THEN 'active' END,
       now() - CASE WHEN g % 2 = 0 THEN interval '2 years' ELSE interval '1 day' END
FROM generate_series(1, 120) g;
"""
STALE = "status IS NULL AND last_login < now() - interval '1 year'"
STALE_COUNT = sum(1 for g in range(1, 121) if g % 7 != 0 and g % 2 == 0)


def manifest(tmp_path: Path, callable_: str = "bf_django_shop.backfills:deactivate", **spec: Any) -> Path:
    body: dict[str, Any] = {
        "table": "customers_customer",
        "where": STALE,
        "handler": {"callable": callable_, "django": {"model": "customers.Customer"}},
        "batch": {"size": 9, "minSize": 1, "maxSize": 9, "targetDuration": "0"},
    }
    body.update(spec)
    return write_manifest(tmp_path, backfill_document("deactivate", "shop", **body))


def backfill(database: str, *args: str, dsn: bool = False, settings: str | None = "bf_django_shop.settings") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BF_SHOP_DSN": database, "PYTHONPATH": str(TESTS), "COLUMNS": "200"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("BACKFILL_DSN", None)
    command = [sys.executable, "-c", "from backfill_cli.app import app; app(prog_name='backfill')", *args]
    if settings is not None:
        command += ["--django-settings", settings]
    if dsn:
        command += ["--dsn", database]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)


def query(dsn: str, statement: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(statement).fetchall()


@pytest.fixture
def shop(database: str) -> str:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(SCHEMA)
    return database


def test_orm_handler_saves_and_signals_commit_with_the_checkpoint(shop: str, tmp_path: Path) -> None:
    path = manifest(tmp_path)
    done = backfill(shop, "run", str(path))  # the DSN comes from Django's DATABASES
    assert done.returncode == 0, done.stderr
    assert f"state=done rows_updated={STALE_COUNT} " in done.stdout and "remaining_matches=0" in done.stdout
    assert CANARY_PASSWORD not in done.stdout + done.stderr
    # Each stale customer saved once, its post_save audit row committed with it; nobody else touched.
    assert query(shop, "SELECT count(*), count(DISTINCT customer_id), min(status) FROM customers_audit") == [
        (STALE_COUNT, STALE_COUNT, "inactive")
    ]
    assert query(shop, "SELECT count(*) FROM customers_customer WHERE status = 'inactive'") == [(STALE_COUNT,)]
    assert query(shop, "SELECT count(*) FROM customers_customer WHERE status = 'active'") == [(17,)]
    planned = backfill(shop, "plan", str(path))  # reads and locks a sample batch, rolled back; no handler call
    assert planned.returncode == 0 and "FOR NO KEY UPDATE" in planned.stdout, planned.stdout + planned.stderr
    reset = backfill(shop, "reset", str(path))  # the DSN from DATABASES again
    assert reset.returncode == 0 and "removed 1 checkpoint row(s)" in reset.stdout, reset.stdout + reset.stderr
    assert query(shop, "SELECT count(*) FROM customers_audit") == [(STALE_COUNT,)]


def test_a_timeout_inside_the_orm_retries_the_batch(shop: str, tmp_path: Path) -> None:
    path = manifest(tmp_path, "bf_django_shop.backfills:slow_once", limits={"statementTimeout": "100ms", "maxRetries": 3})
    done = backfill(shop, "-v", "run", str(path))
    assert done.returncode == 0, done.stderr
    assert "statementTimeout, retry 1" in done.stderr
    assert f"rows_updated={STALE_COUNT} " in done.stdout
    assert query(shop, "SELECT count(*), count(DISTINCT customer_id) FROM customers_audit") == [(STALE_COUNT, STALE_COUNT)]


@pytest.mark.parametrize(
    "callable_,expected",
    [
        ("bf_django_shop.backfills:explode", "raised RuntimeError: bad data after customer None"),
        ("bf_django_shop.backfills:commits", "raised TransactionManagementError: This is forbidden when an 'atomic' block is active"),
    ],
)
def test_failing_orm_handlers_roll_their_batch_back(shop: str, tmp_path: Path, callable_: str, expected: str) -> None:
    failed = backfill(shop, "run", str(manifest(tmp_path, callable_)))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    output = " ".join(failed.stderr.split())
    assert f"spec.handler: {callable_} {expected}" in output
    assert "backfills.py:" in output and "nothing of it was committed" in output
    assert "Traceback" not in failed.stderr and CANARY_PASSWORD not in failed.stdout + failed.stderr
    assert query(shop, "SELECT count(*) FROM customers_audit") == [(0,)]
    assert query(shop, "SELECT count(*) FROM customers_customer WHERE status = 'inactive'") == [(0,)]


@pytest.mark.parametrize(
    "edit,settings,field,message",
    [
        ({"handler": {"callable": "bf_django_shop.backfills:deactivate", "django": {"model": "customers.Nope"}}},
         "bf_django_shop.settings", "spec.handler.django.model", "doesn't have a 'Nope' model"),
        ({}, None, "spec.handler.django.settingsModule", "no Django settings module"),
        ({"table": "customers_audit"}, "bf_django_shop.settings", "spec.table", "customers.Customer's table is 'customers_customer'"),
        ({"parallelism": 2}, "bf_django_shop.settings", "spec.parallelism", "run each of the 2 shards in its own process"),
    ],
    ids=["model-missing", "settings-not-given", "table-not-the-models", "parallel"],  # (settings missing: the catalogue)
)
def test_bad_django_specs_are_refused_before_any_write(
    shop: str, tmp_path: Path, edit: dict[str, Any], settings: str | None, field: str, message: str
) -> None:
    refused = backfill(shop, "run", str(manifest(tmp_path, **edit)), dsn=True, settings=settings)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    output = " ".join(refused.stderr.split())
    assert f"{field}: " in output and message in output, output
    assert CANARY_PASSWORD not in refused.stdout + refused.stderr
    assert query(shop, "SELECT count(*) FROM pg_namespace WHERE nspname = 'backfill'") == [(0,)]
    assert query(shop, "SELECT count(*) FROM customers_audit") == [(0,)]


SHARD_SCRIPT = """
import sys
from backfill_api.manifest import load_backfill
from backfill_worker.run.engine import run_backfill
from backfill_worker.changes.handlers import runtime_for
backfill = load_backfill(sys.argv[1])
runtime = runtime_for(backfill.spec, None)
from django.db import transaction
if sys.argv[2] == "atomic":
    try:
        with transaction.atomic():
            run_backfill(backfill, runtime.dsn, runtime=runtime)
    except Exception as error:
        print(type(error).__name__, error)
    sys.exit(0)
report = run_backfill(backfill, runtime.dsn, shards=[int(sys.argv[2])], runtime=runtime)
from django.db import connection
connection.ensure_connection()  # Django's session is usable again after the run (closed, reopened)
print(report.state, report.rows_updated, connection.cursor().execute("SELECT 1").fetchone()[0])
"""


def script(database: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BF_SHOP_DSN": database, "PYTHONPATH": str(TESTS), "DJANGO_SETTINGS_MODULE": "bf_django_shop.settings"}
    return subprocess.run([sys.executable, "-c", SHARD_SCRIPT, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


def test_shards_run_one_per_process_and_django_is_usable_after(shop: str, tmp_path: Path) -> None:
    # The handler returns None: the objects() it iterated are counted.
    path = manifest(tmp_path, "bf_django_shop.backfills:deactivate_uncounted", parallelism=2)
    counts = []
    for shard in ("0", "1"):
        result = script(shop, str(path), shard)
        assert result.returncode == 0, result.stderr
        state, rows, one = result.stdout.split()
        assert (state, one) == ("done", "1")
        counts.append(int(rows))
    assert sum(counts) == STALE_COUNT and all(counts)
    assert query(shop, "SELECT count(*), count(DISTINCT customer_id) FROM customers_audit") == [(STALE_COUNT, STALE_COUNT)]


def test_a_lost_session_reconnects_through_django_and_changes_each_row_once(shop: str, tmp_path: Path) -> None:
    result = script(shop, str(manifest(tmp_path, "bf_django_shop.backfills:terminate_once")), "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["done", str(STALE_COUNT), "1"]  # and Django's connection works afterwards
    assert query(shop, "SELECT count(*), count(DISTINCT customer_id) FROM customers_audit") == [(STALE_COUNT, STALE_COUNT)]


def test_a_run_inside_an_atomic_block_is_refused(shop: str, tmp_path: Path) -> None:
    result = script(shop, str(manifest(tmp_path)), "atomic")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ValidationFailed spec.handler.django: Django's connection 'default' is inside transaction.atomic()")
    assert "atomic = False" in result.stdout
    assert query(shop, "SELECT count(*) FROM customers_audit") == [(0,)]


QUERYSET_SCRIPT = """
import json, sys
from datetime import timedelta
import django
django.setup()
from django.db.models import F, Value
from django.db.models.functions import Concat, Lower, Now
from django.utils import timezone
from bf_django_shop.customers.models import Customer
from backfill_django.queryset import manifest_document, manifest_from_queryset
from backfill_django.runtime import dsn_from_settings
from backfill_worker.run.engine import run_backfill
Customer.objects.filter(pk__in=[1, 2, 3]).update(email="O'Hara%1@Example.com")  # quote and percent in a parameter
Customer.objects.filter(pk=4).update(email="O'Hara_1@Example.com")  # LIKE's '_' must stay literal
cutoff = timezone.now() - timedelta(days=365)
queryset = Customer.objects.filter(status__isnull=True, last_login__lt=cutoff, email__startswith="O'Hara%")
expected = sorted(queryset.values_list("pk", flat=True))
update = {"status": Concat(Value("inactive since "), F("last_login__year")), "visits": F("visits") + 1, "email": Lower("email")}
backfill = manifest_from_queryset(queryset, update, name="compiled", namespace="shop", batch={"size": 2, "minSize": 1, "maxSize": 2})
report = run_backfill(backfill, dsn_from_settings("default"))
changed = sorted(Customer.objects.filter(visits=1).values_list("pk", flat=True))
print(json.dumps({"spec": manifest_document(backfill)["spec"], "expected": expected, "changed": changed,
                  "rows": report.rows_updated, "remaining": report.remaining_matches,
                  "values": sorted(set(Customer.objects.filter(visits=1).values_list("status", "email")))}))
for bad in (Customer.objects.filter(pk__in=[]), Customer.objects.filter(pk__lt=3)[:1]):
    try:
        manifest_from_queryset(bad, {"status": "x"}, name="bad")
    except Exception as error:
        print(type(error).__name__, error)
try:
    manifest_from_queryset(Customer.objects.all(), {"nope": 1}, name="bad")
except Exception as error:
    print(type(error).__name__, error)
"""


def test_a_queryset_and_update_values_compile_to_a_set_backfill(shop: str) -> None:
    import json

    env = {**os.environ, "BF_SHOP_DSN": shop, "PYTHONPATH": str(TESTS), "DJANGO_SETTINGS_MODULE": "bf_django_shop.settings"}
    result = subprocess.run([sys.executable, "-c", QUERYSET_SCRIPT], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    first, *errors = result.stdout.splitlines()
    outcome = json.loads(first)
    spec = outcome["spec"]
    assert spec["table"] == "customers_customer"
    # psycopg's literal: the quote doubled, LIKE's escaped '%' kept, then Django's own wildcard
    assert "LIKE  E'O''Hara\\\\%%'" in spec["where"], spec["where"]
    assert set(spec["set"]) == {"status", "visits", "email"}
    assert spec["set"]["visits"] == '("customers_customer"."visits" + 1)'
    assert outcome["expected"] == [2] and outcome["changed"] == [2]  # 1 and 3 are recent or active; 4 has '_'
    assert outcome["rows"] == 1 and outcome["remaining"] == 0
    (status, email), = outcome["values"]
    assert status.startswith("inactive since 20") and email == "o'hara%1@example.com"
    assert errors == [
        "ValidationFailed queryset: the filter matches no row at all (e.g. pk__in=[]): nothing to backfill",
        "ValidationFailed queryset: slices, union/intersection, distinct() and aggregation cannot be a backfill: use filter() only",
        "ValidationFailed update.nope: Customer has no field named 'nope'",
    ]
