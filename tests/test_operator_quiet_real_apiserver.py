"""The operator at rest costs the API server next to nothing (issue 21), on a REAL kube-apiserver.

The API server writes an audit log (``ControlPlane(audit=True)``): every request the operator's
ServiceAccount makes is counted by verb and resource over a window, with no Backfill, then with
N idle live Backfills (their worker pods are never scheduled: there is no kubelet), then after
they are all deleted. Creating and deleting still work: exactly one Job per Backfill.
Skipped without ``KUBEBUILDER_ASSETS``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from kube_support.control_plane import ControlPlane
from kube_support.operator_cluster import ASSETS, SLOW_REAL_SERVER, prepare
from kube_support.operator_thread import operator_running
from kube_support.waiting import eventually
from test_kube_real_apiserver import OPERATOR_NS, token_for

from backfill_api.kubeapi import KubeApi, backfill_path, jobs_path
from backfill_operator import rbac
from backfill_operator.main import OperatorConfig

pytestmark = SLOW_REAL_SERVER
NS = "quiet"
IDLE = 50
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NS}:{rbac.OPERATOR_NAME}"
SETTLE, WINDOW = 8.0, 30.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[ControlPlane, KubeApi, Path]]:
    plane = ControlPlane(ASSETS, audit=True).start()  # type: ignore[arg-type]
    try:
        home = tmp_path_factory.mktemp("kube-quiet")
        admin = prepare(plane, home, [NS])
        yield plane, admin, plane.write_kubeconfig(home / "operator", token_for(admin, OPERATOR_NS, rbac.OPERATOR_NAME))
        admin.close()
    finally:
        plane.stop()


def operator_rate(plane: ControlPlane, seconds: float) -> tuple[float, dict[str, int]]:
    """The operator's requests per second over the next ``seconds``, and their count by verb and resource."""
    start = time.time()
    time.sleep(seconds)
    requests = [r for r in plane.audited(start, start + seconds) if r.user == OPERATOR_USER]
    return len(requests) / seconds, dict(Counter(f"{r.verb} {r.resource}" for r in requests).most_common())


def test_idle_operator_requests_do_not_grow_with_backfills(cluster) -> None:
    plane, admin, operator_kubeconfig = cluster
    names = [f"idle-{i:03d}" for i in range(IDLE)]
    pool = ThreadPoolExecutor(max_workers=8)
    figures: dict[str, object] = {"backfills": IDLE, "window_seconds": WINDOW}
    with operator_running(OperatorConfig(kubeconfig=str(operator_kubeconfig), metrics_port=None)):
        time.sleep(SETTLE)
        figures["none_per_second"], figures["none_requests"] = operator_rate(plane, WINDOW)

        list(pool.map(lambda n: admin.create(backfill_path(NS), {
            "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": n, "namespace": NS},
            "spec": {"database": {"dsnSecretRef": {"name": "db"}}, "table": "t", "set": {"v": "1"}}}), names))
        eventually(lambda: all(b.get("status", {}).get("phase") == "Pending"
                               and b["status"].get("jobNames") == [f"{b['metadata']['name']}-s0-r1"]
                               for b in admin.list(backfill_path(NS))) and len(admin.list(backfill_path(NS))) == IDLE,
                   f"{IDLE} Backfills Pending with their Job", timeout=180)
        time.sleep(SETTLE)
        figures["idle_per_second"], figures["idle_requests"] = operator_rate(plane, WINDOW)
        jobs = admin.list(jobs_path(NS))
        assert sorted(j["metadata"]["name"] for j in jobs) == sorted(f"{n}-s0-r1" for n in names), "one Job per Backfill"

        list(pool.map(lambda n: admin.delete(backfill_path(NS, n)), names))
        eventually(lambda: not admin.list(backfill_path(NS)), "all deleted", timeout=120)
        # Right away (no settling): the old operator's burst after a mass delete was here.
        figures["deleted_per_second"], figures["deleted_requests"] = operator_rate(plane, 10.0)
        figures["everyone_after_delete"] = dict(Counter(
            f"{r.user} {r.verb} {r.resource}" for r in plane.audited(time.time() - 10.0)).most_common(8))
    pool.shutdown()
    posted = [r for r in plane.audited() if r.user == OPERATOR_USER and r.verb == "create" and r.resource == "jobs"]
    figures["job_creates"] = Counter(r.code for r in posted)
    print("QUIET-FIGURES " + json.dumps(figures, sort_keys=True, default=str), flush=True)
    assert len(posted) == IDLE and all(r.code == 201 for r in posted), "each Job created once, never a conflict"
    assert figures["none_per_second"] <= 0.1  # type: ignore[operator]
    assert figures["idle_per_second"] <= 1.0  # type: ignore[operator]
    assert figures["deleted_per_second"] <= 0.1  # type: ignore[operator]
