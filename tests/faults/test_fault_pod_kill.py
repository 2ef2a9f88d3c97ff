"""The worker pod is SIGKILLed several times mid-run, in a cluster: the Job controller
(played by the fake kubelet, honouring ``backoffLimit``) replaces the pod, the new worker
resumes from the database checkpoint, the operator ends the Backfill ``Succeeded`` with the
right totals, and every matching row changed exactly once. Real operator (kopf) on kmock, real
``backfill worker`` processes, real PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kube_support.emulator import ApiServerEmulator, declare_resources
from kube_support.operator_thread import operator_running_async
from support_faults import ledger
from support_faults.kubelet import FakeKubelet, write_kubeconfig
from support_faults.secrets import CANARY_PASSWORD, assert_absent
from support_faults.seeds import seeded_random

from backfill_api.kubeapi import KubeApi, backfill_path, core_path
from backfill_operator.main import OperatorConfig

pytestmark = [pytest.mark.kmock(cls=ApiServerEmulator), pytest.mark.timeout(240), pytest.mark.slow]
NS = "faults"
NAME = "pod-kill"
JOB = f"{NAME}-s0-r1"
ROWS = 200_000
KILLS = 3


async def call(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


def checkpoint_rows(dsn: str) -> int:
    """Rows updated so far, from the database checkpoint (the truth; the status mirrors it every 2 s)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            row = conn.execute("SELECT rows_updated FROM backfill.checkpoints WHERE identity = %s", [f"{NS}/{NAME}"]).fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
    return int(row[0]) if row else 0


async def test_worker_pod_killed_repeatedly_resumes_and_succeeds(kmock, database: str, tmp_path: Path) -> None:
    rng = seeded_random("pod_kill")
    declare_resources(kmock)
    api = KubeApi.from_environment(server=str(kmock.url))
    await call(ledger.seed, database, ROWS)
    document = ledger.manifest(
        NAME,
        database={"dsnSecretRef": {"name": "db"}},
        batch={"size": 1_000, "minSize": 100, "maxSize": 1_000, "targetDuration": "0s", "pause": "20ms"},
        worker={"backoffLimit": 3 * KILLS},
    )
    document["metadata"]["namespace"] = NS
    await call(api.create, core_path(NS, "secrets"), {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "namespace": NS},
        "data": {"dsn": base64.b64encode(database.encode()).decode()}})
    kubelet = FakeKubelet(api, NS, write_kubeconfig(tmp_path, str(kmock.url)), tmp_path, restart_failed_pods=True)
    stop = asyncio.Event()
    kubelet_task = asyncio.create_task(kubelet.run(stop, interval=0.1))
    config = OperatorConfig(namespaces=(NS,), server=str(kmock.url), metrics_port=None, resync_seconds=0.3)
    killed_at: list[int] = []
    try:
        async with operator_running_async(config):
            await call(api.create, backfill_path(NS), document)
            for kill in range(KILLS):
                # Wait until the current pod has committed past a random further point.
                target = (kill + 1) * ROWS // 2 // (KILLS + 2) + rng.randrange(0, 5_000)
                deadline = asyncio.get_running_loop().time() + 60
                while await call(checkpoint_rows, database) < target:
                    assert asyncio.get_running_loop().time() < deadline, f"no progress to {target}"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(rng.uniform(0, 0.3))
                pod = kubelet.pods[JOB]
                assert pod.process.poll() is None, "the worker finished before it could be killed"
                pod.process.send_signal(signal.SIGKILL)
                killed_at.append(await call(checkpoint_rows, database))
                # Until the replacement pod runs.
                while kubelet.pods[JOB] is pod:
                    await asyncio.sleep(0.05)
            deadline = asyncio.get_running_loop().time() + 120
            while True:
                done = await call(api.get, backfill_path(NS, NAME))
                if done["status"].get("phase") in ("Succeeded", "Failed"):
                    break
                assert asyncio.get_running_loop().time() < deadline, done["status"]
                await asyncio.sleep(0.2)
            await kubelet.wait_finished(JOB)
    finally:
        stop.set()
        await kubelet_task
        kubelet.kill_all()
        api.close()

    assert done["status"]["phase"] == "Succeeded", done["status"]
    pods = [p for p in kubelet.history if p.job == JOB]
    codes = [p.exit_code for p in pods]
    # A replacement that starts while the killed pod's server session still lingers (it holds the
    # shard's advisory lock until PostgreSQL notices the dead socket) exits 3 and is replaced again.
    assert codes.count(-signal.SIGKILL) == KILLS and codes[-1] == 0, [(p.name, p.exit_code) for p in pods]
    refused = [p for p in pods if p.exit_code not in (-signal.SIGKILL, 0)]
    assert all(p.exit_code == 3 for p in refused), [(p.name, p.exit_code, p.stderr.read_text()[-500:]) for p in refused]
    assert kubelet.jobs_seen == [JOB], "the operator created another Job"
    result = ledger.check(database)
    result.assert_exact()
    progress = done["status"]["progress"]
    assert progress["rowsUpdated"] == result.matching and progress["percent"] == 100
    assert_absent([CANARY_PASSWORD, database], {"status": str(done), **kubelet.output()})
    ledger.report("worker pod SIGKILLed mid-run, Job replaces the pod (kmock + real operator and worker)",
                  faults_injected=KILLS, runs=len(pods), ledger=result, killed_at_rows=killed_at,
                  replacements_refused_while_old_session_lingered=len(refused))
