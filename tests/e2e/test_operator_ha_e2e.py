"""Two operator replicas on the real kubelet (the chart's default): the leader's pod is deleted
mid-run; another replica takes the Lease (the standby, or the pod the ReplicaSet starts in the
deleted one's place: the released Lease goes to whichever asks first) and the run Succeeds with one
Job per shard, every row updated exactly once (issue 21)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from e2e_support import RELEASE, RELEASE_NS, Cluster, assert_exactly_once, counter_run, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def holder(cluster: Cluster) -> str:
    lease = json.loads(cluster.kubectl("-n", RELEASE_NS, "get", "lease", RELEASE, "-o", "json"))
    return str(lease["spec"].get("holderIdentity") or "")


def test_leader_pod_deleted_mid_run_the_standby_takes_over(operator_release: Cluster, pod_database: Any) -> None:
    cluster, name = operator_release, "delete-leader-pod"
    pods = cluster.items("pods", RELEASE_NS, f"app.kubernetes.io/instance={RELEASE}")
    assert len([p for p in pods if not p["metadata"].get("deletionTimestamp")]) == 2, "the chart runs two replicas"
    with counter_run(cluster, pod_database, name, parallelism=2) as db:
        leader = cluster.wait_until(lambda: holder(cluster), "a leader").rsplit("_", 1)[0]
        # Not a pod still Terminating from an earlier test (on 1.20 one may linger for minutes).
        standby = next(p["metadata"]["name"] for p in pods
                       if p["metadata"]["name"] != leader and not p["metadata"].get("deletionTimestamp"))
        # --wait=false: the handover starts at the delete (the leader releases the Lease on SIGTERM).
        cluster.kubectl("-n", RELEASE_NS, "delete", "pod", leader, "--wait=false")
        deleted = time.monotonic()
        seen: list[str] = []

        def another_replica_leads() -> bool:
            now = holder(cluster)
            if not seen or seen[-1] != now:
                seen.append(now)
            return bool(now) and not now.startswith(leader + "_")

        try:
            cluster.wait_until(another_replica_leads, "another replica to lead", timeout=60)
        except AssertionError as error:
            logs = cluster.kubectl("-n", RELEASE_NS, "logs", standby, "--tail=30", check=False)
            raise AssertionError(f"{error}\nleader {leader}, standby {standby}; Lease holders seen: {seen}\n"
                                 f"standby's log:\n{logs}") from None
        new_leader = seen[-1].rsplit("_", 1)[0]
        print(f"HA-E2E handover_seconds={time.monotonic() - deleted:.1f} new_leader="
              f"{'standby' if new_leader == standby else 'replacement pod'}", flush=True)
        wait_ready(cluster, name)
        jobs = cluster.items("jobs", selector=f"backfill.dev/name={name}")
        names = sorted(j["metadata"]["name"] for j in jobs)
        assert names == [f"{name}-s0-r1", f"{name}-s1-r1"], "one Job per shard, none duplicated"
        assert_exactly_once(db.admin_dsn)
