"""The in-cluster worker outside its run window, over real HTTP (kmock) on a real PostgreSQL:
it waits at a batch boundary reporting ``throttleReason: window`` and ``nextWindowStart`` (so the
status stays fresh and Running), and a live edit of ``spec.schedule`` lets it run to the end."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from kube_support.emulator import ApiServerEmulator, declare_resources
from manifests import backfill_document

from backfill_api.kubeapi import KubeApi, backfill_path
from backfill_worker.kube.worker import run_worker

pytestmark = [pytest.mark.kmock(cls=ApiServerEmulator), pytest.mark.timeout(120)]
NS = "shop"


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


@pytest.fixture
async def api(kmock: Any) -> Any:
    declare_resources(kmock)
    client = KubeApi.from_environment(server=str(kmock.url))
    yield client
    client.close()


async def test_worker_waits_for_the_window_then_runs_after_a_live_schedule_edit(api: KubeApi, database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, counter int NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO items (id) SELECT generate_series(1, 1000)")
    opens = (datetime.now(UTC) + timedelta(hours=12)).replace(second=0, microsecond=0)
    closes = opens + timedelta(hours=1)
    schedule = {"timeZone": "UTC", "windows": [{"start": opens.strftime("%H:%M"), "end": closes.strftime("%H:%M")}]}
    document = backfill_document("bf", NS, database={"dsnSecretRef": {"name": "db"}}, table="items",
                                 set={"counter": "counter + 1"}, where="counter = 0", schedule=schedule)
    await call(api.create, backfill_path(NS), document)
    worker = asyncio.ensure_future(call(run_worker, api, NS, "bf", 0, database, run=1, poll_seconds=0.1, patch_interval=0.2))
    shard: dict[str, Any] = {}
    for _ in range(200):
        await asyncio.sleep(0.1)
        shard = ((await call(api.get, backfill_path(NS, "bf"))).get("status") or {}).get("shards", {}).get("0", {})
        if shard.get("throttleReason") == "window":
            break
    assert shard["state"] == "running" and shard["throttleReason"] == "window"
    assert shard["nextWindowStart"] == opens.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert shard.get("rowsUpdated", 0) == 0 and not worker.done()

    await call(api.merge_patch, backfill_path(NS, "bf"), {"spec": {"schedule": None}})  # run now
    assert await asyncio.wait_for(worker, 60) == 0
    done = (await call(api.get, backfill_path(NS, "bf")))["status"]["shards"]["0"]
    assert done["state"] == "done" and done["rowsUpdated"] == 1000
    assert "nextWindowStart" not in done and "throttleReason" not in done  # deleted by the merge patches
    assert done["throttledSeconds"]["window"] > 0
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FILTER (WHERE counter = 1), count(*) FROM items").fetchone() == (1000, 1000)
