"""The operator's I/O for an OOM-killed worker and for the server's version, over real HTTP
against kmock (the test plays the Job controller and the kubelet): the server's ``/version``
picks the Job form, worker pods are listed only once a Job counts failed ones, and each killed
pod gets exactly one ``OOMKilled`` event however many passes see it."""

from __future__ import annotations

from typing import Any

import pytest
from kmock import ResourceInfo
from kube_support.emulator import ApiServerEmulator, declare_resources
from kube_support.operator_thread import operator_running_async
from kube_support.waiting import call, eventually_async, operator_has_looked
from test_operator_kmock import NS, backfill, config, secret

from backfill_api.kubeapi import KubeApi, backfill_path, core_path, jobs_path
from backfill_operator import jobs

pytestmark = [pytest.mark.kmock(cls=ApiServerEmulator), pytest.mark.timeout(120)]
NAME = "oom"


def oom_pod(pod_name: str) -> dict[str, Any]:
    terminated = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": NS, "uid": f"uid-{pod_name}", "labels": jobs.job_labels(NAME, 0, 1)},
        "spec": {"containers": [{"name": "worker", "image": "x", "resources": {"limits": {"memory": "20Mi"}}}]},
        "status": {"phase": "Failed", "containerStatuses": [{"name": "worker", "state": terminated}]},
    }


@pytest.fixture
async def cluster(kmock):
    declare_resources(kmock)
    verbs = {"get", "list", "watch", "create", "patch", "delete"}
    kmock.resources["v1/pods"] = ResourceInfo(kind="Pod", singular="pod", namespaced=True, verbs=verbs)
    api = KubeApi.from_environment(server=str(kmock.url))
    yield kmock, api
    api.close()


def pod_lists(kmock: Any) -> int:
    return sum(1 for r in kmock if r.method == "GET" and str(r.url.path).endswith(f"/namespaces/{NS}/pods"))


async def test_oom_killed_worker_pods_are_named_once_each(cluster):
    kmock, api = cluster
    await call(api.create, core_path(NS, "secrets"), secret())
    async with operator_running_async(config(kmock)):
        await call(api.create, backfill_path(NS), backfill(NAME))
        job = await eventually_async(lambda: api.get(jobs_path(NS, f"{NAME}-s0-r1")), "the worker Job")
        # kmock says it is Kubernetes 1.26: the Job has the podFailurePolicy.
        assert job["spec"]["podFailurePolicy"] == jobs.pod_failure_policy()
        await call(api.merge_patch, jobs_path(NS, f"{NAME}-s0-r1"), {"status": {"active": 1}})
        await eventually_async(lambda: api.get(backfill_path(NS, NAME))["status"].get("phase") == "Pending", "Pending")
        assert pod_lists(kmock) == 0, "no failed pod yet: pods are not listed"

        await call(api.create, core_path(NS, "pods"), oom_pod("oom-s0-r1-aaaaa"))
        await call(api.merge_patch, jobs_path(NS, f"{NAME}-s0-r1"), {"status": {"active": 1, "failed": 1}})
        retrying = await eventually_async(
            lambda: "OOMKilled" in (b := api.get(backfill_path(NS, NAME)))["status"]["message"] and b, "the OOM kill named")
        assert "oom-s0-r1-aaaaa" in retrying["status"]["message"] and "retries" in retrying["status"]["message"]
        lists = pod_lists(kmock)
        await eventually_async(lambda: pod_lists(kmock) >= lists + 5, "five more passes")

        await call(api.create, core_path(NS, "pods"), oom_pod("oom-s0-r1-bbbbb"))
        await call(api.merge_patch, jobs_path(NS, f"{NAME}-s0-r1"), {"status": {"active": 0, "failed": 2, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}})
        failed = await eventually_async(
            lambda: (b := api.get(backfill_path(NS, NAME)))["status"]["phase"] == "Failed" and b, "Failed")
        stalled = next(c for c in failed["status"]["conditions"] if c["type"] == "Stalled")
        assert stalled["reason"] == "OOMKilled" and "20Mi" in stalled["message"]
        # The pass that wrote Failed posts its Events after its status write: wait for them.
        await eventually_async(lambda: {"Failed", "OOMKilled"} <= {
            e["reason"] for e in api.list(core_path(NS, "events")) if "bbbbb" in e["message"] or e["reason"] == "Failed"},
            "the Failed pass's Events")
        lists = pod_lists(kmock)
        posts = sum(1 for r in kmock if r.method == "POST" and str(r.url.path).endswith("/events"))
        for _ in range(3):  # passes read the caches (no request to count): edits prove them
            await operator_has_looked(api, backfill_path(NS, NAME), "more passes over the Failed Backfill")
        assert pod_lists(kmock) == lists, "a Failed run's pods are not listed again"
        assert sum(1 for r in kmock if r.method == "POST" and str(r.url.path).endswith("/events")) == posts

    events = [e for e in await call(api.list, core_path(NS, "events")) if e["reason"] == "OOMKilled"]
    assert sorted(e["message"].split("worker pod ")[1].split()[0] for e in events) == ["oom-s0-r1-aaaaa", "oom-s0-r1-bbbbb"]
    assert all(e["type"] == "Warning" for e in events)
