"""The Job informer's store (pure) and the informer loop against kmock's watch."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from kube_support.emulator import ApiServerEmulator, declare_resources
from kube_support.waiting import call, eventually_async

from backfill_api.kubeapi import KubeApi, jobs_path
from backfill_operator.informer import Informer, JobStore, is_older, resource_version
from backfill_operator.jobs import LABEL_NAME, MANAGED_BY


def job(name: str, owner: str, rv: str | None, ns: str = "shop", managed: bool = True) -> dict[str, Any]:
    labels = {LABEL_NAME: owner}
    if managed:
        labels["app.kubernetes.io/managed-by"] = MANAGED_BY
    meta: dict[str, Any] = {"name": name, "namespace": ns, "labels": labels}
    if rv is not None:
        meta["resourceVersion"] = rv
    return {"metadata": meta}


def names(jobs: list[dict[str, Any]]) -> list[str]:
    return [j["metadata"]["name"] for j in jobs]


def test_resource_versions_compare_only_when_both_are_numbers() -> None:
    assert resource_version(job("a", "x", "17")) == 17
    assert resource_version(job("a", "x", "opaque")) is None
    assert is_older(job("a", "x", "9"), job("a", "x", "10"))
    assert not is_older(job("a", "x", "10"), job("a", "x", "10"))
    assert not is_older(job("a", "x", "11"), job("a", "x", "10"))
    assert not is_older(job("a", "x", "opaque"), job("a", "x", "10"))
    assert not is_older(job("a", "x", "9"), None)


def test_store_indexes_by_backfill_and_follows_events() -> None:
    store = JobStore()
    store.replace([job("bf-s0-r1", "bf", "5"), job("bf-s1-r1", "bf", "6"), job("other-s0-r1", "other", "7"),
                   job("bf-s0-r1", "bf", "8", ns="elsewhere")])
    assert names(store.for_backfill("shop", "bf")) == ["bf-s0-r1", "bf-s1-r1"]
    assert names(store.for_backfill("elsewhere", "bf")) == ["bf-s0-r1"]
    assert store.apply("DELETED", job("bf-s1-r1", "bf", "9"))
    assert names(store.for_backfill("shop", "bf")) == ["bf-s0-r1"]
    # An event older than what the store holds (the operator's own write) is ignored.
    store.put(job("bf-s0-r2", "bf", "20"))
    assert not store.apply("MODIFIED", job("bf-s0-r2", "bf", "19"))
    assert store.for_backfill("shop", "bf")[-1]["metadata"]["resourceVersion"] == "20"
    assert not store.apply("BOOKMARK", job("bf-s0-r3", "bf", "21"))
    store.remove("shop", "bf-s0-r2")
    assert names(store.for_backfill("shop", "bf")) == ["bf-s0-r1"]
    # A relabelled Job moves between owners; a re-listing of one namespace leaves the others.
    store.apply("MODIFIED", job("bf-s0-r1", "other", "22"))
    assert names(store.for_backfill("shop", "bf")) == [] and len(store.for_backfill("shop", "other")) == 2
    store.replace([], namespace="shop")
    assert len(store) == 1 and names(store.for_backfill("elsewhere", "bf")) == ["bf-s0-r1"]


def test_store_answers_only_the_operators_jobs() -> None:
    store = JobStore()
    store.replace([job("bf-s0-r1", "bf", "5", managed=False)])  # a server that ignored the selector
    assert store.for_backfill("shop", "bf") == []


@pytest.mark.kmock(cls=ApiServerEmulator)
@pytest.mark.timeout(60)
async def test_informer_lists_then_follows_the_watch(kmock) -> None:
    declare_resources(kmock)
    api = KubeApi.from_environment(server=str(kmock.url))
    await call(api.create, jobs_path("shop"), {"apiVersion": "batch/v1", "kind": "Job", **job("bf-s0-r1", "bf", None)})
    store = JobStore()
    informer = Informer(api, jobs_path("shop"), store, namespace="shop", watch_seconds=60, backoff=0.1)
    thread = threading.Thread(target=informer.run, daemon=True)
    thread.start()
    try:
        await eventually_async(informer.synced.is_set, "the first listing")
        assert names(store.for_backfill("shop", "bf")) == ["bf-s0-r1"]
        await call(api.create, jobs_path("shop"), {"apiVersion": "batch/v1", "kind": "Job", **job("bf-s1-r1", "bf", None)})
        await eventually_async(lambda: len(store.for_backfill("shop", "bf")) == 2, "the ADDED event")
        await call(api.delete, jobs_path("shop", "bf-s0-r1"))
        await eventually_async(lambda: names(store.for_backfill("shop", "bf")) == ["bf-s1-r1"], "the DELETED event")
        assert informer.lists == 1, "a healthy watch never lists again"
    finally:
        informer.stop()
        await call(thread.join, 10)
        api.close()
    assert not thread.is_alive(), "stop() ends a blocked watch at once"
