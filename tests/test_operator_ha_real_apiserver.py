"""Two operator processes, one leader (a Lease), on a REAL kube-apiserver (issue 21).

The leader is SIGKILLed with Backfills in every phase: the standby takes over within
leaseDuration + retryPeriod, picks up what changed meanwhile, never duplicates a Job, and the
killed leader's standby-to-be wrote nothing while it stood by (the audit log tells the two
apart: each runs as its own ServiceAccount, bound to the same roles). Then the new leader stops
gracefully: it releases the Lease and a fresh standby leads within a retry period or two.
Skipped without ``KUBEBUILDER_ASSETS``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kube_support.control_plane import ControlPlane
from kube_support.operator_cluster import ASSETS, SLOW_REAL_SERVER, prepare
from kube_support.waiting import eventually
from test_kube_real_apiserver import OPERATOR_NS, token_for

from backfill_api.kubeapi import KubeApi, backfill_path, core_path, jobs_path
from backfill_operator import rbac

pytestmark = SLOW_REAL_SERVER
NS = "ha"
LEASE = f"/apis/coordination.k8s.io/v1/namespaces/{OPERATOR_NS}/leases/backfill-operator"
DURATION, RENEW, RETRY = 6.0, 4.0, 1.0
IDENTITIES = ("op-a", "op-b", "op-c")


def account(name: str) -> str:
    return f"system:serviceaccount:{OPERATOR_NS}:{name}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[ControlPlane, KubeApi, dict[str, Path], Path]]:
    plane = ControlPlane(ASSETS, audit=True).start()  # type: ignore[arg-type]
    try:
        home = tmp_path_factory.mktemp("kube-ha")
        docs = [*rbac.operator_manifests(OPERATOR_NS, "unused")[:3], *rbac.lease_manifests(OPERATOR_NS)]
        for doc in docs:
            if doc["kind"].endswith("Binding"):  # one ServiceAccount per replica, so the audit log tells them apart
                doc["subjects"] = [{"kind": "ServiceAccount", "name": i, "namespace": OPERATOR_NS} for i in IDENTITIES]
        docs += [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": i, "namespace": OPERATOR_NS}} for i in IDENTITIES]
        admin = prepare(plane, home, [NS], operator_docs=docs, worker_rbac=True)
        kubeconfigs = {i: plane.write_kubeconfig(home / i, token_for(admin, OPERATOR_NS, i)) for i in IDENTITIES}
        yield plane, admin, kubeconfigs, home
        admin.close()
    finally:
        plane.stop()


def start(identity: str, kubeconfig: Path, home: Path) -> subprocess.Popen[bytes]:
    args = ["operator", "--leader-elect", "--leader-elect-namespace", OPERATOR_NS, "--metrics-port", "0",
            "--leader-elect-lease-duration", str(DURATION), "--leader-elect-renew-deadline", str(RENEW),
            "--leader-elect-retry-period", str(RETRY), "--resync-seconds", "1", "--kubeconfig", str(kubeconfig)]
    log = open(home / f"{identity}.log", "ab")  # noqa: SIM115  (the process's for its life)
    env = {**os.environ, "HOSTNAME": identity, "BACKFILL_LOG_FORMAT": "text"}
    return subprocess.Popen([str(Path(sys.executable).parent / "backfill"), *args], env=env, stdout=log, stderr=log)


def holder(admin: KubeApi) -> str:
    return str((admin.get(LEASE).get("spec") or {}).get("holderIdentity") or "")


def backfill(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": name, "namespace": NS},
            "spec": {"database": {"dsnSecretRef": {"name": "db"}}, "table": "t", "set": {"v": "1"}, **spec}}


def phase(admin: KubeApi, name: str) -> dict[str, Any]:
    return admin.get(backfill_path(NS, name)).get("status") or {}


def job_names(admin: KubeApi) -> list[str]:
    return sorted(j["metadata"]["name"] for j in admin.list(jobs_path(NS)))


def test_the_standby_takes_over_a_killed_leader_without_duplicating_a_job(cluster) -> None:
    plane, admin, kubeconfigs, home = cluster
    procs = {i: start(i, kubeconfigs[i], home) for i in IDENTITIES[:2]}
    try:
        first = eventually(lambda: holder(admin), "a leader", timeout=60).split("_")[0]
        standby = next(i for i in procs if i != first)
        # Backfills in every phase the operator can hold without a kubelet.
        for i in range(4):
            admin.create(backfill_path(NS), backfill(f"pending-{i}"))
        admin.create(backfill_path(NS), backfill("paused", suspend=True))
        admin.create(backfill_path(NS), backfill("nosecret", database={"dsnSecretRef": {"name": "missing"}}))
        admin.create(backfill_path(NS), backfill("done"))
        eventually(lambda: all(phase(admin, f"pending-{i}").get("jobNames") == [f"pending-{i}-s0-r1"] for i in range(4)),
                   "Pending with a Job each")
        eventually(lambda: phase(admin, "paused").get("phase") == "Paused", "Paused")
        eventually(lambda: any(c.get("reason") == "SecretNotFound" for c in phase(admin, "nosecret").get("conditions") or []),
                   "Stalled on the missing Secret")
        # Play the kubelet and the worker for "done": its pod Succeeded, its shard reported done.
        pod = eventually(lambda: next(iter(admin.list(core_path(NS, "pods"), {"job-name": "done-s0-r1"}))), "done's Pod")
        admin.merge_patch(backfill_path(NS, "done", status=True), {"status": {"shards": {"0": {
            "state": "done", "run": 1, "rowsUpdated": 10, "batches": 1, "percent": 100, "keysDone": 10}}}})
        admin.merge_patch(core_path(NS, "pods", pod["metadata"]["name"]) + "/status", {"status": {"phase": "Succeeded"}})
        eventually(lambda: phase(admin, "done").get("phase") == "Succeeded", "Succeeded")
        before = job_names(admin)
        assert before == sorted([*(f"pending-{i}-s0-r1" for i in range(4)), "done-s0-r1"])

        # At rest with election: each replica's only requests are its election rounds (once both are
        # up: kopf's LIST of Backfills and the Job informer's LIST come last, the watches follow).
        eventually(lambda: all({("list", "backfills"), ("list", "jobs")} <= {
            (r.verb, r.resource) for r in plane.audited() if r.user == account(i)} for i in procs), "both replicas up")
        time.sleep(2.0)
        window = time.time()
        time.sleep(5.0)
        rest = Counter((r.user, r.resource) for r in plane.audited(window, window + 5.0))
        print(f"HA-FIGURES at_rest_5s={dict(rest)}", flush=True)
        for identity in procs:
            assert rest[(account(identity), "leases")] <= 5.0 / RETRY + 1
            assert sum(n for (user, resource), n in rest.items() if user == account(identity) and resource != "leases") == 0

        procs[first].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        killed_epoch = time.time()
        procs[first].wait(10)
        # While nobody leads: a new Backfill, and a resume.
        admin.create(backfill_path(NS), backfill("late"))
        admin.merge_patch(backfill_path(NS, "paused"), {"spec": {"suspend": False}})
        eventually(lambda: holder(admin).startswith(standby + "_"), "the standby to take the Lease", timeout=30)
        takeover = time.monotonic() - killed
        eventually(lambda: phase(admin, "late").get("jobNames") == ["late-s0-r1"], "the late Backfill's Job")
        eventually(lambda: phase(admin, "paused").get("jobNames") == ["paused-s0-r1"], "the resumed run's Job")
        assert job_names(admin) == sorted([*before, "late-s0-r1", "paused-s0-r1"]), "no Job duplicated or lost"
        assert phase(admin, "done")["phase"] == "Succeeded" and all(
            phase(admin, f"pending-{i}")["phase"] == "Pending" for i in range(4))

        audit = plane.audited()
        writes = [r for r in audit if r.verb in ("create", "patch", "update", "delete") and r.resource != "leases"]
        by_standby = [r for r in writes if r.user == account(standby)]
        assert by_standby and min(r.at for r in by_standby) >= killed_epoch, "the standby wrote nothing while it stood by"
        job_posts = [r for r in audit if r.verb == "create" and r.resource == "jobs"]
        assert Counter(r.code for r in job_posts) == {201: len(before) + 2}, "every Job created once, no conflict"
        print(f"HA-FIGURES takeover_seconds={takeover:.1f} bound={DURATION + RETRY}", flush=True)
        assert takeover <= DURATION + RETRY + 2.0, f"took {takeover:.1f} s"

        # A graceful stop hands over at once: the leader releases the Lease.
        procs["op-c"] = start("op-c", kubeconfigs["op-c"], home)
        time.sleep(3 * RETRY)  # op-c is up and standing by
        assert holder(admin).startswith(standby + "_")
        procs[standby].send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        eventually(lambda: holder(admin).startswith("op-c_"), "op-c to take the released Lease", timeout=30)
        handover = time.monotonic() - stopped
        print(f"HA-FIGURES graceful_handover_seconds={handover:.1f}", flush=True)
        assert procs[standby].wait(30) == 0
        assert handover < DURATION, "a released Lease is taken without waiting it out"
        admin.create(backfill_path(NS), backfill("after-handover"))
        eventually(lambda: phase(admin, "after-handover").get("jobNames") == ["after-handover-s0-r1"], "op-c reconciles")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
