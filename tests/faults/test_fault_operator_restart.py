"""The operator is stopped and restarted while a backfill runs, end to end: the real operator
(kopf) against kmock over HTTP, the real ``backfill worker`` process (started by the fake
kubelet from the Job the operator rendered, DSN from the Secret) against a real PostgreSQL.

Expected: no second Job (the new operator adopts the running one), the status keeps moving
(the worker's shard mirror while no operator runs, the aggregate after the restart), the phase
ends Succeeded, and the table holds the exact result.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest
from kube_support.emulator import ApiServerEmulator, declare_resources
from kube_support.operator_thread import operator_running_async
from kube_support.waiting import call, eventually_async, operator_has_looked
from support_faults import ledger
from support_faults.kubelet import FakeKubelet, write_kubeconfig
from support_faults.secrets import CANARY_PASSWORD, assert_absent

from backfill_api.kubeapi import KubeApi, backfill_path, core_path, jobs_path
from backfill_operator.main import OperatorConfig

pytestmark = [pytest.mark.kmock(cls=ApiServerEmulator), pytest.mark.timeout(240), pytest.mark.slow]
NS = "faults"
NAME = "operator-restart"
ROWS = 200_000


def secret(dsn: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "namespace": NS},
            "data": {"dsn": base64.b64encode(dsn.encode()).decode()}}


async def test_operator_restart_mid_run_no_second_job_and_exact_result(kmock, database: str, tmp_path: Path) -> None:
    declare_resources(kmock)
    api = KubeApi.from_environment(server=str(kmock.url))
    await call(ledger.seed, database, ROWS)
    document = ledger.manifest(
        NAME,
        database={"dsnSecretRef": {"name": "db", "key": "dsn"}},
        batch={"size": 1_000, "minSize": 100, "maxSize": 1_000, "targetDuration": "0s", "pause": "40ms"},
    )
    document["metadata"]["namespace"] = NS
    await call(api.create, core_path(NS, "secrets"), secret(database))
    config = OperatorConfig(namespaces=(NS,), server=str(kmock.url), metrics_port=None, resync_seconds=0.3)
    kubelet = FakeKubelet(api, NS, write_kubeconfig(tmp_path, str(kmock.url)), tmp_path)
    stop = asyncio.Event()
    kubelet_task = asyncio.create_task(kubelet.run(stop))
    path = backfill_path(NS, NAME)
    try:
        async with operator_running_async(config):
            await call(api.create, backfill_path(NS), document)
            running = await eventually_async(
                lambda: (b := api.get(path))["status"].get("phase") == "Running"
                and b["status"].get("progress", {}).get("rowsUpdated", 0) > 0 and b,
                "Running with progress",
            )
        # No operator now: the worker goes on and mirrors its shard into the status itself.
        before = running["status"]["progress"]["rowsUpdated"]
        shard_rows_at_stop = (await call(api.get, path))["status"]["shards"]["0"]["rowsUpdated"]
        await eventually_async(lambda: api.get(path)["status"]["shards"]["0"]["rowsUpdated"] > shard_rows_at_stop,
                    "the worker's own progress while the operator is down")
        still_running = kubelet.pods[f"{NAME}-s0-r1"].process.poll() is None
        async with operator_running_async(config):
            done = await eventually_async(lambda: (b := api.get(path))["status"].get("phase") == "Succeeded" and b,
                               "Succeeded after the restart", timeout=180)
            await operator_has_looked(api, path, "after Succeeded")  # and then: still one Job
            jobs = await call(api.list, jobs_path(NS))
            await kubelet.wait_finished(f"{NAME}-s0-r1")
    finally:
        stop.set()
        await kubelet_task
        kubelet.kill_all()
        events = await call(api.list, core_path(NS, "events"))
        final = await call(api.get, path)
        api.close()

    assert still_running, "the run ended before the operator came back: the restart was not mid-run"
    assert [j["metadata"]["name"] for j in jobs] == [f"{NAME}-s0-r1"]
    posted = [r for r in kmock if r.method == "POST" and str(r.url.path).endswith("/jobs")]
    assert len(posted) == 1, "a second Job was created"
    assert kubelet.pods[f"{NAME}-s0-r1"].exit_code == 0
    result = ledger.check(database)
    result.assert_exact()
    progress = done["status"]["progress"]
    assert progress["rowsUpdated"] == result.matching > before
    assert progress["percent"] == 100
    ready = next(c for c in done["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert done["status"]["completedAt"]
    assert_absent([CANARY_PASSWORD, database], {"status": str(final), "events": str(events), "jobs": str(jobs),
                                                **kubelet.output()})
    ledger.report("operator stopped and restarted mid-run (kmock + real worker)", faults_injected=1,
                  runs=1, ledger=result, jobs_created=len(posted), rows_before_restart=before)
