"""``kubectl backfill`` against a REAL kube-apiserver (+ etcd, + controller-manager when present),
with the real operator (kopf, in a thread) reconciling: the plugin runs as the installed console
script ``kubectl-backfill``, as kubectl would run it. No kubelet: the test plays the worker by
writing ``status.shards`` as a worker does (tests/test_kube_real_apiserver.py runs a real one).

Skipped, with the reason, unless ``KUBEBUILDER_ASSETS`` holds the binaries.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_support.control_plane import ControlPlane, missing_assets
from kube_support.crd_install import install_crd
from kube_support.operator_thread import operator_running
from kube_support.waiting import eventually
from test_kube_real_apiserver import ASSETS, create, token_for

from backfill_api.kubeapi import KubeApi, backfill_path, core_path, jobs_path
from backfill_operator import rbac
from backfill_operator.main import OperatorConfig

pytestmark = [
    pytest.mark.kube,
    pytest.mark.timeout(300),
    pytest.mark.skipif(missing_assets(ASSETS) is not None, reason=str(missing_assets(ASSETS))),
]
NS = "shop"
PLUGIN = str(Path(sys.executable).parent / "kubectl-backfill")
PASSWORD = "plugin-canary-Pw-93kQ"
DSN = f"postgresql://app:{PASSWORD}@db.invalid:5432/shop"


@dataclass
class Env:
    plane: ControlPlane
    admin: KubeApi
    kubeconfig: Path
    """Admin, context namespace ``shop``."""
    home: Path

    def plugin(self, *args: str, kubeconfig: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        argv = [PLUGIN, *args, "--kubeconfig", str(kubeconfig or self.kubeconfig)]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, cwd=self.home)

    def backfill(self, name: str) -> dict[str, Any]:
        return self.admin.get(backfill_path(NS, name))

    def report_shard(self, name: str, **shard: Any) -> None:
        """What a worker writes (its shard's report) into the status subresource."""
        self.admin.merge_patch(backfill_path(NS, name, status=True), {"status": {"shards": {"0": shard}}})


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[Env]:
    plane = ControlPlane(ASSETS).start()  # type: ignore[arg-type]
    try:
        home = tmp_path_factory.mktemp("plugin")
        admin = KubeApi.from_environment(str(plane.write_kubeconfig(home / "admin")))
        install_crd(admin)
        admin.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        for doc in rbac.worker_manifests(NS):
            create(admin, doc)
        admin.create(core_path(NS, "secrets"), {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "shop-db", "namespace": NS},
                                                "stringData": {"dsn": DSN}})
        kubeconfig = plane.write_kubeconfig(home / "admin-shop", namespace=NS)
        with operator_running(OperatorConfig(kubeconfig=str(home / "admin"), metrics_port=None, resync_seconds=0.5)):
            yield Env(plane, admin, kubeconfig, home)
        admin.close()
    finally:
        plane.stop()


def create_backfill(env: Env, name: str, **spec: Any) -> None:
    env.admin.create(backfill_path(NS), {
        "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": name, "namespace": NS},
        "spec": {"database": {"dsnSecretRef": {"name": "shop-db"}}, "table": "orders", "set": {"state": "'x'"},
                 "limits": {"maxRowsPerSecond": 50}, **spec},
    })
    eventually(lambda: env.admin.get(jobs_path(NS, f"{name}-s0-r1")), f"the Job of {name}")


def test_list_and_status_of_a_running_backfill(env):
    create_backfill(env, "orders")
    env.report_shard("orders", state="running", run=1, rowsUpdated=120, batches=6, batchSize=20, rowsPerSecond=49.5,
                     percent=40, estimatedKeys=300, keysDone=120, lastKey=["120"], throttleReason="maxRowsPerSecond",
                     throttledSeconds={"maxRowsPerSecond": 12.0})
    eventually(lambda: env.backfill("orders")["status"].get("phase") == "Running", "Running")

    listed = env.plugin("list")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()[:2]
    assert header.startswith("NAME") and header == header.rstrip()
    assert header.split()[:3] == ["NAME", "PHASE", "PROGRESS"] and row.split()[:3] == ["orders", "Running", "40%"]
    everywhere = env.plugin("list", "-A")
    assert everywhere.stdout.splitlines()[1].split()[:2] == [NS, "orders"]

    shown = env.plugin("status", "orders")
    assert shown.returncode == 7, shown.stdout + shown.stderr  # Running: not done yet
    text = shown.stdout
    assert "Backfill shop/orders: Running" in text
    assert "120/300" in text and "49.5/s" in text
    assert "shard 0: waiting — spec.limits.maxRowsPerSecond: holding the rate at its cap (this run waited: maxRowsPerSecond 12s)" in text
    assert "JobCreated" in text and "created worker Job orders-s0-r1" in text
    if env.plane.has_controller_manager:  # the Job controller made the worker pod (Pending: no kubelet)
        assert "orders-s0-r1-" in text.split("Worker pods", 1)[1]

    as_json = env.plugin("status", "orders", "-o", "json")
    document = json.loads(as_json.stdout)
    assert (as_json.returncode, document["phase"], document["exitCode"]) == (7, "Running", 7)
    assert document["status"]["shards"]["0"]["rowsUpdated"] == 120
    assert any(e["reason"] == "JobCreated" for e in document["events"])


