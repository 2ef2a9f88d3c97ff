"""A duplicate worker pod for a running shard (a node partition makes the Job controller start a
replacement while the original still runs): the duplicate exits 3 having touched nothing, and
its refusal must not show up as the shard's state; the Backfill stays Running and ends
Succeeded with the exact result. Real operator on kmock, real worker processes, real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest
from kube_support.emulator import ApiServerEmulator, declare_resources
from kube_support.operator_thread import operator_running_async
from support_faults import ledger
from support_faults.kubelet import FakeKubelet, write_kubeconfig
from support_faults.secrets import CANARY_PASSWORD, assert_absent

from backfill_api.errors import AlreadyRunning
from backfill_api.kubeapi import KubeApi, backfill_path, core_path
from backfill_operator.main import OperatorConfig

pytestmark = [pytest.mark.kmock(cls=ApiServerEmulator), pytest.mark.timeout(180), pytest.mark.slow]
NS = "faults"
NAME = "duplicate-pod"
JOB = f"{NAME}-s0-r1"
ROWS = 100_000


async def call(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


async def test_duplicate_pod_exits_3_and_does_not_disturb_the_status(kmock, database: str, tmp_path: Path) -> None:
    declare_resources(kmock)
    api = KubeApi.from_environment(server=str(kmock.url))
    await call(ledger.seed, database, ROWS)
    document = ledger.manifest(
        NAME, database={"dsnSecretRef": {"name": "db"}},
        batch={"size": 1_000, "minSize": 100, "maxSize": 1_000, "targetDuration": "0s", "pause": "120ms"},  # >= 12 s: a loaded machine needs seconds to start the duplicate
    )
    document["metadata"]["namespace"] = NS
    await call(api.create, core_path(NS, "secrets"), {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "namespace": NS},
        "data": {"dsn": base64.b64encode(database.encode()).decode()}})
    kubelet = FakeKubelet(api, NS, write_kubeconfig(tmp_path, str(kmock.url)), tmp_path)
    stop = asyncio.Event()
    kubelet_task = asyncio.create_task(kubelet.run(stop))
    config = OperatorConfig(namespaces=(NS,), server=str(kmock.url), metrics_port=None, resync_seconds=0.3)
    path = backfill_path(NS, NAME)
    observed: list[tuple[str | None, str | None]] = []
    try:
        async with operator_running_async(config):
            await call(api.create, backfill_path(NS), document)
            while True:
                status = (await call(api.get, path)).get("status") or {}
                if status.get("phase") == "Running" and (status.get("shards") or {}).get("0", {}).get("state") == "running":
                    break
                await asyncio.sleep(0.1)
            duplicate = await kubelet.start_duplicate(JOB)
            # Watch the status closely while the duplicate starts, fails and is gone, and a bit after
            # (at most 40 samples, and only while the original has not finished: then it says done).
            async def sample() -> tuple[str | None, str | None]:
                status = (await call(api.get, path)).get("status") or {}
                await asyncio.sleep(0.05)
                return status.get("phase"), (status.get("shards") or {}).get("0", {}).get("state")

            while duplicate.process.poll() is None:
                observed.append(await sample())
            original_alive = kubelet.pods[JOB].process.poll() is None  # the refusal happened mid-run
            while len(observed) < 40 and (seen := await sample())[1] != "done":
                observed.append(seen)
            while (await call(api.get, path))["status"].get("phase") not in ("Succeeded", "Failed"):
                await asyncio.sleep(0.2)
            done = await call(api.get, path)
    finally:
        stop.set()
        await kubelet_task
        kubelet.kill_all()
        api.close()

    assert duplicate.process.returncode == AlreadyRunning.exit_code == 3
    assert "already being run" in duplicate.stderr.read_text()
    assert original_alive, "the run ended before the duplicate was observed: make it longer"
    assert set(observed) == {("Running", "running")}, f"the duplicate's refusal leaked into the status: {sorted(set(observed))}"
    assert done["status"]["phase"] == "Succeeded"
    result = ledger.check(database)
    result.assert_exact()
    assert done["status"]["progress"]["rowsUpdated"] == result.matching
    assert_absent([CANARY_PASSWORD, database], {"status": str(done), **kubelet.output()})
    ledger.report("duplicate worker pod for a running shard (kmock + real operator and workers)", faults_injected=1,
                  runs=2, ledger=result, duplicate_exit=duplicate.process.returncode, status_samples=len(observed))
