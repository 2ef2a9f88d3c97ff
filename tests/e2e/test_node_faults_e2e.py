"""What the node does to a running Backfill, on the real kubelet: the kubelet (and the container
runtime) restarted mid-run, a worker OOM-killed by a tight memory limit, and a worker whose error
no retry can fix (on 1.26+ the Job's ``podFailurePolicy`` ends it at the first failure). The
counter table is checked every time: no row changed twice, none skipped.

The restart tests need the PIDs ``tests/e2e/cluster/up`` records (skipped on another cluster).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    NS,
    Cluster,
    assert_exactly_once,
    counter_histogram,
    counter_run,
    processes_or_skip,
    wait_ready,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ROWS = 1500


def pods_of(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    return cluster.items("pods", selector=f"backfill.dev/name={name}")


def node_ready(cluster: Cluster) -> bool:
    (node,) = cluster.items("nodes", namespace="")
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])


def test_kubelet_restarted_mid_run(operator_release: Cluster, pod_database: Any) -> None:
    """The kubelet stops for a few seconds and starts again: the worker's container keeps
    running without it (same pod, never restarted, one Job run) and the run completes."""
    processes = processes_or_skip()
    cluster, name = operator_release, "kubelet-restart"
    with counter_run(cluster, pod_database, name, rows=ROWS, rows_per_second=200) as db:
        (worker,) = cluster.wait_until(lambda: cluster.worker_pods(name), "the running worker pod")
        argv, cwd = processes.stop("kubelet")
        try:
            assert not processes.kubelet_healthy()
            at_stop = cluster.rows_updated(name)
            assert at_stop < ROWS, "the run must still be going while the kubelet is down"
            # The worker goes on without the kubelet (it reports to the API server itself).
            cluster.wait_until(lambda: cluster.rows_updated(name) >= at_stop + 100,
                               "100 more rows while the kubelet is down", timeout=60)
        finally:
            processes.start("kubelet", argv, cwd)
        # `down` stops what is recorded: the new kubelet, run as before.
        assert Path(f"/proc/{processes.pid('kubelet')}/cmdline").read_bytes().split(b"\0")[:-1] == [a.encode() for a in argv]
        cluster.wait_until(processes.kubelet_healthy, "the restarted kubelet healthy", timeout=120)
        cluster.wait_until(lambda: node_ready(cluster), "the node Ready again", timeout=120)
        wait_ready(cluster, name)
        assert_exactly_once(db.admin_dsn, ROWS)
        (after,) = pods_of(cluster, name)
        assert after["metadata"]["uid"] == worker["metadata"]["uid"], "the same pod ran the whole backfill"
        assert after["status"]["containerStatuses"][0]["restartCount"] == 0
        assert cluster.status(name)["run"] == 1, "no second Job run"
        # `kubectl logs` goes through the restarted kubelet.
        assert cluster.kubectl("-n", NS, "logs", after["metadata"]["name"], "--tail=5").strip()


def test_container_runtime_restarted_mid_run(operator_release: Cluster, pod_database: Any) -> None:
    """containerd (latest) restarts under running containers (their shims keep them); dockerd
    (1.20, no live-restore) stops every container on the way down, the worker included: its
    SIGTERM ends the batch at a boundary and the operator starts the next run."""
    processes = processes_or_skip()
    cluster, name = operator_release, "runtime-restart"
    runtime = processes.runtime()
    with counter_run(cluster, pod_database, name, rows=ROWS, rows_per_second=200) as db:
        cluster.wait_until(lambda: cluster.worker_pods(name), "the running worker pod")
        processes.restart(runtime, down_seconds=2)
        cluster.wait_until(lambda: node_ready(cluster), "the node Ready again", timeout=120)
        wait_ready(cluster, name)
        assert_exactly_once(db.admin_dsn, ROWS)
        print(f"{runtime} restarted: the Backfill finished in run {cluster.status(name)['run']}")
        if runtime == "containerd":
            assert cluster.status(name)["run"] == 1, "the worker's container outlived containerd's restart"
    # Whatever the runtime did to it, the operator pod is back (the next tests need it).
    cluster.wait_until(cluster.operator_pod, "the operator pod Ready", timeout=180)


def test_worker_oom_killed_by_a_tight_memory_limit(operator_release: Cluster, pod_database: Any) -> None:
    """A run resumed with ``spec.worker.resources.limits.memory`` too small: what the user sees,
    and the way out (raise the limit, suspend and resume)."""
    cluster, name = operator_release, "oom-killed"
    with counter_run(cluster, pod_database, name, rows=600, started_at=100) as db:
        cluster.patch_spec(name, {"suspend": True})
        cluster.wait_phase(name, "Paused")
        cluster.wait_until(lambda: not cluster.running_worker_containers(name), "no worker container running")
        tight = {"resources": {"limits": {"memory": "20Mi"}}, "backoffLimit": 0}
        cluster.patch_spec(name, {"worker": tight, "suspend": False})
        status = cluster.wait_phase(name, "Failed", timeout=180)
        message = status["message"]
        assert "was OOMKilled" in message and "20Mi" in message, message
        assert "spec.worker.resources.limits.memory" in message, message
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Stalled"]["status"] == "True" and conditions["Stalled"]["reason"] == "OOMKilled"
        assert conditions["Ready"]["status"] == "False" and conditions["Ready"]["reason"] == "OOMKilled"
        # One Warning per killed pod (backoffLimit 0: one pod), posted once however many
        # operator passes saw it.
        killed = [p["metadata"]["name"] for p in pods_of(cluster, name)
                  if any((c.get("state") or {}).get("terminated", {}).get("reason") == "OOMKilled"
                         for c in p["status"].get("containerStatuses") or [])]
        assert len(killed) == 1, killed
        events = cluster.events(name, "OOMKilled")
        assert sorted(e["message"].split("worker pod ")[1].split()[0] for e in events) == sorted(killed)
        assert all(e["type"] == "Warning" and e.get("count", 1) == 1 for e in events)
        table = cluster.kubectl("-n", NS, "get", "bf", name, "-o", "wide")
        print(f"what the user sees:\n{table}\n" + "\n".join(e["message"] for e in events))
        assert "Failed" in table and "OOMKilled" in table, table
        partial = counter_histogram(db.admin_dsn)
        assert set(partial) <= {0, 1} and partial.get(1, 0) >= 100, f"no row changed twice: {partial}"
        # The way out: the default limit back, then suspend and resume to start a new run.
        cluster.kubectl("-n", NS, "patch", "bf", name, "--type=merge",
                        "-p", json.dumps({"spec": {"worker": {"resources": None, "backoffLimit": 6}, "suspend": True}}))
        cluster.wait_phase(name, "Paused", leaving_failed=True)
        cluster.patch_spec(name, {"suspend": False})
        wait_ready(cluster, name)
        assert_exactly_once(db.admin_dsn, 600)


def test_a_permanent_worker_error_fails_the_job_at_once(operator_release: Cluster, pod_database: Any) -> None:
    """An unknown column is refused by the worker's validation (exit code 2). On 1.26+ the Job's
    podFailurePolicy fails the Job at that first pod (no backoffLimit retries) and keeps the pod
    and its logs; on 1.20 the operator deletes the Job when the worker reports the error."""
    cluster, name = operator_release, "permanent-error"
    with counter_run(cluster, pod_database, name, rows=10, started_at=0, set={"no_such_column": "1"}) as db:
        status = cluster.wait_phase(name, "Failed", timeout=180)
        assert "no_such_column" in status["message"], status["message"]
        stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
        assert stalled["reason"] == "ValidationFailed"
        if cluster.server_minor() >= 26:
            (job,) = cluster.items("jobs", selector=f"backfill.dev/name={name}")
            assert job["spec"]["podFailurePolicy"]["rules"][0]["action"] == "FailJob"

            def failed_by_policy() -> dict[str, Any] | None:
                job = cluster.get("job", job_name)
                failed = [c for c in job["status"].get("conditions") or [] if c["type"] == "Failed" and c["status"] == "True"]
                return job if failed and failed[0]["reason"] == "PodFailurePolicy" else None

            job_name = job["metadata"]["name"]
            job = cluster.wait_until(failed_by_policy, "the Job Failed by its podFailurePolicy", timeout=120)
            assert job["status"].get("failed") == 1, "one pod, no retries"
            (pod,) = pods_of(cluster, name)
            assert "no_such_column" in cluster.kubectl("-n", NS, "logs", pod["metadata"]["name"])
        else:
            cluster.wait_until(lambda: not cluster.items("jobs", selector=f"backfill.dev/name={name}"),
                               "the operator deleted the Job", timeout=120)
        assert counter_histogram(db.admin_dsn) == {0: 10}, "nothing written before validation passed"


def test_a_job_the_server_refuses_is_a_stall_until_fixed(operator_release: Cluster, pod_database: Any) -> None:
    """``requests.memory`` above ``limits.memory``: the API server refuses the Job (422). The
    Backfill says so (Stalled, JobRejected, the server's words) and runs once the spec is fixed."""
    cluster, name = operator_release, "job-rejected"
    worker = {"resources": {"requests": {"memory": "512Mi"}, "limits": {"memory": "256Mi"}}}
    with counter_run(cluster, pod_database, name, rows=10, started_at=0, worker=worker) as db:
        def stalled() -> dict[str, Any] | None:
            status = cluster.status(name)
            return status if any(c["type"] == "Stalled" and c["status"] == "True" and c["reason"] == "JobRejected"
                                 for c in status.get("conditions") or []) else None

        status = cluster.wait_until(stalled, "Stalled=True, JobRejected", timeout=120)
        assert "must be less than or equal to memory limit" in status["message"], status["message"]
        assert "spec.worker" in status["message"] and not cluster.items("jobs", selector=f"backfill.dev/name={name}")
        assert cluster.events(name, "JobRejected")
        cluster.patch_spec(name, {"worker": {"resources": {"requests": {"memory": "128Mi"}}}})
        wait_ready(cluster, name)
        assert_exactly_once(db.admin_dsn, 10)
