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
  BACKFILL_E2E_RUN         the run directory of ``up`` (``pids/``, ``logs/``), for the tests that
                           restart the kubelet or the container runtime (default: the kubeconfig's
                           directory); on another cluster those tests are skipped
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "backfill-operator"
RELEASE, RELEASE_NS, NS = "backfill-operator", "backfill-system", "shop"
KUBECONFIG = os.environ.get("BACKFILL_E2E_KUBECONFIG", "")
TIMEOUT = float(os.environ.get("BACKFILL_E2E_TIMEOUT", "300"))
RUN_DIR = Path(os.environ.get("BACKFILL_E2E_RUN") or (Path(KUBECONFIG).parent if KUBECONFIG else "."))
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

    def server_minor(self) -> int:
        version = json.loads(self.kubectl("get", "--raw", "/version"))
        return int(str(version["minor"]).rstrip("+"))

    def events(self, name: str, reason: str, namespace: str = NS) -> list[dict[str, Any]]:
        """Events about the object ``name`` with ``reason``."""
        found = json.loads(self.kubectl("-n", namespace, "get", "events", "-o", "json",
                                        f"--field-selector=involvedObject.name={name},reason={reason}"))
        return list(found["items"])

    def status(self, name: str, namespace: str = NS) -> dict[str, Any]:
        return dict(self.get("bf", name, namespace).get("status") or {})

    def wait_phase(self, name: str, *phases: str, timeout: float = TIMEOUT,
                   leaving_failed: bool = False) -> dict[str, Any]:
        """Wait for one of ``phases``. A Failed phase on the way stops the wait at once, unless the
        Backfill is known to be Failed now and the test has just asked it to leave that phase
        (``leaving_failed``: the operator has not seen the patch yet)."""
        def probe() -> dict[str, Any] | None:
            status = self.status(name)
            if status.get("phase") == "Failed" and "Failed" not in phases and not leaving_failed:
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


class Processes:
    """The processes ``tests/e2e/cluster/up`` started, by their recorded PIDs (``RUN_DIR/pids``):
    stop one and start it again exactly as ``up`` did (its own session, the same command line and
    working directory, its log appended), recording the new PID so that ``down`` stops it."""

    def __init__(self, run_dir: Path = RUN_DIR) -> None:
        self.pids, self.logs = run_dir / "pids", run_dir / "logs"
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        """Processes restarted here are our children: reaped by wait(), never left as zombies."""

    def available(self, name: str) -> bool:
        return (self.pids / f"{name}.pid").is_file()

    def runtime(self) -> str:
        """The container runtime the kubelet uses: containerd (latest) or dockerd (1.20, dockershim)."""
        return "containerd" if self.available("containerd") else "dockerd"

    def pid(self, name: str) -> int:
        return int((self.pids / f"{name}.pid").read_text().strip())

    def stop(self, name: str, timeout: float = 60) -> tuple[list[str], str]:
        """SIGTERM the recorded PID and wait until it exited; its command line and working directory."""
        pid = self.pid(name)
        argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        cwd = os.readlink(f"/proc/{pid}/cwd")
        os.kill(pid, signal.SIGTERM)
        child = self._children.pop(pid, None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child is not None and child.poll() is not None:
                break
            if child is None and not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"{name} (pid {pid}) did not stop within {timeout:.0f}s after SIGTERM")
        return argv, cwd

    def start(self, name: str, argv: list[str], cwd: str) -> int:
        env = dict(os.environ)
        if os.path.isabs(argv[0]):  # its directory first on PATH, as `up` runs containerd (it finds its shim there)
            env["PATH"] = f"{Path(argv[0]).parent}:{env.get('PATH', '')}"
        with (self.logs / f"{name}.log").open("ab") as log:
            child = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._children[child.pid] = child
        (self.pids / f"{name}.pid").write_text(f"{child.pid}\n")
        return child.pid

    def restart(self, name: str, *, down_seconds: float = 0) -> int:
        """Stop ``name``, leave it stopped ``down_seconds``, start it again; the new PID."""
        argv, cwd = self.stop(name)
        time.sleep(down_seconds)
        return self.start(name, argv, cwd)

    def kubelet_healthy(self) -> bool:
        """The kubelet's own /healthz (its port from the configuration ``up`` wrote)."""
        config = yaml.safe_load((self.pids.parent / "kubelet.yaml").read_text())
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{config['healthzPort']}/healthz", timeout=5) as response:
                return bool(response.read().strip() == b"ok")
        except OSError:
            return False


def build_user_image(tag: str, base: str, files: list[Path], dockerfile_lines: list[str]) -> None:
    """A user's image, as a user makes one: ``FROM`` the project image plus ``files`` and
    ``dockerfile_lines``, built by the harness's dockerd (classic builder: nothing is pulled) and
    made available to the node's runtime (containerd imports it; dockershim uses dockerd's store)."""
    sock = RUN_DIR / "docker.sock"
    if not sock.exists():
        pytest.skip(f"building a user image needs the dockerd of `tests/e2e/cluster/up` ({sock}); on another "
                    "cluster build it yourself and load it onto the node")
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}", "DOCKER_BUILDKIT": "0"}
    with tempfile.TemporaryDirectory() as context:
        for path in files:
            shutil.copy(path, Path(context) / path.name)
        (Path(context) / "Dockerfile").write_text("\n".join([f"FROM {base}", *dockerfile_lines]) + "\n")
        subprocess.run(["docker", "build", "-q", "-t", tag, context], env=env, check=True, capture_output=True, timeout=300)
    containerd = RUN_DIR / "containerd.sock"
    if containerd.exists():
        ctr = RUN_DIR.parent / "containerd" / "bin" / "ctr"
        saved = subprocess.run(["docker", "save", tag], env=env, check=True, capture_output=True, timeout=300).stdout
        subprocess.run([str(ctr), "-a", str(containerd), "-n", "k8s.io", "images", "import", "-"], input=saved,
                       check=True, capture_output=True, timeout=300)


