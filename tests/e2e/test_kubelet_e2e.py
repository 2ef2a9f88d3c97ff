"""End to end, as a user does it, on a cluster with a real kubelet and the image built from the
repo's Dockerfile: ``helm install``, ``kubectl apply`` of the examples, ``kubectl wait``, then
the disruptions a production cluster produces (a worker pod deleted, the operator pod deleted,
``helm upgrade``, suspend/resume, a live re-tune, ``helm uninstall``), asserting the table every time.

Tests run in file order against one Helm release (session fixture). Skipped without
``BACKFILL_E2E_KUBECONFIG`` (see conftest.py).
"""

from __future__ import annotations

import json
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from e2e_support import (
    COUNTER_ROWS,
    NS,
    RELEASE,
    RELEASE_NS,
    ROOT,
    Cluster,
    PodDatabase,
    assert_exactly_once,
    build_user_image,
    counter_histogram,
    counter_run,
    helm_install_args,
    load_example,
    wait_ready,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

EXAMPLES = sorted(p.name for p in (ROOT / "examples").iterdir() if (p / "backfill.yaml").is_file())
# Examples that name their own worker image (a handler's code in it) get one built by their own test.
USER_IMAGE_EXAMPLES = {f for f in EXAMPLES if (load_example(f)["spec"].get("worker") or {}).get("image")}
HANDLER_IMAGE = "backfill-e2e/python-handler:e2e"


def run_sql_file(dsn: str, path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(path.read_text())  # type: ignore[arg-type]  # trusted: the repo's own example SQL


def test_operator_runs_as_a_pod_from_the_image(operator_release: Cluster) -> None:
    cluster = operator_release
    pod = cluster.wait_until(cluster.operator_pod, "the operator pod Ready", timeout=120)
    container = pod["spec"]["containers"][0]
    assert container["image"] == cluster.image
    assert pod["status"]["containerStatuses"][0]["ready"] is True
    # The liveness probe passed on a real kubelet and the pod runs non-root, read-only.
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # kubectl logs goes apiserver -> kubelet on the node IP: the operator logged its startup.
    logs = cluster.kubectl("-n", RELEASE_NS, "logs", pod["metadata"]["name"])
    assert logs.strip(), "the operator pod wrote no log lines"
    # The metrics Service has the pod as its endpoint, and the pod serves Prometheus text.
    endpoints = cluster.get("endpoints", f"{RELEASE}-metrics", RELEASE_NS)
    addresses = [a["ip"] for s in endpoints.get("subsets") or [] for a in s.get("addresses") or []]
    assert pod["status"]["podIP"] in addresses
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{pod['status']['podIP']}:9090/metrics", timeout=10) as response:
        assert b"# TYPE" in response.read()


def open_window_now(spec: dict[str, Any]) -> None:
    """Replace the example's run windows (if any) by one open now, in its own zone (as tests/test_examples.py does)."""
    schedule = spec.get("schedule")
    if schedule is None:
        return
    now = datetime.now(ZoneInfo(schedule["timeZone"]))
    schedule["windows"] = [{"start": (now - timedelta(minutes=1)).strftime("%H:%M:%S"),
                            "end": (now + timedelta(minutes=30)).strftime("%H:%M:%S")}]


def test_every_example_succeeds_in_real_worker_pods(operator_release: Cluster, pod_database: Any) -> None:
    cluster = operator_release
    started: dict[str, PodDatabase] = {}
    assert {"python-handler"} == USER_IMAGE_EXAMPLES, "each example with its own image needs a test building it"
    for folder in sorted(set(EXAMPLES) - USER_IMAGE_EXAMPLES):
        manifest = load_example(folder)
        db = pod_database(f"ex-{folder}")
        run_sql_file(db.admin_dsn, ROOT / "examples" / folder / "schema.sql")
        manifest["spec"]["database"]["dsnSecretRef"]["name"] = db.secret
        open_window_now(manifest["spec"])
        cluster.apply(manifest)
        started[manifest["metadata"]["name"]] = db
    for name, db in started.items():
        wait_ready(cluster, name)
        folder = next(f for f in EXAMPLES if load_example(f)["metadata"]["name"] == name)
        with psycopg.connect(db.admin_dsn) as conn:
            wrong = conn.execute((ROOT / "examples" / folder / "verify.sql").read_text()).fetchone()  # type: ignore[arg-type]
        assert wrong == (0,), f"{folder}: rows still wrong after the backfill"
        # The work was done by real pods of the Job, which run to completion (a worker reports
        # "done" just before it exits, so its pod may still be Running for a moment).
        def all_pods_succeeded(name: str = name) -> bool:
            pods = cluster.items("pods", selector=f"backfill.dev/name={name}")
            return bool(pods) and all(p["status"]["phase"] == "Succeeded" for p in pods)

        cluster.wait_until(all_pods_succeeded, f"{name}: every worker pod Succeeded", timeout=120)
    for name in started:
        cluster.kubectl("-n", NS, "delete", "bf", name, "--wait=true")


def test_python_handler_runs_from_a_user_image(operator_release: Cluster, pod_database: Any) -> None:
    """examples/python-handler as a user ships it: an image FROM the project's with the handler
    module added, named in ``spec.worker.image``; the handler runs in a real worker pod and
    changes each row exactly once (an AFTER UPDATE trigger logs every row update)."""
    cluster, folder = operator_release, "python-handler"
    build_user_image(HANDLER_IMAGE, cluster.image, [ROOT / "examples" / folder / "signup_emails.py"],
                     ["COPY signup_emails.py /opt/handlers/", "ENV PYTHONPATH=/opt/handlers"])
    manifest = load_example(folder)
    name = manifest["metadata"]["name"]
    db = pod_database(f"ex-{folder}")
    run_sql_file(db.admin_dsn, ROOT / "examples" / folder / "schema.sql")
    with psycopg.connect(db.admin_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.signup_updates (id bigint NOT NULL)")
        conn.execute("CREATE FUNCTION public.log_update() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN INSERT INTO public.signup_updates VALUES (NEW.id); RETURN NEW; END $$")
        conn.execute("CREATE TRIGGER log_update AFTER UPDATE ON public.signups FOR EACH ROW EXECUTE FUNCTION public.log_update()")
        rows = conn.execute("SELECT count(*) FROM public.signups").fetchone()
    manifest["spec"]["database"]["dsnSecretRef"]["name"] = db.secret
    manifest["spec"]["worker"] = {**manifest["spec"]["worker"], "image": HANDLER_IMAGE, "imagePullPolicy": "Never"}
    cluster.apply(manifest)
    wait_ready(cluster, name)
    with psycopg.connect(db.admin_dsn) as conn:
        wrong = conn.execute((ROOT / "examples" / folder / "verify.sql").read_text()).fetchone()  # type: ignore[arg-type]
        updates = conn.execute("SELECT count(*), count(DISTINCT id) FROM public.signup_updates").fetchone()
    assert wrong == (0,), "rows still wrong after the handler ran"
    assert rows is not None and updates == (rows[0], rows[0]), f"each of {rows[0]} rows updated exactly once: {updates}"
    pods = cluster.items("pods", selector=f"backfill.dev/name={name}")
    assert pods and {p["spec"]["containers"][0]["image"] for p in pods} == {HANDLER_IMAGE}
    cluster.kubectl("-n", NS, "delete", "bf", name, "--wait=true")


def test_worker_pod_deleted_mid_run_applies_each_row_exactly_once(operator_release: Cluster, pod_database: Any) -> None:
    cluster, name = operator_release, "delete-worker-pod"
    with counter_run(cluster, pod_database, name) as db:
        victim = cluster.wait_until(lambda: cluster.worker_pods(name), "a running worker pod")[0]["metadata"]["name"]
        cluster.kubectl("-n", NS, "delete", "pod", victim, "--wait=true")
        # A replacement pod (new Job run or the Job's retry) continues from the checkpoint.
        cluster.wait_until(
            lambda: [p for p in cluster.worker_pods(name) if p["metadata"]["name"] != victim], "a replacement worker pod"
        )
        wait_ready(cluster, name)
        assert_exactly_once(db.admin_dsn)


def test_suspend_resume_and_live_retune(operator_release: Cluster, pod_database: Any) -> None:
    cluster, name = operator_release, "suspend-retune"
    with counter_run(cluster, pod_database, name, rows_per_second=50, started_at=100) as db:
        cluster.patch_spec(name, {"suspend": True})
        cluster.wait_phase(name, "Paused")
        cluster.wait_until(lambda: not cluster.running_worker_containers(name), "no worker container running")
        paused_at = counter_histogram(db.admin_dsn)
        assert set(paused_at) == {0, 1} and 0 < paused_at[1] < COUNTER_ROWS, paused_at
        cluster.patch_spec(name, {"suspend": False})
        cluster.wait_phase(name, "Running", "Succeeded")
        # Live re-tune: at 50 rows/s the rest would take ~40 s; the new limit reaches the running
        # worker without a restart (same pod before and after).
        pods_before = {p["metadata"]["name"] for p in cluster.worker_pods(name)}
        cluster.patch_spec(name, {"limits": {"maxRowsPerSecond": 0}, "batch": {"size": 20, "maxSize": 20}})
        wait_ready(cluster, name)
        pods_after = {p["metadata"]["name"] for p in cluster.items("pods", selector=f"backfill.dev/name={name}")}
        assert pods_before <= pods_after, "the re-tune must not replace the worker pod"
        assert_exactly_once(db.admin_dsn)


def test_operator_pod_deleted_mid_run(operator_release: Cluster, pod_database: Any) -> None:
    cluster, name = operator_release, "delete-operator-pod"
    with counter_run(cluster, pod_database, name, parallelism=2) as db:
        operator = cluster.operator_pod()
        assert operator is not None
        cluster.kubectl("-n", RELEASE_NS, "delete", "pod", operator["metadata"]["name"], "--wait=true")
        cluster.wait_until(
            lambda: (p := cluster.operator_pod()) and p["metadata"]["name"] != operator["metadata"]["name"],
            "a new operator pod Ready",
        )
        wait_ready(cluster, name)
        jobs = cluster.items("jobs", selector=f"backfill.dev/name={name}")
        assert len({j["metadata"]["name"] for j in jobs}) == len(jobs) and jobs, "no duplicate Jobs after the restart"
        assert_exactly_once(db.admin_dsn)


def test_helm_upgrade_mid_run(operator_release: Cluster, pod_database: Any) -> None:
    cluster, name = operator_release, "helm-upgrade"
    with counter_run(cluster, pod_database, name) as db:
        revision_before = json.loads(cluster.helm("status", RELEASE, "-n", RELEASE_NS, "-o", "json"))["version"]
        cluster.helm("upgrade", RELEASE, *helm_install_args(cluster, "--reuse-values", "--set", "operator.logLevel=DEBUG"))
        status = json.loads(cluster.helm("status", RELEASE, "-n", RELEASE_NS, "-o", "json"))
        assert status["version"] == revision_before + 1 and status["info"]["status"] == "deployed"
        pod = cluster.wait_until(cluster.operator_pod, "the upgraded operator pod Ready")
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env") or []}
        assert env.get("BACKFILL_LOG_LEVEL") == "DEBUG"
        wait_ready(cluster, name)
        assert_exactly_once(db.admin_dsn)


def test_helm_uninstall_mid_run_then_reinstall(operator_release: Cluster, pod_database: Any) -> None:
    """``helm uninstall`` removes the operator and the RBAC, never the CRD (Helm does not delete
    ``crds/``) nor the Backfills or their Jobs (owned by the Backfill, not by the release). A
    reinstall picks the Backfill up where its checkpoint is."""
    cluster, name = operator_release, "helm-uninstall"
    with counter_run(cluster, pod_database, name) as db:
        cluster.helm("uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait")
        assert cluster.kubectl("get", "crd", "backfills.backfill.dev", "-o", "name").strip()
        assert cluster.get("bf", name)["metadata"]["name"] == name
        assert cluster.items("jobs", selector=f"backfill.dev/name={name}"), "the Jobs outlive the release"
        cluster.helm("install", RELEASE, *helm_install_args(cluster))
        wait_ready(cluster, name)
        assert_exactly_once(db.admin_dsn)
