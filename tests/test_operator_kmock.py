"""The controller end to end over real HTTP against kmock (the test plays the Job controller).

The real operator (kopf, our handlers, our REST client) runs in a thread against kmock's HTTP
server; the test talks to the same server with the same client, as ``kubectl`` would.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from kube_support.emulator import ApiServerEmulator, declare_resources
from kube_support.operator_thread import operator_running_async
from kube_support.waiting import call, eventually_async, operator_has_looked
from manifests import backfill_document

from backfill_api.kubeapi import (
    KubeApi,
    backfill_path,
    core_path,
    jobs_path,
)
from backfill_operator.main import OperatorConfig

pytestmark = [pytest.mark.kmock(cls=ApiServerEmulator), pytest.mark.timeout(120)]
NS = "shop"
PASSWORD = "s3cr3t-kmock-pw"


def backfill(name: str = "customers-inactive", **spec: Any) -> dict[str, Any]:
    return backfill_document(name, NS, **{
        "database": {"dsnSecretRef": {"name": "shop-db", "key": "dsn"}},
        "table": "public.customers",
        "set": {"status": "'inactive'"},
        "where": "status IS NULL",
        **spec,
    })


def secret() -> dict[str, Any]:
    dsn = f"postgresql://app:{PASSWORD}@db.shop:5432/shop"
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "shop-db", "namespace": NS},
            "data": {"dsn": base64.b64encode(dsn.encode()).decode()}}


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


@pytest.fixture
async def cluster(kmock):
    declare_resources(kmock)
    api = KubeApi.from_environment(server=str(kmock.url))
    yield kmock, api
    api.close()


def config(kmock) -> OperatorConfig:
    return OperatorConfig(namespaces=(NS,), server=str(kmock.url), metrics_port=None, resync_seconds=0.3)


async def test_backfill_runs_to_succeeded_with_progress_events_and_restart(cluster):
    kmock, api = cluster
    await call(api.create, core_path(NS, "secrets"), secret())
    async with operator_running_async(config(kmock)):
        created = await call(api.create, backfill_path(NS), backfill())
        uid = created["metadata"]["uid"]
        job = await eventually_async(lambda: api.get(jobs_path(NS, "customers-inactive-s0-r1")), "the worker Job")
        assert job["metadata"]["ownerReferences"][0]["uid"] == uid
        env = job["spec"]["template"]["spec"]["containers"][0]["env"]
        assert env[0]["valueFrom"]["secretKeyRef"] == {"name": "shop-db", "key": "dsn"}
        pending = await eventually_async(lambda: (b := api.get(backfill_path(NS, "customers-inactive")))["status"]["phase"] == "Pending" and b, "Pending")
        assert condition(pending, "Reconciling")["status"] == "True"
        assert pending["status"]["jobNames"] == ["customers-inactive-s0-r1"]

        # The Job controller starts a pod; the worker reports progress for shard 0.
        await call(api.merge_patch, jobs_path(NS, "customers-inactive-s0-r1"), {"status": {"active": 1}})
        await call(api.merge_patch, backfill_path(NS, "customers-inactive", status=True), {"status": {"shards": {"0": {
            "state": "running", "run": 1, "rowsUpdated": 500, "batches": 5, "batchSize": 100, "rowsPerSecond": 250.0,
            "percent": 50, "etaSeconds": 2, "estimatedKeys": 1000, "keysDone": 500, "throttleReason": "",
        }}}})
        running = await eventually_async(
            lambda: (b := api.get(backfill_path(NS, "customers-inactive")))["status"].get("progress", {}).get("rowsUpdated") == 500 and b,
            "progress aggregated",
        )
        assert running["status"]["phase"] == "Running"
        assert running["status"]["progress"] == {**running["status"]["progress"], "percent": 50, "eta": "2s", "batchSize": 100}
        assert running["status"]["observedGeneration"] == 1

    # Operator restart while running: the new instance adopts, never duplicates.
    async with operator_running_async(config(kmock)):
        await operator_has_looked(api, backfill_path(NS, "customers-inactive"), "the restarted operator")
        jobs = await call(api.list, jobs_path(NS))
        assert [j["metadata"]["name"] for j in jobs] == ["customers-inactive-s0-r1"]

        await call(api.merge_patch, backfill_path(NS, "customers-inactive", status=True), {"status": {"shards": {"0": {
            "state": "done", "rowsUpdated": 1000, "batches": 10, "percent": 100, "etaSeconds": 0, "keysDone": 1000,
        }}}})
        await call(api.merge_patch, jobs_path(NS, "customers-inactive-s0-r1"), {"status": {
            "active": 0, "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
        done = await eventually_async(lambda: (b := api.get(backfill_path(NS, "customers-inactive")))["status"]["phase"] == "Succeeded" and b, "Succeeded")
        assert condition(done, "Ready")["status"] == "True"
        assert condition(done, "Stalled")["status"] == "False"
        assert done["status"]["progress"]["percent"] == 100 and done["status"]["completedAt"]

    events = await call(api.list, core_path(NS, "events"))
    reasons = [e["reason"] for e in events if e["involvedObject"]["uid"] == uid]
    assert {"Pending", "JobCreated", "Running", "Succeeded"} <= set(reasons)
    posted = [r for r in kmock if r.method == "POST" and "/jobs" in str(r.url)]  # every request kmock served
    assert len(posted) == 1
    everything = str([e for e in events]) + str(await call(api.get, backfill_path(NS, "customers-inactive")))
    assert PASSWORD not in everything


async def test_secret_suspend_resume_and_immutable_fields(cluster):
    kmock, api = cluster
    name = "orders-fix"
    async with operator_running_async(config(kmock)):
        await call(api.create, backfill_path(NS), backfill(name))
        stalled = await eventually_async(
            lambda: (b := api.get(backfill_path(NS, name))).get("status", {}).get("conditions") and condition(b, "Stalled")["status"] == "True" and b,
            "Stalled: Secret missing",
        )
        assert condition(stalled, "Stalled")["reason"] == "SecretNotFound"
        assert "kubectl -n shop create secret generic shop-db" in stalled["status"]["message"]
        assert not await call(api.list, jobs_path(NS))

        await call(api.create, core_path(NS, "secrets"), secret())
        await eventually_async(lambda: api.get(jobs_path(NS, f"{name}-s0-r1")), "Job once the Secret exists")
        await call(api.merge_patch, jobs_path(NS, f"{name}-s0-r1"), {"status": {"active": 1}})
        await call(api.merge_patch, backfill_path(NS, name, status=True), {"status": {"shards": {"0": {"state": "running", "run": 1}}}})
        await eventually_async(lambda: api.get(backfill_path(NS, name))["status"]["phase"] == "Running", "Running")

        # An immutable field changes: Stalled, the Job keeps running the original.
        await call(api.merge_patch, backfill_path(NS, name), {"spec": {"where": "true"}})
        changed = await eventually_async(
            lambda: (b := api.get(backfill_path(NS, name)))["status"]["observedGeneration"] == 2 and b, "observed gen 2")
        assert condition(changed, "Stalled")["reason"] == "ImmutableFieldChanged"
        assert changed["status"]["phase"] == "Running"
        assert "status IS NULL" in changed["metadata"]["annotations"]["backfill.dev/applied-spec"]
        await call(api.merge_patch, backfill_path(NS, name), {"spec": {"where": "status IS NULL"}})
        reverted = await eventually_async(lambda: (b := api.get(backfill_path(NS, name)))["status"]["observedGeneration"] == 3 and b, "gen 3")
        assert condition(reverted, "Stalled")["status"] == "False"

        # Suspend: the Job is deleted; resume: run 2 continues from the checkpoint.
        await call(api.merge_patch, backfill_path(NS, name), {"spec": {"suspend": True}})
        paused = await eventually_async(lambda: (b := api.get(backfill_path(NS, name)))["status"]["phase"] == "Paused" and b, "Paused")
        assert condition(paused, "Ready")["reason"] == "Suspended"
        await eventually_async(lambda: not api.list(jobs_path(NS)), "Job deleted")
        await call(api.merge_patch, backfill_path(NS, name), {"spec": {"suspend": False}})
        await eventually_async(lambda: api.get(jobs_path(NS, f"{name}-s0-r2")), "Job of run 2")
        resumed = await call(api.get, backfill_path(NS, name))
        assert resumed["status"]["run"] == 2

    events = await call(api.list, core_path(NS, "events"))
    reasons = {e["reason"] for e in events}
    assert {"SecretNotFound", "ImmutableFieldChanged", "Resolved", "Paused", "JobDeleted"} <= reasons


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


async def test_operator_metrics_and_liveness_are_served(cluster, caplog):
    kmock, api = cluster
    metrics_port, liveness_port = _free_port(), _free_port()
    await call(api.create, core_path(NS, "secrets"), secret())
    cfg = OperatorConfig(namespaces=(NS,), server=str(kmock.url), metrics_port=metrics_port, resync_seconds=0.3,
                         liveness=f"http://127.0.0.1:{liveness_port}/healthz")
    async with operator_running_async(cfg):
        await call(api.create, backfill_path(NS), backfill("metrics-demo"))
        await eventually_async(lambda: api.get(jobs_path(NS, "metrics-demo-s0-r1")), "the worker Job")
        text = await eventually_async(
            lambda: (t := _scrape(f"http://127.0.0.1:{metrics_port}/metrics")) and 'backfill_operator_backfills{phase="Pending"} 1.0' in t and t,
            "the phase gauge",
        )
        assert "backfill_operator_jobs_created_total 1.0" in text
        ok = next(line for line in text.splitlines() if line.startswith('backfill_operator_reconciles_total{result="ok"}'))
        assert float(ok.split()[-1]) >= 1
        assert 'backfill_operator_reconcile_errors_total{kind="api"}' not in text or 'kind="api"} 0.0' in text
        health = await call(_scrape, f"http://127.0.0.1:{liveness_port}/healthz")
        assert health is not None
    assert PASSWORD not in caplog.text and PASSWORD not in text


async def test_a_foreign_job_with_the_planned_name_is_not_adopted(cluster):
    kmock, api = cluster
    await call(api.create, core_path(NS, "secrets"), secret())
    foreign = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "taken-s0-r1", "namespace": NS},
               "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "x", "image": "busybox"}]}}}}
    await call(api.create, jobs_path(NS), foreign)
    async with operator_running_async(config(kmock)):
        await call(api.create, backfill_path(NS), backfill("taken"))
        stalled = await eventually_async(
            lambda: (b := api.get(backfill_path(NS, "taken"))).get("status", {}).get("conditions") and condition(b, "Stalled")["status"] == "True" and b,
            "Stalled: JobNameTaken",
        )
        assert condition(stalled, "Stalled")["reason"] == "JobNameTaken"
        assert "ownerReferences" not in (await call(api.get, jobs_path(NS, "taken-s0-r1")))["metadata"]
