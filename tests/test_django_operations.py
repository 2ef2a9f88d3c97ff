"""QueueBackfill / EnsureBackfillSucceeded and ``manage.py backfill`` on a real Django project
(examples/django, ``manage.py`` subprocesses) against a real PostgreSQL, and in cluster mode
against kmock over HTTP. Pure decisions (mode, messages, argv, DSN) are tested directly.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from django_shop import SHOP, manage, scalar, seed_customers, shop_environment, wrong_rows
from kube_support.emulator import ApiServerEmulator, declare_resources
from support_faults.kubelet import write_kubeconfig

from backfill_api.errors import ValidationFailed
from backfill_api.kubeapi import KubeApi, backfill_path
from backfill_api.status import Phase
from backfill_django.management.commands.backfill import cli_arguments
from backfill_django.operations import (
    EnsureBackfillSucceeded,
    QueueBackfill,
    atomic_refusal,
    cluster_verdict,
    local_phase,
    local_verdict,
    where_to_run,
)
from backfill_django.sources import backfill_from_callable, from_result
from backfill_worker.checkpoints.checkpoint import ShardCheckpoint

SQL = "bfdj_sql"


def no_traceback(result: Any) -> None:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


# -- on a real project and database -------------------------------------------------------------


def test_queue_runs_the_backfill_in_batches_outside_the_migration_then_ensure_passes(database: str):
    assert manage(database, "migrate", "customers", "0001", migrations=SQL).returncode == 0
    stale = seed_customers(database, 6000)
    result = manage(database, "migrate", migrations=SQL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Applying customers.0002_deactivate..." in result.stdout
    assert f"state=done rows_updated={stale} rows_this_run={stale}" in result.stdout
    assert "Applying customers.0003_status_index... OK" in result.stdout
    assert wrong_rows(database) == 0
    assert scalar(database, "SELECT count(*) FROM customers_customer WHERE status = 'inactive'") == stale
    # Backwards is a no-op (the rows stay changed); forwards again finds the checkpoint done.
    assert manage(database, "migrate", "customers", "0001", migrations=SQL).returncode == 0
    again = manage(database, "migrate", migrations=SQL)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"rows_updated={stale} rows_this_run=0" in again.stdout
    assert scalar(database, "SELECT count(*) FROM customers_customer WHERE status = 'inactive'") == stale
    shown = manage(database, "sqlmigrate", "customers", "0002", migrations=SQL)
    assert shown.returncode == 0 and "-- Queue backfill from backfill.yaml\n--\n-- THIS OPERATION CANNOT BE WRITTEN AS SQL" in shown.stdout


def test_the_example_project_migrates_with_its_orm_handler_ctrl_c_pauses_and_migrate_resumes(database: str):
    """The example's own migrations: 0002 queues backfill-orm.yaml (save() + post_save audit on the
    migration's own Django connection); Ctrl-C pauses it and fails migrate; migrate again resumes it,
    then 0003 (EnsureBackfillSucceeded) passes on the same connection. One audit row per customer."""
    assert manage(database, "migrate", "customers", "0001").returncode == 0
    stale = seed_customers(database, 4000)
    migrate = subprocess.Popen([sys.executable, "manage.py", "migrate"], cwd=SHOP, env=shop_environment(database),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60  # until the first batch committed (its audit rows are visible)
    while time.monotonic() < deadline and not scalar(database, "SELECT count(*) FROM customers_customeraudit"):
        time.sleep(0.05)
    migrate.send_signal(signal.SIGINT)
    _, stderr = migrate.communicate(timeout=60)
    assert migrate.returncode == 1, stderr[-3000:]
    assert "QueueBackfill shop/customers-inactive-orm stopped (paused) after" in stderr
    assert "run `manage.py migrate` again to resume from the checkpoint" in stderr and "Traceback" not in stderr
    paused_at = scalar(database, "SELECT count(*) FROM customers_customeraudit")
    assert 0 < paused_at < stale  # type: ignore[operator]
    resumed = manage(database, "migrate")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"rows_updated={stale} rows_this_run={stale - paused_at}" in resumed.stdout  # type: ignore[operator]
    assert "Applying customers.0003_customer_status_index... OK" in resumed.stdout
    assert wrong_rows(database) == 0
    assert scalar(database, "SELECT count(DISTINCT customer_id) FROM customers_customeraudit") == stale
    assert scalar(database, "SELECT count(*) FROM customers_customeraudit") == stale


def test_ensure_fails_migrate_until_the_backfill_succeeded_then_manage_backfill_finishes_it(database: str):
    assert manage(database, "migrate", "customers", "0001", migrations=SQL).returncode == 0
    stale = seed_customers(database, 3000)
    assert manage(database, "migrate", "customers", "0002", "--fake", migrations=SQL).returncode == 0
    blocked = manage(database, "migrate", migrations=SQL)
    assert blocked.returncode == 1
    no_traceback(blocked)
    assert "BackfillMigrationError: Backfill shop/customers-inactive-sql has no checkpoint in this database: it never ran here" in blocked.stderr
    assert "manage.py backfill run backfill.yaml" in blocked.stderr  # more refusals: tests/test_bad_input_catalogue.py
    assert scalar(database, "SELECT count(*) FROM django_migrations WHERE name = '0003_status_index'") == 0

    plan = manage(database, "backfill", "plan", "backfill.yaml", migrations=SQL)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "plan_ok=true" in plan.stdout and wrong_rows(database) == stale  # planning changes nothing
    run = manage(database, "backfill", "run", "backfill.yaml", migrations=SQL)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"state=done rows_updated={stale}" in run.stdout
    assert manage(database, "migrate", migrations=SQL).returncode == 0
    assert wrong_rows(database) == 0
    # The CLI's own errors and exit codes come through (more: tests/test_bad_input_catalogue.py).
    missing = manage(database, "backfill", "run", "no-such.yaml", migrations=SQL)
    assert missing.returncode == 2 and "no-such.yaml" in missing.stderr
    no_traceback(missing)


def test_queue_from_a_queryset_and_the_manifest_command_compile_the_shipped_sql_manifest(database: str):
    """QueueBackfill(queryset=...) of the historical model runs the change Django's compiler wrote;
    `manage.py backfill manifest` prints exactly the shipped examples/django/backfill.yaml."""
    assert manage(database, "migrate", "customers", "0001", migrations="bfdj_queryset").returncode == 0
    stale = seed_customers(database, 800)
    printed = manage(database, "backfill", "manifest", "customers.backfills:stale_customers", "--name", "customers-inactive-sql",
                     "--namespace", "shop", "--secret", "shop-db", migrations="bfdj_queryset")
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert yaml.safe_load(printed.stdout) == yaml.safe_load((SHOP / "backfill.yaml").read_text())
    queued = manage(database, "migrate", migrations="bfdj_queryset")
    assert queued.returncode == 0, queued.stderr[-3000:]
    assert f"state=done rows_updated={stale} rows_this_run={stale}" in queued.stdout
    assert wrong_rows(database) == 0


# -- cluster mode, over HTTP to kmock ------------------------------------------------------------


@pytest.mark.kmock(cls=ApiServerEmulator)
@pytest.mark.timeout(180)
async def test_cluster_mode_creates_the_backfill_and_ensure_follows_its_status(kmock, database: str, tmp_path):
    declare_resources(kmock)
    kubeconfig = str(write_kubeconfig(tmp_path, str(kmock.url)))
    api = KubeApi.from_environment(server=str(kmock.url))

    def cluster_manage(*arguments: str) -> Any:
        return manage(database, *arguments, migrations=SQL, BACKFILL_MODE="cluster", KUBECONFIG=kubeconfig)

    try:
        assert (await asyncio.to_thread(manage, database, "migrate", "customers", "0001", migrations=SQL)).returncode == 0
        stale = seed_customers(database, 200)
        queued = await asyncio.to_thread(cluster_manage, "migrate", "customers", "0002")
        assert queued.returncode == 0, queued.stderr[-3000:]
        assert "Backfill shop/customers-inactive-sql created in the cluster" in queued.stdout
        obj = await asyncio.to_thread(api.get, backfill_path("shop", "customers-inactive-sql"))
        assert obj["spec"]["set"] == {"status": "'inactive'"} and obj["spec"]["database"]["dsnSecretRef"]["name"] == "shop-db"
        assert wrong_rows(database) == stale  # the operator runs it, not migrate

        pending = await asyncio.to_thread(cluster_manage, "migrate")
        assert pending.returncode == 1
        no_traceback(pending)
        assert "Backfill shop/customers-inactive-sql has not Succeeded (phase Pending" in pending.stderr
        assert "kubectl -n shop wait backfill/customers-inactive-sql --for=condition=Ready" in pending.stderr

        done = {"phase": "Succeeded", "completedAt": datetime.now(UTC).isoformat()}
        await asyncio.to_thread(api.merge_patch, backfill_path("shop", "customers-inactive-sql", status=True), {"status": done})
        finished = await asyncio.to_thread(cluster_manage, "migrate")
        assert finished.returncode == 0, finished.stderr[-3000:]

        # Unapply and reapply: the object with the same change is left alone.
        assert (await asyncio.to_thread(cluster_manage, "migrate", "customers", "0001")).returncode == 0
        requeued = await asyncio.to_thread(cluster_manage, "migrate", "customers", "0002")
        assert requeued.returncode == 0 and "already exists in the cluster with this change" in requeued.stdout
        # Another change under the same name is refused.
        await asyncio.to_thread(api.merge_patch, backfill_path("shop", "customers-inactive-sql"), {"spec": {"where": "true"}})
        assert (await asyncio.to_thread(cluster_manage, "migrate", "customers", "0001")).returncode == 0
        conflict = await asyncio.to_thread(cluster_manage, "migrate", "customers", "0002")
        assert conflict.returncode == 1 and "already exists in the cluster with a different change" in conflict.stderr
        no_traceback(conflict)
    finally:
        api.close()


# -- pure decisions ------------------------------------------------------------------------------


def test_mode_comes_from_the_environment_then_the_setting_then_local():
    assert where_to_run(None, {}) == "local"
    assert where_to_run({"MODE": "cluster"}, {}) == "cluster"
    assert where_to_run({"MODE": "cluster"}, {"BACKFILL_MODE": "local"}) == "local"
    with pytest.raises(ValidationFailed, match="'kubernetes' is not a mode"):
        where_to_run({"MODE": "kubernetes"}, {})


def checkpoint(shard: int, state: str, *, count: int = 2, done: int = 50, error: str | None = None) -> ShardCheckpoint:
    return ShardCheckpoint("shop/c", shard, count, "f1", None, ("100",), rows_updated=done, keys_done=done,
                           estimated_keys=100, state=state, last_error=error)


def test_local_phase_and_message_follow_the_shards():
    assert local_phase([]) is Phase.PENDING
    assert local_phase([checkpoint(0, "done"), checkpoint(1, "done")]) is Phase.SUCCEEDED
    assert local_phase([checkpoint(0, "done")]) is Phase.PENDING  # a shard was never planned
    assert local_phase([checkpoint(0, "done"), checkpoint(1, "paused")]) is Phase.PAUSED
    assert local_phase([checkpoint(0, "running"), checkpoint(1, "failed")]) is Phase.FAILED
    assert local_verdict("shop/c", [checkpoint(0, "done"), checkpoint(1, "done")], fingerprint="f1", how_to_finish="x") is None
    message = local_verdict("shop/c", [checkpoint(0, "done", done=100), checkpoint(1, "failed", done=20, error="boom")],
                            fingerprint=None, how_to_finish="run it")
    assert message == (
        "Backfill shop/c has not Succeeded (phase Failed, 60% of the keys, 120 rows changed, shards: 0 done, 1 failed); "
        "shard 1: boom. This migration needs its data: run it, then run `manage.py migrate` again"
    )
    other = local_verdict("shop/c", [checkpoint(0, "done")], fingerprint="f2", how_to_finish="x")
    assert other is not None and "belongs to a different change" in other


def test_cluster_message_names_phase_progress_and_how_to_wait():
    assert cluster_verdict("shop", "c", {"status": {"phase": "Succeeded"}}) is None
    missing = cluster_verdict("shop", "c", None)
    assert missing is not None and "does not exist in the cluster" in missing
    running = cluster_verdict("shop", "c", {"status": {"phase": "Running", "progress": {"percent": 40, "rowsUpdated": 80, "eta": "2m"}}})
    assert running is not None and "(phase Running; 40%, 80 rows changed; ETA 2m)" in running
    failed = cluster_verdict("shop", "c", {"status": {"phase": "Failed", "message": "shard 0: division by zero"}})
    assert failed == (
        "Backfill shop/c has not Succeeded (phase Failed; shard 0: division by zero). This migration needs its data: "
        "wait for it (`kubectl -n shop wait backfill/c --for=condition=Ready --timeout=24h`), then run `manage.py migrate` again"
    )
    assert "atomic = False" in atomic_refusal("QueueBackfill shop/c")


def test_the_cli_gets_django_s_database_unless_one_is_named():
    assert cli_arguments(["run", "f.yaml"], "dbname=x") == ["run", "f.yaml", "--dsn", "dbname=x"]
    assert cli_arguments(["run", "f.yaml", "--dsn=dbname=y"], "dbname=x") == ["run", "f.yaml", "--dsn=dbname=y"]
    assert cli_arguments(["status", "f.yaml"], None) == ["status", "f.yaml"]


def test_operations_say_what_they_need_and_deconstruct_to_their_arguments():
    with pytest.raises(ValueError, match="either manifest or queryset"):
        QueueBackfill()
    with pytest.raises(ValueError, match="name the Backfill"):
        QueueBackfill(queryset=len)
    with pytest.raises(ValueError, match="either name"):
        EnsureBackfillSucceeded()
    assert QueueBackfill("b.yaml").deconstruct() == ("QueueBackfill", ["b.yaml"], {})
    queued = QueueBackfill(queryset=len, name="n", namespace="shop", spec={"batch": {"size": 10}})
    assert queued.deconstruct() == ("QueueBackfill", [], {"queryset": len, "name": "n", "namespace": "shop", "spec": {"batch": {"size": 10}}})
    assert queued.describe() == "Queue backfill shop/n"
    assert EnsureBackfillSucceeded("n", "shop").deconstruct() == ("EnsureBackfillSucceeded", [], {"name": "n", "namespace": "shop"})


def test_a_manifest_source_must_be_an_importable_function_returning_a_queryset_and_update():
    for path, message in [
        ("customers_backfills", "name a function as module:function"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("json:no_such_function", "'json' has no attribute 'no_such_function'"),
        ("json:__doc__", "is a str, not a function"),
    ]:
        with pytest.raises(ValidationFailed, match=re.escape(message)):
            backfill_from_callable(path, name="n")
    with pytest.raises(ValidationFailed, match=re.escape("returned str: return (queryset, {field: value}) or a Backfill")):
        from_result("x", name="n", namespace="d", spec={}, origin="json:dumps")
