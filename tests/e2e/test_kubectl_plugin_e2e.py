"""``kubectl backfill`` on a cluster with a real kubelet: ``status`` of a running Backfill (its
shards, the throttle at work, the worker pods), ``logs`` through the pods API (merged, by shard,
followed to the end), ``report`` (real logs, no password) and ``plan`` in a short-lived pod with
the Backfill's image and Secret.

The plugin runs as the installed console script ``kubectl-backfill``, as ``kubectl backfill``
runs it. Skipped without ``BACKFILL_E2E_KUBECONFIG`` (see conftest.py).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_support import (
    COUNTER_ROWS,
    NS,
    Cluster,
    assert_exactly_once,
    counter_backfill,
    counter_histogram,
    counter_run,
    counter_table,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
PLUGIN = str(Path(sys.executable).parent / "kubectl-backfill")


def plugin(cluster: Cluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PLUGIN, *args, "-n", NS, "--kubeconfig", cluster.kubeconfig], capture_output=True, text=True,
                          timeout=timeout)


def test_status_logs_and_report_of_a_running_backfill(operator_release: Cluster, pod_database: Any, pg_server: Any,
                                                      tmp_path: Path) -> None:
    cluster, name = operator_release, "plugin-status"
    with counter_run(cluster, pod_database, name, rows_per_second=40, parallelism=2, started_at=60) as db:
        # Both shards report, and the rate limit shows as the throttle of a waiting shard.
        def shown() -> str | None:
            result = plugin(cluster, "status", name)
            assert result.returncode == 7, result.stdout + result.stderr  # Running
            text = result.stdout
            table = text.split("Shards", 1)[1].split("Throttle", 1)[0]
            running = [line.split()[:2] for line in table.splitlines() if line.split()[:2] in (["0", "running"], ["1", "running"])]
            waiting = "waiting — spec.limits.maxRowsPerSecond: holding the rate at its cap" in text
            return text if len(running) == 2 and waiting else None

        text = cluster.wait_until(shown, "status showing two running shards and the rate throttle", timeout=120)
        pods = text.split("Worker pods", 1)[1].split("Events", 1)[0]
        assert pods.count(" running") >= 2 and f"{name}-s0-r1-" in pods and f"{name}-s1-r1-" in pods
        assert "JobCreated" in text.split("Events", 1)[1]

        merged = plugin(cluster, "logs", name)
        assert merged.returncode == 0, merged.stderr
        prefixes = {line.split("]", 1)[0] + "]" for line in merged.stdout.splitlines() if line.startswith("[shard")}
        assert {"[shard 0 run 1]", "[shard 1 run 1]"} <= prefixes
        one = plugin(cluster, "logs", name, "--shard", "1")
        assert one.stdout.strip() and all(line.startswith("[shard 1 run 1]") for line in one.stdout.splitlines())

        # Follow to the end: lift the limit, and `logs -f` returns by itself once the Backfill is done.
        follow = subprocess.Popen([PLUGIN, "logs", name, "-f", "-n", NS, "--kubeconfig", cluster.kubeconfig],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(3)
            cluster.patch_spec(name, {"limits": {"maxRowsPerSecond": 0}})
            waited = plugin(cluster, "wait", name, "--timeout", "5m")
            assert waited.returncode == 0, waited.stdout + waited.stderr
            followed, errors = follow.communicate(timeout=120)
        finally:
            follow.kill()
        assert follow.returncode == 0, errors
        assert {"[shard 0 run 1]", "[shard 1 run 1]"} <= {line.split("]", 1)[0] + "]" for line in followed.splitlines()}
        assert plugin(cluster, "status", name).returncode == 0  # Succeeded
        assert_exactly_once(db.admin_dsn)

        # The bug-report archive: real worker and operator logs, the plan, and not the password
        # of the DSN in the Secret (the session's canary, which the pod database shares).
        archive = tmp_path / "report.tar.gz"
        made = plugin(cluster, "report", name, "-o", str(archive), "--plan")
        assert made.returncode == 0, made.stdout + made.stderr
        with tarfile.open(archive, mode="r:gz") as opened:
            files = {m.name.split("/", 1)[1]: opened.extractfile(m).read() for m in opened.getmembers()}  # type: ignore[union-attr]
        workers = [f for f in files if f.startswith("logs/workers/")]
        assert len(workers) >= 2 and all(files[f].strip() for f in workers)
        assert any(f.startswith("logs/operator/") and files[f].strip() for f in files)
        assert b"plan_ok=true" in files["plan.txt"]
        assert pg_server.password and pg_server.password.encode() not in b"".join(files.values())


def test_plan_runs_in_the_cluster_and_writes_nothing(operator_release: Cluster, pod_database: Any, tmp_path: Path) -> None:
    cluster, name = operator_release, "plugin-plan"
    db = pod_database(name)
    counter_table(db.admin_dsn)
    manifest = counter_backfill(name, db, rows_per_second=0)
    path = tmp_path / "backfill.yaml"
    path.write_text(yaml.safe_dump(manifest))

    from_file = plugin(cluster, "plan", str(path), "--image", cluster.image)
    assert from_file.returncode == 0, from_file.stdout + from_file.stderr
    assert "sample batch (rolled back)" in from_file.stdout and "plan_ok=true" in from_file.stdout
    assert "UPDATE" in from_file.stdout

    # By name: a suspended Backfill in the cluster (never started), its worker image from the spec.
    manifest["spec"].update(suspend=True, worker={"image": cluster.image, "imagePullPolicy": "Never"})
    cluster.apply(manifest)
    by_name = plugin(cluster, "plan", name)
    assert by_name.returncode == 0, by_name.stdout + by_name.stderr
    assert "plan_ok=true" in by_name.stdout
    assert counter_histogram(db.admin_dsn) == {0: COUNTER_ROWS}, "plan must not change a row"
    cluster.wait_until(lambda: not cluster.items("pods", selector="app.kubernetes.io/component=plan"), "plan pods deleted", timeout=120)

    # A Secret that does not exist: the pod cannot start, and the plugin says why (and cleans up).
    manifest["spec"]["database"]["dsnSecretRef"]["name"] = "no-such-secret"
    path.write_text(yaml.safe_dump(manifest))
    broken = plugin(cluster, "plan", str(path), "--timeout", "2m")
    assert broken.returncode == 1 and "could not run" in broken.stderr and "no-such-secret" in broken.stderr
    cluster.kubectl("-n", NS, "delete", "bf", name, "--wait=true")
