"""End to end against a REAL kube-apiserver (+ etcd, + kube-controller-manager when present).

Skipped, with the reason, unless ``KUBEBUILDER_ASSETS`` holds the binaries (README: "Testing
against a real API server"). The CRD is installed through the API (CEL rules included: servers
older than 1.25 drop them), the operator runs with the ServiceAccount token of deploy/'s RBAC,
the test plays the kubelet by running ``backfill worker`` itself (subprocess, worker
ServiceAccount token, the real engine against the ``database`` fixture), then marks the Pod
Succeeded so that the Job controller completes the Job.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kube_support.control_plane import ControlPlane, missing_assets
from kube_support.crd_install import CRDS, install_crd
from kube_support.operator_thread import operator_running
from kube_support.waiting import eventually

from backfill_api.crd import CRD_NAME
from backfill_api.kubeapi import (
    KubeApi,
    KubeApiError,
    backfill_path,
    core_path,
    jobs_path,
)
from backfill_operator import rbac
from backfill_operator.main import OperatorConfig

ASSETS = os.environ.get("KUBEBUILDER_ASSETS")
pytestmark = [
    pytest.mark.kube,
    pytest.mark.timeout(300),
    pytest.mark.skipif(missing_assets(ASSETS) is not None, reason=str(missing_assets(ASSETS))),
]
NS = "shop"
OPERATOR_NS = "backfill-system"


def create(api: KubeApi, doc: dict[str, Any]) -> dict[str, Any]:
    """POST a built-in object of deploy/ (ServiceAccount, Role, ClusterRole, bindings)."""
    kind, meta = doc["kind"], doc["metadata"]
    group = "/api/v1" if doc["apiVersion"] == "v1" else f"/apis/{doc['apiVersion']}"
    plural = {"ServiceAccount": "serviceaccounts", "Role": "roles", "RoleBinding": "rolebindings",
              "ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings"}[kind]
    path = f"{group}/namespaces/{meta['namespace']}/{plural}" if "namespace" in meta else f"{group}/{plural}"
    return api.create(path, doc)


ROOT = Path(__file__).resolve().parents[1]


def readme_install_commands() -> str:
    """The first ``sh`` block of the manual's "Running in Kubernetes (operator)" section."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Running in Kubernetes (operator)", 1)[1].split("\n## ", 1)[0]
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


def token_for(api: KubeApi, namespace: str, service_account: str) -> str:
    """A TokenRequest token (works without the controller-manager, and on every version >= 1.20)."""
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}}
    return api.create(core_path(namespace, "serviceaccounts", service_account) + "/token", body)["status"]["token"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[ControlPlane, KubeApi, Path, Path]]:
    plane = ControlPlane(ASSETS).start()  # type: ignore[arg-type]
    try:
        home = tmp_path_factory.mktemp("kube")
        admin = KubeApi.from_environment(str(plane.write_kubeconfig(home / "admin")))
        install_crd(admin)
        # The README's install commands, verbatim, with kubectl (CRD apply over the API-created one).
        admin_kubeconfig = plane.write_kubeconfig(home / "admin")
        if shutil.which("kubectl"):
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_install_commands()], cwd=ROOT, capture_output=True,
                                    text=True, env={**os.environ, "KUBECONFIG": str(admin_kubeconfig)}, timeout=120)
            assert result.returncode == 0, result.stdout + result.stderr
        else:  # the same objects, through the API
            admin.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NS}})
            for doc in rbac.operator_manifests(OPERATOR_NS, "unused")[:3]:
                create(admin, doc)
        admin.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        for doc in rbac.worker_manifests(NS):
            create(admin, doc)
        operator_kubeconfig = plane.write_kubeconfig(home / "operator", token_for(admin, OPERATOR_NS, rbac.OPERATOR_NAME))
        worker_kubeconfig = plane.write_kubeconfig(home / "worker", token_for(admin, NS, rbac.WORKER_NAME))
        yield plane, admin, operator_kubeconfig, worker_kubeconfig
        admin.close()
    finally:
        plane.stop()


