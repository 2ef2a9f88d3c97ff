"""The operator under load on a REAL kube-apiserver (issue 10, item 7).

200 Backfills in 4 namespaces are created at once, then edited (live tuning), suspended,
resumed and deleted. Every one must reach its phase at each step, the Jobs must be created
exactly once per run (the API server's own request counters: POST jobs -> 201), and the
operator's memory (RSS of this process, which runs it) and the API request rate are measured
and printed as FAULT-FIGURES. No worker runs (no kubelet), so the phases are Pending/Paused.
Skipped without ``KUBEBUILDER_ASSETS``.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from kube_support.control_plane import ControlPlane
from kube_support.operator_cluster import ASSETS, SLOW_REAL_SERVER, prepare
from kube_support.operator_thread import operator_running
from kube_support.waiting import eventually
from test_kube_real_apiserver import OPERATOR_NS, token_for

from backfill_api.kubeapi import KubeApi, backfill_path
from backfill_operator import rbac
from backfill_operator.main import OperatorConfig

pytestmark = SLOW_REAL_SERVER
NAMESPACES = [f"load-{i}" for i in range(4)]
PER_NAMESPACE = 50
STEP_TIMEOUT = 180.0


def rss_mib() -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024  # type: ignore[union-attr]


def request_counts(plane: ControlPlane) -> dict[tuple[str, str, str], float]:
    """``apiserver_request_total`` by (verb, resource, code)."""
    counts: dict[tuple[str, str, str], float] = {}
    for line in plane._get("/metrics").decode().splitlines():
        if line.startswith("apiserver_request_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            key = (labels.get("verb", ""), labels.get("resource", ""), labels.get("code", ""))
            counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[ControlPlane, KubeApi, Path]]:
    plane = ControlPlane(ASSETS, audit=True).start()  # type: ignore[arg-type]
    try:
        home = tmp_path_factory.mktemp("kube-load")
        admin = prepare(plane, home, NAMESPACES)
        yield plane, admin, plane.write_kubeconfig(home / "operator", token_for(admin, OPERATOR_NS, rbac.OPERATOR_NAME))
        admin.close()
    finally:
        plane.stop()


def all_backfills(admin: KubeApi) -> list[dict[str, Any]]:
    return [b for ns in NAMESPACES for b in admin.list(backfill_path(ns))]


def every(admin: KubeApi, check: Callable[[dict[str, Any]], bool]) -> bool:
    items = all_backfills(admin)
    return len(items) == len(NAMESPACES) * PER_NAMESPACE and all(check(b) for b in items)


def test_200_backfills_created_edited_suspended_resumed_deleted(cluster) -> None:
    plane, admin, operator_kubeconfig = cluster
    names = [(ns, f"bf-{i:03d}") for ns in NAMESPACES for i in range(PER_NAMESPACE)]
    pool = ThreadPoolExecutor(max_workers=8)

    def each(action: Callable[[str, str], Any]) -> None:
        list(pool.map(lambda pair: action(*pair), names))

    peak = {"rss": rss_mib()}
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.5):
            peak["rss"] = max(peak["rss"], rss_mib())

    threading.Thread(target=sample, daemon=True).start()
    rss_before = rss_mib()
    before = request_counts(plane)
    started = time.monotonic()
    steps: dict[str, float] = {}
    config = OperatorConfig(kubeconfig=str(operator_kubeconfig), metrics_port=None)
    with operator_running(config):
        step = time.monotonic()
        each(lambda ns, name: admin.create(backfill_path(ns), {
            "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": name, "namespace": ns},
            "spec": {"database": {"dsnSecretRef": {"name": "db"}}, "table": "t", "set": {"v": "1"}}}))
        eventually(lambda: every(admin, lambda b: b.get("status", {}).get("phase") == "Pending"
                                 and b["status"].get("jobNames") == [f"{b['metadata']['name']}-s0-r1"]),
                   "200 Backfills Pending with their Job", timeout=STEP_TIMEOUT)
        steps["create"] = time.monotonic() - step

        step = time.monotonic()
        each(lambda ns, name: admin.merge_patch(backfill_path(ns, name), {"spec": {"batch": {"size": 500}}}))
        eventually(lambda: every(admin, lambda b: b["status"].get("observedGeneration") == 2 and b["status"]["phase"] == "Pending"),
                   "the edit observed", timeout=STEP_TIMEOUT)
        steps["edit"] = time.monotonic() - step

        step = time.monotonic()
        each(lambda ns, name: admin.merge_patch(backfill_path(ns, name), {"spec": {"suspend": True}}))
        eventually(lambda: every(admin, lambda b: b["status"].get("phase") == "Paused"), "all Paused", timeout=STEP_TIMEOUT)
        eventually(lambda: not any(admin.list(f"/apis/batch/v1/namespaces/{ns}/jobs") for ns in NAMESPACES),
                   "run 1's Jobs deleted", timeout=STEP_TIMEOUT)
        steps["suspend"] = time.monotonic() - step

        step = time.monotonic()
        each(lambda ns, name: admin.merge_patch(backfill_path(ns, name), {"spec": {"suspend": False}}))
        eventually(lambda: every(admin, lambda b: b["status"].get("phase") == "Pending"
                                 and b["status"].get("jobNames") == [f"{b['metadata']['name']}-s0-r2"]),
                   "all resumed with run 2's Job", timeout=STEP_TIMEOUT)
        steps["resume"] = time.monotonic() - step

        step = time.monotonic()
        each(lambda ns, name: admin.delete(backfill_path(ns, name)))
        eventually(lambda: not all_backfills(admin), "all deleted", timeout=STEP_TIMEOUT)
        steps["delete"] = time.monotonic() - step
        settle, settle_epoch = time.monotonic(), time.time()
        idle_before = request_counts(plane)
        time.sleep(10)
        idle_after = request_counts(plane)
        idle_seconds = time.monotonic() - settle
    sampling.set()
    pool.shutdown()
    elapsed = time.monotonic() - started
    after = request_counts(plane)

    def delta(a: dict[tuple[str, str, str], float], b: dict[tuple[str, str, str], float], **match: str) -> float:
        fields = ("verb", "resource", "code")
        return sum(v - a.get(k, 0.0) for k, v in b.items()
                   if all(k[fields.index(f)] == value for f, value in match.items()))

    def top(a: dict[tuple[str, str, str], float], b: dict[tuple[str, str, str], float]) -> list[str]:
        by: dict[str, float] = {}
        for (verb, resource, _), value in b.items():
            by[f"{verb} {resource}"] = by.get(f"{verb} {resource}", 0.0) + value - a.get((verb, resource, _), 0.0)
        return [f"{k}: {int(v)}" for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:6]]

    jobs_created = delta(before, after, verb="POST", resource="jobs", code="201")
    job_conflicts = delta(before, after, verb="POST", resource="jobs", code="409")
    total = delta(before, after)
    print("FAULT-FIGURES " + __import__("json").dumps({
        "fault": "operator under load (200 Backfills, real kube-apiserver)", "backfills": len(names),
        "seconds": round(elapsed, 1), "steps_seconds": {k: round(v, 1) for k, v in steps.items()},
        "jobs_created": jobs_created, "job_create_conflicts": job_conflicts,
        "api_requests": total, "api_requests_per_second": round(total / elapsed, 1),
        "idle_requests_per_second_after_delete": round(delta(idle_before, idle_after) / idle_seconds, 1),
        "rss_mib_before": round(rss_before, 1), "rss_mib_peak": round(peak["rss"], 1),
        "top_requests": top(before, after), "top_idle_requests": top(idle_before, idle_after),
        # Who makes them: the audit log names the user (the server's counters do not).
        "top_idle_by_user": Counter(f"{r.user} {r.verb} {r.resource}"
                                    for r in plane.audited(settle_epoch, settle_epoch + idle_seconds)).most_common(6),
    }, sort_keys=True), flush=True)
    assert jobs_created == 2 * len(names), "a Job was created twice, or one is missing"
    assert job_conflicts == 0
    assert peak["rss"] - rss_before < 500, "the operator's memory grew without bound"
