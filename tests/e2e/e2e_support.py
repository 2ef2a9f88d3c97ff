"""Helpers for the end-to-end suite: a real cluster (kubelet included), the project's image,
``helm``/``kubectl`` as a user runs them, and a PostgreSQL the cluster's pods can reach.

The cluster is given from outside, never started here: ``BACKFILL_E2E_KUBECONFIG`` (what
``tests/e2e/cluster/up`` prints, or any cluster's kubeconfig, kind included). Without it every
test here is skipped with that reason, so the main suite never needs a cluster.

Settings (environment):
  BACKFILL_E2E_KUBECONFIG  kubeconfig of the cluster (required)
  BACKFILL_E2E_IMAGE       the image built from the repo's Dockerfile, already on the node
                           (default ``backfill-operator:e2e``; pulled never: ``pullPolicy: Never``)
  BACKFILL_E2E_DB_HOST     address pods use to reach the test's PostgreSQL, which listens on it
                           (default ``BACKFILL_E2E_NODE_IP``: the node bridge address ``up`` uses)
  BACKFILL_E2E_TIMEOUT     seconds a Backfill may take to finish (default 300)
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "backfill-operator"
RELEASE, RELEASE_NS, NS = "backfill-operator", "backfill-system", "shop"
KUBECONFIG = os.environ.get("BACKFILL_E2E_KUBECONFIG", "")
TIMEOUT = float(os.environ.get("BACKFILL_E2E_TIMEOUT", "300"))
SKIP_REASON = (
    "no cluster for the e2e suite: set BACKFILL_E2E_KUBECONFIG (eval \"$(tests/e2e/cluster/up)\" starts one; "
    "see docs/testing.md, 'End-to-end tests on a real kubelet')"
)


class CommandFailed(AssertionError):
    """A kubectl/helm command failed; the message has its arguments and stderr (no secrets pass
    through these commands: DSNs reach the cluster only via ``kubectl create secret`` stdin)."""


@dataclass
class Cluster:
    kubeconfig: str
    kubectl_bin: str
    helm_bin: str
    image: str

    def _run(self, argv: list[str], stdin: str | None, check: bool, timeout: float) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": self.kubeconfig}
        result = subprocess.run(argv, check=False, input=stdin, capture_output=True, text=True, env=env, timeout=timeout)
        if check and result.returncode != 0:
            raise CommandFailed(f"{' '.join(argv[:6])}... exited {result.returncode}: {result.stderr.strip()[-2000:]}")
        return result

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120) -> str:
        return self._run([self.kubectl_bin, *args], stdin, check, timeout).stdout

    def helm(self, *args: str, timeout: float = 600) -> str:
        return self._run([self.helm_bin, *args], None, True, timeout).stdout

    def get(self, kind: str, name: str, namespace: str = NS) -> dict[str, Any]:
        return json.loads(self.kubectl("-n", namespace, "get", kind, name, "-o", "json"))

    def items(self, kind: str, namespace: str = NS, selector: str = "") -> list[dict[str, Any]]:
        args = ["-n", namespace, "get", kind, "-o", "json"] + (["-l", selector] if selector else [])
        return list(json.loads(self.kubectl(*args))["items"])

    def apply(self, manifest: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", stdin=json.dumps(manifest))

    def patch_spec(self, name: str, spec: dict[str, Any], namespace: str = NS) -> None:
        self.kubectl("-n", namespace, "patch", "bf", name, "--type=merge", "-p", json.dumps({"spec": spec}))

    def wait_until(self, probe: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
        """Poll ``probe`` (every second) until it returns something truthy."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = probe()
            except (CommandFailed, KeyError, json.JSONDecodeError) as error:  # not there yet
                last = error
            if last and not isinstance(last, Exception):
                return last
            time.sleep(1)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r:.500}")

    def status(self, name: str, namespace: str = NS) -> dict[str, Any]:
        return dict(self.get("bf", name, namespace).get("status") or {})

    def wait_phase(self, name: str, *phases: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            status = self.status(name)
            if status.get("phase") in ("Failed",) and "Failed" not in phases:
                raise AssertionError(f"{name} failed: {status.get('message')}; shards: {status.get('shards')}")
            return status if status.get("phase") in phases else None

        return dict(self.wait_until(probe, f"Backfill {name} phase in {phases}", timeout))

    def rows_updated(self, name: str) -> int:
        return int((self.status(name).get("progress") or {}).get("rowsUpdated") or 0)

    def worker_pods(self, name: str, phase: str = "Running") -> list[dict[str, Any]]:
        pods = self.items("pods", selector=f"backfill.dev/name={name}")
        return [p for p in pods if p["status"].get("phase") == phase and not p["metadata"].get("deletionTimestamp")]

    def running_worker_containers(self, name: str) -> list[str]:
        """Pods of the Backfill with a container still running. A stopped pod may linger in
        Terminating for minutes on a busy 1.20 kubelet (dockershim) after its container exited:
        what matters to the user is that no worker runs any more."""
        return [
            p["metadata"]["name"]
            for p in self.items("pods", selector=f"backfill.dev/name={name}")
            if any("running" in (c.get("state") or {}) for c in p["status"].get("containerStatuses") or [])
            or p["status"].get("phase") == "Pending"
        ]

    def operator_pod(self) -> dict[str, Any] | None:
        pods = self.items("pods", RELEASE_NS, f"app.kubernetes.io/instance={RELEASE}")
        ready = [p for p in pods if not p["metadata"].get("deletionTimestamp") and _ready(p)]
        return ready[0] if ready else None

    def logs_on_failure(self, name: str) -> str:
        """Operator and worker logs for a failure message (the chart's logs carry no secrets)."""
        out = [self.kubectl("-n", RELEASE_NS, "logs", f"deploy/{RELEASE}", "--tail=40", check=False)]
        for pod in self.items("pods", selector=f"backfill.dev/name={name}"):
            out.append(self.kubectl("-n", NS, "logs", pod["metadata"]["name"], "--tail=20", check=False))
        return "\n".join(out)


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])


def helm_install_args(cluster: Cluster, *extra: str) -> list[str]:
    repository, _, tag = cluster.image.rpartition(":")
    return [
        str(CHART), "--namespace", RELEASE_NS,
        "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=Never",  # no registry: the image is on the node already
        "--set", f"worker.namespaces={{{NS}}}",
        "--wait", "--timeout", "5m", *extra,
    ]


@dataclass
class PodDatabase:
    """One fresh database on the pod-reachable server, with its DSN in Secret ``<name>-db``."""

    admin_dsn: str
    secret: str


@dataclass
class PodPostgres:
    """The test's PostgreSQL and the address pods reach it by."""

    server: Any
    host: str


def load_example(folder: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "examples" / folder / "backfill.yaml").read_text()))
