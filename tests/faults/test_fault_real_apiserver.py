"""Faults against a REAL kube-apiserver and the REAL Job controller (kube-controller-manager):
the worker pod is SIGKILLed mid-run and, at the same time, the operator is stopped and
restarted. The Job controller replaces the failed pod, the new worker resumes from the
checkpoint, the restarted operator adopts the same Job, and the Backfill ends ``Succeeded``
with every matching row changed exactly once.

Skipped unless ``KUBEBUILDER_ASSETS`` holds etcd, kube-apiserver and kube-controller-manager
(README: "Testing against a real API server"). There is no kubelet: the test plays it by
running each Pod's container command (``backfill worker ...``) with the worker
ServiceAccount's token and writing the Pod's phase, so that the Job controller does the rest.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kube_support.control_plane import ControlPlane, missing_assets
from kube_support.crd_install import install_crd
from kube_support.operator_thread import operator_running
from kube_support.waiting import eventually
from support_faults import ledger
from support_faults.cli import backfill_executable
from support_faults.secrets import CANARY_PASSWORD, assert_absent

from backfill_api.kubeapi import KubeApi, backfill_path, core_path, jobs_path
from backfill_operator import rbac
from backfill_operator.main import OperatorConfig

ASSETS = os.environ.get("KUBEBUILDER_ASSETS")
_missing = missing_assets(ASSETS) or (
    None if ASSETS and os.access(Path(ASSETS) / "kube-controller-manager", os.X_OK)
    else "KUBEBUILDER_ASSETS lacks kube-controller-manager (the Job controller is what is tested)"
)
pytestmark = [pytest.mark.kube, pytest.mark.slow, pytest.mark.timeout(300), pytest.mark.skipif(_missing is not None, reason=str(_missing))]
NS = "faults-real"
OPERATOR_NS = "backfill-faults-system"
NAME = "real-faults"
JOB = f"{NAME}-s0-r1"
ROWS = 200_000


def until(probe: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
    # The real Job controller replaces a failed pod only after ~10 s back-off: wait longer.
    return eventually(probe, what, timeout)


def _create(api: KubeApi, doc: dict[str, Any]) -> None:
    kind, meta = doc["kind"], doc["metadata"]
    group = "/api/v1" if doc["apiVersion"] == "v1" else f"/apis/{doc['apiVersion']}"
    plural = {"ServiceAccount": "serviceaccounts", "Role": "roles", "RoleBinding": "rolebindings",
              "ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings"}[kind]
    api.create(f"{group}/namespaces/{meta['namespace']}/{plural}" if "namespace" in meta else f"{group}/{plural}", doc)


def _token(api: KubeApi, namespace: str, account: str) -> str:
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}}
    return api.create(core_path(namespace, "serviceaccounts", account) + "/token", body)["status"]["token"]


@dataclass
class Kubelet:
    """Runs the container of every Pod of the namespace once and reports its phase."""

    api: KubeApi
    kubeconfig: Path
    dsn: str
    log_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    phases: dict[str, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _start(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        container = pod["spec"]["containers"][0]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BACKFILL_")}
        env |= {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}
        secret_refs = [e for e in container.get("env") or [] if "valueFrom" in e]
        assert [e["valueFrom"]["secretKeyRef"] for e in secret_refs] == [{"name": "db", "key": "dsn"}]
        env |= {"BACKFILL_DSN": self.dsn, "KUBECONFIG": str(self.kubeconfig)}
        env.pop("BACKFILL_METRICS_PORT", None)  # tests share one network namespace: no fixed port
        with (self.log_dir / f"{name}.log").open("wb") as log:
            self.processes[name] = subprocess.Popen([*backfill_executable(), *container["args"]], env=env,
                                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._phase(name, "Running")

    def _phase(self, name: str, phase: str) -> None:
        self.api.merge_patch(core_path(NS, "pods", name) + "/status", {"status": {"phase": phase}})
        self.phases[name] = phase

    def step(self) -> None:
        for pod in self.api.list(core_path(NS, "pods")):
            name = pod["metadata"]["name"]
            if name not in self.processes and not pod["metadata"].get("deletionTimestamp"):
                self._start(pod)
        for name, process in self.processes.items():
            if self.phases.get(name) == "Running" and (code := process.poll()) is not None:
                self._phase(name, "Succeeded" if code == 0 else "Failed")

    def run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.step()
            except Exception:  # a pod deleted meanwhile: next pass
                pass

    def output(self) -> dict[str, str]:
        return {path.name: path.read_text(errors="replace") for path in self.log_dir.glob("*.log")}

    def stop(self) -> None:
        self._stop.set()
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[tuple[ControlPlane, KubeApi, Path, Path]]:
    plane = ControlPlane(ASSETS).start()  # type: ignore[arg-type]
    try:
        admin = KubeApi.from_environment(str(plane.write_kubeconfig(tmp_path / "admin")))
        install_crd(admin)
        for namespace in (OPERATOR_NS, NS):
            admin.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        for doc in rbac.operator_manifests(OPERATOR_NS, "unused")[:3]:  # ServiceAccount, ClusterRole, binding
            _create(admin, doc)
        for doc in rbac.worker_manifests(NS):
            _create(admin, doc)
        operator = plane.write_kubeconfig(tmp_path / "operator", _token(admin, OPERATOR_NS, rbac.OPERATOR_NAME))
        worker = plane.write_kubeconfig(tmp_path / "worker", _token(admin, NS, rbac.WORKER_NAME))
        # Pods are only admitted once the namespace's default ServiceAccount exists.
        until(lambda: admin.get(core_path(NS, "serviceaccounts", "default")), "default ServiceAccount")
        yield plane, admin, operator, worker
        admin.close()
    finally:
        plane.stop()


def test_pod_killed_and_operator_restarted_on_a_real_server(plane, database: str, tmp_path: Path) -> None:
    _, admin, operator_kubeconfig, worker_kubeconfig = plane
    ledger.seed(database, ROWS)
    admin.create(core_path(NS, "secrets"), {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "namespace": NS},
                                            "data": {"dsn": base64.b64encode(database.encode()).decode()}})
    document = ledger.manifest(
        NAME, database={"dsnSecretRef": {"name": "db", "key": "dsn"}}, worker={"backoffLimit": 3},
        batch={"size": 1_000, "minSize": 100, "maxSize": 1_000, "targetDuration": "0s", "pause": "30ms"},
    )
    document["metadata"]["namespace"] = NS
    logs = tmp_path / "pods"
    logs.mkdir()
    kubelet = Kubelet(admin, worker_kubeconfig, database, logs)
    thread = threading.Thread(target=kubelet.run, daemon=True)
    thread.start()
    config = OperatorConfig(kubeconfig=str(operator_kubeconfig), metrics_port=None, resync_seconds=0.5)
    path = backfill_path(NS, NAME)
    try:
        with operator_running(config):
            admin.create(backfill_path(NS), document)
            until(lambda: admin.get(path)["status"].get("progress", {}).get("rowsUpdated", 0) > 5_000, "progress")
            first = next(iter(kubelet.processes))
            kubelet.processes[first].send_signal(signal.SIGKILL)
        # The operator is down while the Job controller notices the failed pod and replaces it.
        replacement = until(lambda: next((p for p in kubelet.processes if p != first), None), "a replacement pod", 120)
        with operator_running(config):
            done = until(lambda: (b := admin.get(path))["status"].get("phase") in ("Succeeded", "Failed") and b,
                         "a final phase", 180)
            # The worker's "done" may reach the status before the Job controller completes the Job.
            until(lambda: admin.get(jobs_path(NS, JOB))["status"].get("succeeded") == 1, "the Job complete")
            jobs = admin.list(jobs_path(NS))
            final_status = admin.get(path)
            events = admin.list(core_path(NS, "events"))
    finally:
        kubelet.stop()
        thread.join(10)

    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert [j["metadata"]["name"] for j in jobs] == [JOB], "a second Job was created"
    job_status = jobs[0]["status"]
    assert job_status.get("failed") == 1 and job_status.get("succeeded") == 1, job_status
    assert kubelet.phases == {first: "Failed", replacement: "Succeeded"}
    result = ledger.check(database)
    result.assert_exact()
    assert done["status"]["progress"]["rowsUpdated"] == result.matching
    assert_absent([CANARY_PASSWORD, database], {"status": str(final_status), "events": str(events), "jobs": str(jobs),
                                                **kubelet.output()})
    ledger.report("real kube-apiserver + Job controller: worker pod SIGKILLed while the operator restarts",
                  faults_injected=2, runs=2, ledger=result, pods=len(kubelet.processes))
