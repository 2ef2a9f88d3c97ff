"""The in-cluster worker over real HTTP (kmock) running the real engine on a real PostgreSQL.

No operator here: the test creates the Backfill object and edits its spec like a user would;
the worker must mirror progress into status at a bounded rate, honour suspend and live tuning,
run the applied (original) change, and keep the password out of everything it writes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kube_support.emulator import ApiServerEmulator, declare_resources
from manifests import backfill_document

from backfill_api.kubeapi import KubeApi, backfill_path
from backfill_api.model import BackfillSpec
from backfill_api.specdiff import APPLIED_SPEC_ANNOTATION, encode_applied, immutable_view
from backfill_worker.checkpoints.checkpoint import ShardCheckpoint
from backfill_worker.kube.worker import KubeControl, StatusProgressStore, run_worker

pytestmark = [pytest.mark.kmock(cls=ApiServerEmulator), pytest.mark.timeout(180)]
NS = "shop"
ROWS = 3000


def make_table(dsn: str, rows: int = ROWS) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id bigint PRIMARY KEY, status text, counter int NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO customers (id, status) SELECT g, CASE WHEN g %% 3 = 0 THEN 'active' END FROM generate_series(1, %s) g", [rows])


def table_state(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE counter = 1), count(*) FILTER (WHERE counter > 1), "
            "count(*) FILTER (WHERE counter = 1 AND id % 3 = 0) FROM customers"
        ).fetchone()
    return {"once": row[0], "twice": row[1], "wrong_rows": row[2]}


def backfill(name: str, **spec: Any) -> dict[str, Any]:
    return backfill_document(name, NS, **{
        "database": {"dsnSecretRef": {"name": "db"}},
        "table": "customers",
        "set": {"counter": "counter + 1", "status": "'inactive'"},
        "where": "status IS NULL",
        "batch": {"size": 100, "minSize": 10, "maxSize": 1000, "targetDuration": "0"},
        **spec,
    })


async def call(fn, *args, **kwargs):
    return await asyncio.to_thread(fn, *args, **kwargs)


@pytest.fixture
async def api(kmock):
    declare_resources(kmock)
    client = KubeApi.from_environment(server=str(kmock.url))
    yield client
    client.close()


def status_patches(kmock, name: str) -> list[Any]:
    return [r for r in kmock if r.method == "PATCH" and str(r.url.path).endswith(f"/backfills/{name}/status")]


async def test_worker_runs_the_shard_and_mirrors_progress_at_a_bounded_rate(kmock, api, database):
    make_table(database)
    await call(api.create, backfill_path(NS), backfill("bf", batch={"size": 100, "minSize": 10, "maxSize": 1000, "targetDuration": "0", "pause": "60ms"}))
    started = time.monotonic()
    code = await call(run_worker, api, NS, "bf", 0, database, run=1, poll_seconds=0.2, patch_interval=0.5)
    elapsed = time.monotonic() - started
    assert code == 0
    assert table_state(database) == {"once": 2000, "twice": 0, "wrong_rows": 0}
    obj = await call(api.get, backfill_path(NS, "bf"))
    shard = obj["status"]["shards"]["0"]
    assert shard["state"] == "done" and shard["rowsUpdated"] == 2000 and shard["run"] == 1
    assert shard["percent"] == 100 and shard["lastKey"] == ["3000"] and not shard.get("lastError")
    assert shard["remainingMatches"] == 0
    assert obj["status"]["progress"]["rowsUpdated"] == 2000 and obj["status"]["progress"]["percent"] == 100
    patches = status_patches(kmock, "bf")
    assert elapsed > 1.0, "the run must be long enough to check the rate bound"
    assert 2 <= len(patches) <= elapsed / 0.5 + 2, (len(patches), elapsed)
    assert "canary" not in json.dumps(obj).lower()


async def test_suspend_stops_at_a_batch_boundary_and_resume_finishes_exactly_once(kmock, api, database):
    make_table(database)
    slow = {"size": 50, "minSize": 10, "maxSize": 1000, "targetDuration": "0", "pause": "50ms"}
    await call(api.create, backfill_path(NS), backfill("bf", batch=slow))
    worker = asyncio.ensure_future(call(run_worker, api, NS, "bf", 0, database, run=1, poll_seconds=0.1, patch_interval=0.2))
    for _ in range(200):
        await asyncio.sleep(0.1)
        shard = ((await call(api.get, backfill_path(NS, "bf"))).get("status") or {}).get("shards", {}).get("0", {})
        if shard.get("rowsUpdated", 0) >= 200:
            break
    # Live tuning first: a bigger fixed batch size takes effect without a restart.
    await call(api.merge_patch, backfill_path(NS, "bf"), {"spec": {"batch": {**slow, "size": 70}}})
    for _ in range(100):
        await asyncio.sleep(0.1)
        shard = (await call(api.get, backfill_path(NS, "bf")))["status"]["shards"]["0"]
        if shard.get("batchSize") == 70:
            break
    assert shard["batchSize"] == 70
    await call(api.merge_patch, backfill_path(NS, "bf"), {"spec": {"suspend": True}})
    assert await asyncio.wait_for(worker, 30) == 0
    paused = (await call(api.get, backfill_path(NS, "bf")))["status"]["shards"]["0"]
    assert paused["state"] == "paused"
    partial = table_state(database)
    assert 0 < partial["once"] < 2000 and partial["twice"] == 0
    assert partial["once"] == paused["rowsUpdated"]

    await call(api.merge_patch, backfill_path(NS, "bf"), {"spec": {"suspend": False, "batch": {**slow, "size": 500, "pause": "0"}}})
    assert await call(run_worker, api, NS, "bf", 0, database, run=2, poll_seconds=0.1, patch_interval=0.2) == 0
    assert table_state(database) == {"once": 2000, "twice": 0, "wrong_rows": 0}
    done = (await call(api.get, backfill_path(NS, "bf")))["status"]["shards"]["0"]
    assert done["state"] == "done" and done["rowsUpdated"] == 2000 and done["run"] == 2


async def test_worker_runs_the_applied_change_not_an_edited_one(api, database):
    make_table(database)
    original = backfill("bf")
    applied = immutable_view(BackfillSpec.model_validate(original["spec"]))
    edited = backfill("bf", where="true")  # an edit the operator refused (ImmutableFieldChanged)
    edited["metadata"]["annotations"] = {APPLIED_SPEC_ANNOTATION: encode_applied(applied)}
    await call(api.create, backfill_path(NS), edited)
    assert await call(run_worker, api, NS, "bf", 0, database, run=1, poll_seconds=0.2, patch_interval=0.2) == 0
    assert table_state(database) == {"once": 2000, "twice": 0, "wrong_rows": 0}


async def test_invalid_sql_is_reported_as_a_permanent_failure_without_the_password(api, database):
    make_table(database)
    await call(api.create, backfill_path(NS), backfill("bf", set={"nosuchcolumn": "1"}))
    code = await call(run_worker, api, NS, "bf", 0, database, run=3, poll_seconds=0.2, patch_interval=0.2)
    assert code == 2
    shard = (await call(api.get, backfill_path(NS, "bf")))["status"]["shards"]["0"]
    assert shard["state"] == "failed" and shard["run"] == 3
    assert shard["lastErrorReason"] == "ValidationFailed" and "nosuchcolumn" in shard["lastError"]
    assert table_state(database)["once"] == 0


async def test_a_python_handler_runs_in_cluster_and_its_failure_reaches_the_status(api, database):
    make_table(database)
    document = backfill("bf", handler={"callable": "catalogue_handlers:deactivate"})
    del document["spec"]["set"]
    await call(api.create, backfill_path(NS), document)
    assert await call(run_worker, api, NS, "bf", 0, database, run=1, poll_seconds=0.2, patch_interval=0.2) == 0
    assert table_state(database) == {"once": 2000, "twice": 0, "wrong_rows": 0}
    shard = (await call(api.get, backfill_path(NS, "bf")))["status"]["shards"]["0"]
    assert shard["state"] == "done" and shard["rowsUpdated"] == 2000 and shard["remainingMatches"] == 0

    failing = backfill("bad", handler={"callable": "catalogue_handlers:raises_with_the_password"})
    del failing["spec"]["set"], failing["spec"]["where"]
    await call(api.create, backfill_path(NS), failing)
    assert await call(run_worker, api, NS, "bad", 0, database, run=1, poll_seconds=0.2, patch_interval=0.2) == 1
    shard = (await call(api.get, backfill_path(NS, "bad")))["status"]["shards"]["0"]
    assert shard["state"] == "failed" and "spec.handler: catalogue_handlers:raises_with_the_password raised ValueError" in shard["lastError"]
    assert "canary" not in json.dumps(shard).lower()
    assert table_state(database)["twice"] == 0  # the failed batch's counter + 1 was rolled back


async def test_status_backed_progress_store_round_trips(api):
    await call(api.create, backfill_path(NS), backfill("bf", checkpoint={"mode": "atLeastOnce"}))
    store = StatusProgressStore(api, NS, "bf")
    assert await call(store.load, 0) is None
    checkpoint = ShardCheckpoint("shop/bf", 0, 1, "abc", None, ("100",), last_key=("42",), rows_updated=42, batches=3)
    await call(store.save, 0, checkpoint)
    assert await call(store.load, 0) == checkpoint


def test_control_folds_suspend_tuning_and_replacement():
    control = KubeControl(api=None, namespace=NS, name="bf", uid="u1")  # type: ignore[arg-type]  (no polling started)
    control.observe({"metadata": {"uid": "u1"}, "spec": {"batch": {"size": 10, "minSize": 1, "maxSize": 20}}})
    assert control.stop_reason() is None and control.tuning().batch.size == 10
    control.observe({"metadata": {"uid": "u1"}, "spec": {"batch": {"size": 0}}})  # invalid: keep the last good one
    assert control.tuning().batch.size == 10
    control.observe({"metadata": {"uid": "u1"}, "spec": {"suspend": True}})
    assert control.stop_reason() == "suspended"
    replaced = KubeControl(api=None, namespace=NS, name="bf", uid="u1")  # type: ignore[arg-type]
    replaced.observe({"metadata": {"uid": "u2"}, "spec": {}})
    assert replaced.stop_reason() == "deleted"


async def test_at_least_once_mode_keeps_progress_in_the_status(api, database):
    make_table(database)
    await call(api.create, backfill_path(NS), backfill("bf", set={"status": "'inactive'"}, checkpoint={"mode": "atLeastOnce"}))
    assert await call(run_worker, api, NS, "bf", 0, database, run=1, poll_seconds=0.2, patch_interval=0.2) == 0
    shard = (await call(api.get, backfill_path(NS, "bf")))["status"]["shards"]["0"]
    saved = json.loads(shard["checkpoint"])
    assert saved["state"] == "done" and saved["rows_updated"] == 2000 and shard["state"] == "done"
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM customers WHERE status = 'inactive'").fetchone()[0] == 2000
        assert conn.execute("SELECT to_regclass('backfill.checkpoints')").fetchone()[0] is None


async def test_worker_cli_on_sigterm_finishes_the_batch_and_exits_0(kmock, api, database, tmp_path):
    """The pod's container command, SIGTERMed mid-run (pod deletion, drain, Backfill deletion)."""
    import os
    import signal
    import subprocess

    import yaml

    make_table(database)
    slow = {"size": 50, "minSize": 10, "maxSize": 1000, "targetDuration": "0", "pause": "100ms"}
    await call(api.create, backfill_path(NS), backfill("bf", batch=slow))
    kubeconfig = tmp_path / "kubeconfig"  # kmock needs no credentials
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "anonymous", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "anonymous"}}],
    }))
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "BACKFILL_DSN": database, "BACKFILL_RUN": "1",
           "BACKFILL_LOG_FORMAT": "json", "BACKFILL_LOG_LEVEL": "INFO"}
    env.pop("BACKFILL_METRICS_PORT", None)
    cli = str(Path(sys.executable).parent / "backfill")
    worker = subprocess.Popen([cli, "worker", "--namespace", NS, "--name", "bf", "--shard", "0"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            await asyncio.sleep(0.1)
            shard = ((await call(api.get, backfill_path(NS, "bf"))).get("status") or {}).get("shards", {}).get("0", {})
            if shard.get("rowsUpdated", 0) >= 100:
                break
        worker.send_signal(signal.SIGTERM)
        output, _ = await call(worker.communicate, timeout=60)
    finally:
        worker.kill()
    assert worker.returncode == 0, output.decode(errors="replace")[-2000:]
    shard = (await call(api.get, backfill_path(NS, "bf")))["status"]["shards"]["0"]
    state = table_state(database)
    assert shard["state"] == "paused" and state["twice"] == 0
    assert 0 < state["once"] < 2000 and state["once"] == shard["rowsUpdated"]
    assert b"canary" not in output.lower()


async def test_two_shards_run_by_two_workers_change_every_row_once(api, database):
    make_table(database)
    await call(api.create, backfill_path(NS), backfill("bf", parallelism=2))
    codes = await asyncio.gather(*(
        call(run_worker, api, NS, "bf", shard, database, run=1, poll_seconds=0.2, patch_interval=0.2) for shard in (0, 1)
    ))
    # Two first runs racing on CREATE SCHEMA/TABLE IF NOT EXISTS of the checkpoint table can fail
    # one worker (a PostgreSQL catalog race, reported to the engine); in a cluster the Job starts
    # a new pod, played here by running the failed shard again.
    for shard, code in enumerate(codes):
        if code != 0:
            codes[shard] = await call(run_worker, api, NS, "bf", shard, database, run=1, poll_seconds=0.2, patch_interval=0.2)
    assert codes == [0, 0]
    assert table_state(database) == {"once": 2000, "twice": 0, "wrong_rows": 0}
    status = (await call(api.get, backfill_path(NS, "bf")))["status"]
    assert {s: status["shards"][s]["state"] for s in ("0", "1")} == {"0": "done", "1": "done"}
    assert status["shards"]["0"]["rowsUpdated"] + status["shards"]["1"]["rowsUpdated"] == 2000
    assert "progress" not in status, "with several shards the operator aggregates, not the workers"


async def test_dry_run_plans_changes_nothing_and_reports_done(api, database):
    make_table(database)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("ANALYZE customers")  # the plan's estimates come from the statistics
    await call(api.create, backfill_path(NS), backfill("bf", dryRun=True))
    assert await call(run_worker, api, NS, "bf", 0, database, run=1, poll_seconds=0.2, patch_interval=0.2) == 0
    shard = (await call(api.get, backfill_path(NS, "bf")))["status"]["shards"]["0"]
    assert shard["state"] == "done" and shard.get("rowsUpdated", 0) == 0
    assert 1000 <= shard["remainingMatches"] <= 3000  # the planner's estimate of rows to change (2000 exactly)
    assert table_state(database)["once"] == 0


async def test_worker_cli_reports_a_missing_backfill_without_a_traceback(kmock, api, tmp_path):
    import os
    import subprocess

    import yaml

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "k",
        "clusters": [{"name": "k", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "u", "user": {}}], "contexts": [{"name": "k", "context": {"cluster": "k", "user": "u"}}],
    }))
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "BACKFILL_DSN": "host=127.0.0.1 password=not-printed-7Q"}
    env.pop("BACKFILL_METRICS_PORT", None)
    cli = str(Path(sys.executable).parent / "backfill")
    result = await call(subprocess.run, [cli, "worker", "--namespace", NS, "--name", "absent"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot read Backfill shop/absent" in result.stderr and "404" in result.stderr
    assert "Traceback" not in result.stderr and "not-printed-7Q" not in result.stdout + result.stderr


async def test_ctid_walk_in_cluster_shards_by_blocks_and_reports_blocks(api, database):
    """``walk: ctid`` through the in-cluster worker: a table without any unique key, two shard
    workers over block ranges, status counting blocks (keysDone = estimatedKeys) and 0 remaining."""
    make_table(database)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("ALTER TABLE customers DROP CONSTRAINT customers_pkey")
    blocks = {"size": 3, "minSize": 1, "maxSize": 3, "targetDuration": "0"}
    await call(api.create, backfill_path(NS), backfill("bf", walk="ctid", parallelism=2, batch=blocks))
    for shard in (0, 1):  # one after the other: the first creates the checkpoint table
        assert await call(run_worker, api, NS, "bf", shard, database, run=1, poll_seconds=0.2, patch_interval=0.2) == 0
    assert table_state(database) == {"once": 2000, "twice": 0, "wrong_rows": 0}
    shards = (await call(api.get, backfill_path(NS, "bf")))["status"]["shards"]
    for shard in ("0", "1"):
        assert shards[shard]["state"] == "done" and shards[shard]["remainingMatches"] == 0
        assert shards[shard]["keysDone"] == shards[shard]["estimatedKeys"] > 0 and shards[shard]["percent"] == 100
    assert shards["0"]["rowsUpdated"] + shards["1"]["rowsUpdated"] == 2000


async def test_the_first_shard_writes_the_plans_estimate_before_its_first_batch(kmock, api, database):
    make_table(database)
    with psycopg.connect(database, autocommit=True) as conn:  # a row trigger: the estimate lists the warning
        conn.execute("CREATE FUNCTION keep() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$")
        conn.execute("CREATE TRIGGER customers_keep BEFORE UPDATE ON customers FOR EACH ROW EXECUTE FUNCTION keep()")
    await call(api.create, backfill_path(NS), backfill("bf"))
    assert await call(run_worker, api, NS, "bf", 0, database, run=1, poll_seconds=0.2, patch_interval=0.2) == 0
    bodies = [r.data["status"] for r in status_patches(kmock, "bf")]
    first_batch = next(i for i, body in enumerate(bodies) if (body.get("shards", {}).get("0") or {}).get("batches"))
    estimates = [i for i, body in enumerate(bodies) if "estimate" in body]
    assert len(estimates) == 1 and estimates[0] < first_batch
    estimate = (await call(api.get, backfill_path(NS, "bf")))["status"]["estimate"]
    # Scaled from the first 100 keys (67 match) to the table's ~3,000: an estimate near the 2,000 rows.
    assert 1900 <= estimate["rows"] <= 2100 and 29 <= estimate["batches"] <= 31 and estimate["duration"]
    assert estimate["warnings"] == ["row-triggers"] and "sample batch" in estimate["basis"]
    assert estimate["walBytes"] > 0 and estimate["deadTuples"] == estimate["rows"]
    # A restart (the estimate is there) does not plan again.
    assert await call(run_worker, api, NS, "bf", 0, database, run=2, poll_seconds=0.2, patch_interval=0.2) == 0
    assert sum("estimate" in r.data["status"] for r in status_patches(kmock, "bf")) == 1


async def test_the_worker_waits_for_its_backfills_previous_session_then_runs_exactly_once(kmock, api, database):
    # What a restarted pod meets: the killed pod's backend (same application_name) still holds the lock.
    make_table(database)
    await call(api.create, backfill_path(NS), backfill("bf"))
    with psycopg.connect(database, autocommit=True, application_name=f"backfill {NS}/bf") as previous:
        previous.execute("SELECT pg_advisory_lock(hashtext('backfill:' || %s), 0)", [f"{NS}/bf"])
        # ...and is still running the killed batch's statement (a killed pod's backend finishes it, then exits).
        finishing = asyncio.ensure_future(asyncio.to_thread(previous.execute, "SELECT pg_sleep(2.5)"))
        await asyncio.sleep(0.2)
        worker = asyncio.ensure_future(call(run_worker, api, NS, "bf", 0, database, run=2, poll_seconds=0.2, patch_interval=0.2))
        await asyncio.sleep(1.5)
        assert not worker.done() and table_state(database)["once"] == 0  # waiting: nothing changed
        await finishing
    assert await worker == 0  # the session ended: the lock is free
    assert table_state(database) == {"once": 2000, "twice": 0, "wrong_rows": 0}