def tag_image_on_node(source: str, tag: str) -> None:
    """Give the node's image ``source`` a second name ``tag`` (no registry: what a push and a pull
    of a new tag would leave on the node): ``docker tag`` in the harness's dockerd (1.20's
    dockershim runs pods from its store), then, for containerd (latest), ``ctr images tag``."""
    sock = RUN_DIR / "docker.sock"
    if not sock.exists():
        pytest.skip(f"tagging an image on the node needs the dockerd of `tests/e2e/cluster/up` ({sock}); on another "
                    "cluster push the second tag yourself")
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}
    subprocess.run(["docker", "tag", source, tag], env=env, check=True, capture_output=True, timeout=60)
    containerd = RUN_DIR / "containerd.sock"
    if containerd.exists():
        ctr = [str(RUN_DIR.parent / "containerd" / "bin" / "ctr"), "-a", str(containerd), "-n", "k8s.io", "images"]
        subprocess.run([*ctr, "tag", "--force", _qualified(source), _qualified(tag)], check=True, capture_output=True,
                       timeout=60)


def _qualified(image: str) -> str:
    """containerd's name of a short image name (``docker save`` imports ``docker.io/library/...``)."""
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    return f"docker.io/{image}" if "/" in image else f"docker.io/library/{image}"


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


# -- the non-idempotent counter table every fault test checks ----------------------------------

COUNTER_ROWS = 2000


def counter_table(dsn: str, rows: int = COUNTER_ROWS) -> None:
    """A table whose backfill is NOT idempotent (``counter = counter + 1``): a row updated twice
    or skipped shows as a counter other than 1."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.counters (id bigint PRIMARY KEY, counter int NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO public.counters (id) SELECT generate_series(1, %s)", (rows,))


def counter_histogram(dsn: str) -> dict[int, int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT counter, count(*) FROM public.counters GROUP BY counter ORDER BY counter").fetchall()
    return {int(counter): int(n) for counter, n in rows}


def assert_exactly_once(dsn: str, rows: int = COUNTER_ROWS) -> None:
    assert counter_histogram(dsn) == {1: rows}, "every row must be updated exactly once"


def counter_backfill(name: str, db: PodDatabase, rows_per_second: int, parallelism: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "backfill.dev/v1alpha1",
        "kind": "Backfill",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "database": {"dsnSecretRef": {"name": db.secret, "key": "dsn"}},
            "table": "public.counters",
            "set": {"counter": "counter + 1"},
            "batch": {"size": 20, "minSize": 1, "maxSize": 20, "targetDuration": "0s"},
            "limits": {"maxRowsPerSecond": rows_per_second},
            "parallelism": parallelism,
        },
    }


def wait_rows(cluster: Cluster, name: str, at_least: int) -> None:
    cluster.wait_until(lambda: cluster.rows_updated(name) >= at_least, f"{name}: {at_least} rows updated")


def wait_ready(cluster: Cluster, name: str) -> None:
    """What a user's script does: ``kubectl wait --for=condition=Ready``; then the phase is Succeeded."""
    try:
        cluster.kubectl("-n", NS, "wait", f"bf/{name}", "--for=condition=Ready", f"--timeout={int(TIMEOUT)}s",
                        timeout=TIMEOUT + 30)
    except AssertionError as error:
        raise AssertionError(f"{error}\nstatus: {cluster.status(name)}\n{cluster.logs_on_failure(name)}") from None
    assert cluster.status(name)["phase"] == "Succeeded"


@contextmanager
def counter_run(
    cluster: Cluster, pod_database: Callable[[str], PodDatabase], name: str, *, rows_per_second: int = 100,
    parallelism: int = 1, rows: int = COUNTER_ROWS, started_at: int = 200, **spec: Any,
) -> Iterator[PodDatabase]:
    """The shape of every fault test: a counter table of ``rows``, its Backfill applied (``spec``
    merged in) and seen ``started_at`` rows in; the body does the disruption and waits for the
    outcome it expects; then the Backfill is deleted. Exactly-once is the body's to assert (a
    failing run must show it too)."""
    db = pod_database(name)
    counter_table(db.admin_dsn, rows)
    manifest = counter_backfill(name, db, rows_per_second=rows_per_second, parallelism=parallelism)
    manifest["spec"].update(spec)
    cluster.apply(manifest)
    if started_at:
        wait_rows(cluster, name, started_at)
    yield db
    cluster.kubectl("-n", NS, "delete", "bf", name, "--wait=true")


def processes_or_skip() -> Processes:
    processes = Processes()
    if not processes.available("kubelet"):
        pytest.skip(f"restarting the kubelet needs the PIDs `tests/e2e/cluster/up` records ({processes.pids}): "
                    "not this cluster's")
    return processes