def test_pause_resume_and_wait_with_ci_exit_codes(env):
    create_backfill(env, "pausing")
    paused = env.plugin("pause", "pausing")
    assert paused.returncode == 0 and "spec.suspend set to true" in paused.stdout
    assert env.backfill("pausing")["spec"]["suspend"] is True
    assert env.plugin("wait", "pausing", "--for", "paused", "--timeout", "60s").returncode == 0
    assert env.plugin("status", "pausing").returncode == 8
    assert "already true" in env.plugin("pause", "pausing").stdout

    resumed = env.plugin("resume", "pausing")
    assert resumed.returncode == 0 and env.backfill("pausing")["spec"]["suspend"] is False
    assert env.plugin("wait", "pausing", "--for", "pending", "--timeout", "60s").returncode == 0
    eventually(lambda: env.admin.get(jobs_path(NS, "pausing-s0-r2")), "run 2's Job")
    timed_out = env.plugin("wait", "pausing", "--timeout", "2s")
    assert timed_out.returncode == 3 and "timed out after 2s" in timed_out.stderr
    watching = env.plugin("status", "pausing", "-w", "--timeout", "3s")
    assert watching.returncode == 3 and watching.stdout.count("Backfill shop/pausing: Pending") == 1  # unchanged: shown once

    env.report_shard("pausing", state="done", run=2, rowsUpdated=10, percent=100)
    done = env.plugin("wait", "pausing", "--for", "succeeded", "--timeout", "60s")
    assert done.returncode == 0, done.stderr
    assert env.plugin("status", "pausing", "-w").returncode == 0  # -w returns at once on a finished Backfill
    as_yaml = env.plugin("status", "pausing", "-o", "yaml")
    assert as_yaml.returncode == 0 and yaml.safe_load(as_yaml.stdout)["phase"] == "Succeeded"
    never = env.plugin("wait", "pausing", "--for", "failed", "--timeout", "10s")
    assert never.returncode == 9 and "will not become Failed" in never.stderr


def test_retry_of_a_failed_backfill_starts_the_next_run_from_the_checkpoint(env):
    create_backfill(env, "refunds")
    refused = env.plugin("retry", "refunds")
    assert refused.returncode == 1 and "not Failed: nothing to retry" in refused.stderr
    # The worker reports an error no pod restart can fix: the operator fails the Backfill at once.
    env.report_shard("refunds", state="failed", run=1, lastErrorReason="ValidationFailed", lastError='spec.set.state: column "state" does not exist')
    eventually(lambda: env.backfill("refunds")["status"].get("phase") == "Failed", "Failed")
    assert env.plugin("status", "refunds").returncode == 1
    assert env.plugin("wait", "refunds", "--timeout", "30s").returncode == 1
    spec_before = env.backfill("refunds")["spec"]

    retried = env.plugin("retry", "refunds", "--timeout", "60s")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "retrying from the checkpoint (run 2 next" in retried.stdout
    eventually(lambda: env.admin.get(jobs_path(NS, "refunds-s0-r2")), "run 2's Job")
    after = env.backfill("refunds")
    assert after["spec"] == spec_before  # suspend went true and back to false: nothing else changed
    eventually(lambda: env.backfill("refunds")["status"].get("phase") == "Pending", "Pending again")
    reasons = {e["reason"] for e in env.admin.list(core_path(NS, "events")) if e["involvedObject"].get("name") == "refunds"}
    assert {"Failed", "Paused", "JobDeleted"} <= reasons


@pytest.mark.allow_secret_output  # the canary is in the cluster on purpose; the assertion is that the archive lacks it
def test_report_archive_has_everything_and_no_secret(env):
    create_backfill(env, "leaky")
    # A (hypothetical) leak upstream: the DSN in a worker's error. The report must still not carry it.
    env.report_shard("leaky", state="running", run=1, rowsUpdated=1, lastError=f"could not connect to {DSN}")
    eventually(lambda: env.backfill("leaky")["status"].get("phase") == "Running", "Running")
    made = env.plugin("report", "leaky", "-o", "leaky.tar.gz", "--operator-namespace", "nowhere")
    assert made.returncode == 0, made.stderr
    assert PASSWORD not in made.stdout + made.stderr
    raw = (env.home / "leaky.tar.gz").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as archive:
        files = {m.name.split("/", 1)[1]: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]
    assert {"backfill.yaml", "status.txt", "events.yaml", "jobs.yaml", "pods.yaml", "versions.json", "README.txt"} <= set(files)
    everything = b"".join(files.values())
    assert PASSWORD.encode() not in everything and base64.b64encode(DSN.encode()) not in everything
    assert DSN.encode() not in everything and b"could not connect to" in everything
    versions = json.loads(files["versions.json"])
    assert versions["plugin"] and versions["server"]["gitVersion"].startswith("v1.")
    assert b"JobCreated" in files["events.yaml"] and b"leaky-s0-r1" in files["jobs.yaml"]
    status_text = files["status.txt"].decode()
    assert status_text.startswith("Backfill shop/leaky: Running") and "Shards" in status_text and "SHARD  STATE" in status_text
    assert b"operator pods: none labelled" in files["README.txt"]