def test_crd_installs_through_the_api_with_defaults_validation_and_columns(cluster):
    plane, admin, _, _ = cluster
    stored = admin.get(f"{CRDS}/{CRD_NAME}")
    spec_schema = stored["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    minor = int(json.loads(plane.version)["minor"].rstrip("+"))
    if minor < 25:  # documented: CEL rules are dropped by older servers; the operator enforces immutability
        assert "x-kubernetes-validations" not in spec_schema
    obj = {"apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": "defaults", "namespace": NS},
           "spec": {"table": "t", "set": {"a": "1"}, "suspend": True}}
    created = admin.create(backfill_path(NS), obj)
    assert created["spec"]["batch"]["size"] == 1000 and created["spec"]["limits"]["lockTimeout"] == "1s"
    assert created["spec"]["checkpoint"] == {"schema": "backfill", "mode": "transactional"}
    with pytest.raises(KubeApiError) as rejected:
        admin.create(backfill_path(NS), {**obj, "metadata": {"name": "bad", "namespace": NS},
                                         "spec": {"table": "t", "set": {"a": "1"}, "batch": {"size": 0}}})
    assert rejected.value.status == 422 and "spec.batch.size" in str(rejected.value)
    table = admin.request("GET", backfill_path(NS), accept="application/json;as=Table;v=v1;g=meta.k8s.io")
    names = [c["name"] for c in table["columnDefinitions"]]
    assert names[:7] == ["Name", "Phase", "Progress", "Rows", "Rate", "ETA", "Age"]
    admin.delete(backfill_path(NS, "defaults"))


def _seed(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id bigint PRIMARY KEY, status text, counter int NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO customers (id, status) SELECT g, CASE WHEN g % 4 = 0 THEN 'active' END "
                     "FROM generate_series(1, 3000) g")


def test_operator_and_worker_run_a_backfill_end_to_end(cluster, database):
    plane, admin, operator_kubeconfig, worker_kubeconfig = cluster
    _seed(database)
    password = "canary-Pw-7f3a9Q"
    admin.create(core_path(NS, "secrets"), {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "shop-db", "namespace": NS},
                                            "data": {"dsn": base64.b64encode(database.encode()).decode()}})
    config = OperatorConfig(kubeconfig=str(operator_kubeconfig), metrics_port=None, resync_seconds=0.5)
    with operator_running(config):
        admin.create(backfill_path(NS), {
            "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": "customers", "namespace": NS},
            "spec": {"database": {"dsnSecretRef": {"name": "shop-db"}}, "table": "customers",
                     "set": {"counter": "counter + 1", "status": "'inactive'"}, "where": "status IS NULL",
                     "batch": {"size": 100, "minSize": 10, "maxSize": 1000, "targetDuration": "0", "pause": "100ms"}},
        })
        job = eventually(lambda: admin.get(jobs_path(NS, "customers-s0-r1")), "the worker Job")
        assert job["metadata"]["ownerReferences"][0]["kind"] == "Backfill"
        assert password not in json.dumps(job)
        eventually(lambda: admin.get(backfill_path(NS, "customers"))["status"]["phase"] == "Pending", "Pending")
        pod = None
        if plane.has_controller_manager:
            pod = eventually(lambda: next(p for p in admin.list(core_path(NS, "pods"), {"job-name": "customers-s0-r1"})), "the Pod")

        # Play the kubelet: run the container's command ourselves, with the worker's identity.
        container = job["spec"]["template"]["spec"]["containers"][0]
        env = {**os.environ, "KUBECONFIG": str(worker_kubeconfig), "BACKFILL_DSN": database,
               **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
        env.pop("BACKFILL_METRICS_PORT")  # several tests may run side by side: no fixed port
        backfill_cli = str(Path(sys.executable).parent / "backfill")
        worker = subprocess.Popen([backfill_cli, *container["args"]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            running = eventually(lambda: (b := admin.get(backfill_path(NS, "customers")))["status"]["phase"] == "Running"
                                 and b["status"].get("progress", {}).get("rowsUpdated", 0) > 0 and b, "Running with progress")
            assert 0 < running["status"]["progress"]["percent"] < 100
            output, _ = worker.communicate(timeout=120)
        finally:
            worker.kill()
        assert worker.returncode == 0, output.decode(errors="replace")[-2000:]
        assert password.encode() not in output
        assert b'"namespace": "shop"' in output or b'"namespace":"shop"' in output
        with psycopg.connect(database) as conn:
            once, wrong = conn.execute("SELECT count(*) FILTER (WHERE counter = 1), count(*) FILTER (WHERE counter <> 0 AND id % 4 = 0 OR counter > 1) FROM customers").fetchone()
        assert (once, wrong) == (2250, 0)

        if pod is not None:  # the kubelet reports the container's exit; the Job controller completes the Job
            admin.merge_patch(core_path(NS, "pods", pod["metadata"]["name"]) + "/status", {"status": {"phase": "Succeeded"}})
        else:
            admin.merge_patch(jobs_path(NS, "customers-s0-r1") + "/status", {"status": {
                "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
        done = eventually(lambda: (b := admin.get(backfill_path(NS, "customers")))["status"]["phase"] == "Succeeded" and b, "Succeeded")
        ready = next(c for c in done["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True" and done["status"]["progress"]["rowsUpdated"] == 2250
        assert done["status"]["observedGeneration"] == done["metadata"]["generation"]
        events = admin.list(core_path(NS, "events"))
        reasons = {e["reason"] for e in events if e["involvedObject"].get("name") == "customers"}
        assert {"JobCreated", "Pending", "Running", "Succeeded"} <= reasons
        assert password not in json.dumps(events) + json.dumps(done)

    if plane.has_controller_manager:  # deleting the Backfill garbage-collects its Job
        admin.delete(backfill_path(NS, "customers"))
        eventually(lambda: not admin.list(jobs_path(NS)), "the Job garbage-collected", timeout=60)


def test_immutable_edit_suspend_and_resume_on_a_real_server(cluster):
    plane, admin, operator_kubeconfig, _ = cluster
    admin.create(core_path(NS, "secrets"), {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "orders-db", "namespace": NS},
                                            "stringData": {"dsn": "postgresql://app@db.invalid/orders"}})
    path = backfill_path(NS, "orders")
    config = OperatorConfig(kubeconfig=str(operator_kubeconfig), metrics_port=None, resync_seconds=0.5)
    with operator_running(config):
        admin.create(backfill_path(NS), {
            "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": "orders", "namespace": NS},
            "spec": {"database": {"dsnSecretRef": {"name": "orders-db"}}, "table": "orders", "set": {"state": "'archived'"},
                     "where": "created_at < '2020-01-01'"},
        })
        eventually(lambda: admin.get(jobs_path(NS, "orders-s0-r1")), "the Job of run 1")
        admin.merge_patch(path + "/status", {"status": {"shards": {"0": {"state": "running", "run": 1, "rowsUpdated": 5}}}})
        eventually(lambda: admin.get(path)["status"]["phase"] == "Running", "Running")

        minor = int(json.loads(plane.version)["minor"].rstrip("+"))
        if minor >= 25:  # the CRD's CEL rule refuses the edit on the server
            with pytest.raises(KubeApiError, match="spec.where is immutable"):
                admin.merge_patch(path, {"spec": {"where": "true"}})
        else:  # dropped by the server: the operator reports it and keeps the original change
            admin.merge_patch(path, {"spec": {"where": "true"}})
            stalled = eventually(lambda: (b := admin.get(path))["status"]["observedGeneration"] == 2 and b, "generation 2 observed")
            condition = next(c for c in stalled["status"]["conditions"] if c["type"] == "Stalled")
            assert (condition["status"], condition["reason"], stalled["status"]["phase"]) == ("True", "ImmutableFieldChanged", "Running")
            assert admin.get(jobs_path(NS, "orders-s0-r1"))  # untouched
            admin.merge_patch(path, {"spec": {"where": "created_at < '2020-01-01'"}})
            cleared = eventually(lambda: (b := admin.get(path))["status"]["observedGeneration"] == 3 and b, "generation 3 observed")
            assert next(c for c in cleared["status"]["conditions"] if c["type"] == "Stalled")["status"] == "False"

        admin.merge_patch(path, {"spec": {"suspend": True}})
        eventually(lambda: admin.get(path)["status"]["phase"] == "Paused", "Paused")
        eventually(lambda: all(j["metadata"]["name"] != "orders-s0-r1" for j in admin.list(jobs_path(NS))), "the Job deleted")
        admin.merge_patch(path, {"spec": {"suspend": False}})
        eventually(lambda: admin.get(jobs_path(NS, "orders-s0-r2")), "the Job of run 2")
        assert admin.get(path)["status"]["run"] == 2
        reasons = {e["reason"] for e in admin.list(core_path(NS, "events")) if e["involvedObject"].get("name") == "orders"}
        assert {"Paused", "JobDeleted", "JobCreated"} <= reasons


def test_worker_failure_after_backoff_limit_fails_the_backfill_with_its_error(cluster, database):
    plane, admin, operator_kubeconfig, worker_kubeconfig = cluster
    if not plane.has_controller_manager:
        pytest.skip("needs kube-controller-manager (the Job controller turns a failed Pod into a failed Job)")
    wrong_password = "wrong-Pw-3Zq8"
    bad_dsn = database.replace("canary-Pw-7f3a9Q", wrong_password)
    admin.create(core_path(NS, "secrets"), {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bad-db", "namespace": NS},
                                            "stringData": {"dsn": bad_dsn}})
    path = backfill_path(NS, "refused")
    with operator_running(OperatorConfig(kubeconfig=str(operator_kubeconfig), metrics_port=None, resync_seconds=0.5)):
        admin.create(backfill_path(NS), {
            "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": "refused", "namespace": NS},
            "spec": {"database": {"dsnSecretRef": {"name": "bad-db"}}, "table": "customers", "set": {"status": "'x'"},
                     "worker": {"backoffLimit": 0}},
        })
        job = eventually(lambda: admin.get(jobs_path(NS, "refused-s0-r1")), "the worker Job")
        pod = eventually(lambda: next(p for p in admin.list(core_path(NS, "pods"), {"job-name": "refused-s0-r1"})), "the Pod")
        container = job["spec"]["template"]["spec"]["containers"][0]
        env = {**os.environ, "KUBECONFIG": str(worker_kubeconfig), "BACKFILL_DSN": bad_dsn,
               **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
        env.pop("BACKFILL_METRICS_PORT")
        result = subprocess.run([str(Path(sys.executable).parent / "backfill"), *container["args"]], env=env,
                                capture_output=True, timeout=120)
        assert result.returncode == 4, result.stdout[-2000:] + result.stderr[-2000:]  # ConnectionFailed
        assert wrong_password.encode() not in result.stdout + result.stderr
        # The kubelet reports the container's failure; with backoffLimit 0 the Job fails at once.
        admin.merge_patch(core_path(NS, "pods", pod["metadata"]["name"]) + "/status", {"status": {"phase": "Failed"}})
        failed = eventually(lambda: (b := admin.get(path))["status"]["phase"] == "Failed" and b, "Failed")
        stalled = next(c for c in failed["status"]["conditions"] if c["type"] == "Stalled")
        assert stalled["status"] == "True" and stalled["reason"] == "ConnectionFailed"
        assert "shard 0:" in failed["status"]["message"] and failed["status"]["shards"]["0"]["lastErrorReason"] == "ConnectionFailed"
        assert wrong_password not in json.dumps(failed)
        events = [e for e in admin.list(core_path(NS, "events")) if e["involvedObject"].get("name") == "refused"]
        assert any(e["type"] == "Warning" and e["reason"] == "Failed" for e in events)