def test_forbidden_names_the_verb_and_resource(env):
    """A ServiceAccount that may read Backfills and nothing else."""
    create_backfill(env, "guarded")
    create(env.admin, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "viewer", "namespace": NS}})
    create(env.admin, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "viewer", "namespace": NS},
                      "rules": [{"apiGroups": ["backfill.dev"], "resources": ["backfills"], "verbs": ["get", "list"]}]})
    create(env.admin, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "viewer", "namespace": NS},
                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "viewer"},
                      "subjects": [{"kind": "ServiceAccount", "name": "viewer", "namespace": NS}]})
    viewer = env.plane.write_kubeconfig(env.home / "viewer", token_for(env.admin, NS, "viewer"), namespace=NS)

    assert env.plugin("list", kubeconfig=viewer).returncode == 0
    pause = env.plugin("pause", "guarded", kubeconfig=viewer)
    assert pause.returncode == 5
    assert 'cannot patch backfills.backfill.dev in namespace "shop" as "system:serviceaccount:shop:viewer"' in pause.stderr
    status = env.plugin("status", "guarded", kubeconfig=viewer)
    assert status.returncode == 5 and 'cannot list events in namespace "shop"' in status.stderr
    logs = env.plugin("logs", "guarded", "-f", kubeconfig=viewer)
    assert logs.returncode == 5 and 'cannot list pods in namespace "shop"' in logs.stderr
    everywhere = env.plugin("list", "-A", kubeconfig=viewer)
    assert everywhere.returncode == 5 and "cannot list backfills.backfill.dev (cluster-wide)" in everywhere.stderr
    assert "Traceback" not in pause.stderr + status.stderr + everywhere.stderr + logs.stderr


def test_not_found_and_no_cluster(env):
    missing = env.plugin("status", "nope")
    assert missing.returncode == 4 and 'Backfill "nope" not found in namespace "shop"' in missing.stderr
    elsewhere = env.plugin("status", "orders", "-n", "default")
    assert elsewhere.returncode == 4 and 'namespace "default"' in elsewhere.stderr
    assert env.plugin("wait", "nope", "--timeout", "5s").returncode == 4
    create_backfill(env, "unstarted")
    quiet = env.plugin("logs", "unstarted")  # no kubelet here: its pod never starts
    assert quiet.returncode == 4 and "no worker pod of Backfill unstarted has started" in quiet.stderr
    no_file = env.plugin("plan", "missing/backfill.yaml")
    assert no_file.returncode == 4 and "no such manifest file: missing/backfill.yaml" in no_file.stderr
    invalid = env.home / "invalid.yaml"
    invalid.write_text("apiVersion: backfill.dev/v1alpha1\nkind: Backfill\nmetadata: {name: bad, namespace: shop}\n"
                       "spec: {table: t, set: {a: '1'}, batch: {size: 0}}\n")
    invalid_plan = env.plugin("plan", str(invalid))
    assert invalid_plan.returncode == 2 and "spec.batch.size" in invalid_plan.stderr
    assert not env.admin.list(core_path(NS, "pods"), {"app.kubernetes.io/component": "plan"}), "nothing created for an invalid manifest"

    version = env.plugin("version")
    assert version.returncode == 0 and "kubectl-backfill 0.1.0" in version.stdout and "server v1." in version.stdout
    absent = env.plugin("list", kubeconfig=env.home / "no-such-kubeconfig")
    assert absent.returncode == 6 and "no cluster" in absent.stderr
    context = env.plugin("list", "--context", "nonexistent")
    assert context.returncode == 6 and "nonexistent" in context.stderr
    wrong_token = env.plane.write_kubeconfig(env.home / "stranger", "not-a-valid-token", namespace=NS)
    refused = env.plugin("list", kubeconfig=wrong_token)
    assert refused.returncode == 6 and "unauthorized" in refused.stderr
    down = env.home / "down"
    down.write_text(env.kubeconfig.read_text().replace(f":{env.plane.api_port}", ":1"))
    unreachable = env.plugin("list", kubeconfig=down)
    assert unreachable.returncode == 6 and "cannot reach the API server https://127.0.0.1:1" in unreachable.stderr
    assert "Traceback" not in absent.stderr + refused.stderr + unreachable.stderr + context.stderr


def test_kubectl_runs_the_plugin_and_passes_its_exit_code(env):
    """`kubectl backfill ...` as a user types it: kubectl finds kubectl-backfill on PATH."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed here")
    create_backfill(env, "via-kubectl")
    path = f"{Path(PLUGIN).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    result = subprocess.run([kubectl, "backfill", "status", "via-kubectl", "--kubeconfig", str(env.kubeconfig)],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": path})
    assert result.returncode == 7 and "Backfill shop/via-kubectl:" in result.stdout, result.stderr
    missing = subprocess.run([kubectl, "backfill", "status", "nope", "--kubeconfig", str(env.kubeconfig)],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": path})
    assert missing.returncode == 4
