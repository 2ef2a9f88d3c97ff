"""atLeastOnce mode: shard workers that start together agree on one shard plan."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg

from backfill_api.manifest import parse_backfill
from backfill_worker.checkpoints.checkpoint import JsonFileStore, ShardCheckpoint
from backfill_worker.run.engine import run_backfill


class FirstLoadMeets(JsonFileStore):
    """A file store whose first load waits for the other worker's first load.

    That forces the race: both workers look for a plan before either saved one. It also
    counts saves of fresh plan rows (no last key yet), i.e. how often a plan was written.
    """

    def __init__(self, directory: Path, identity: str, barrier: threading.Barrier, plan_saves: list[int]) -> None:
        super().__init__(directory, identity)
        self._barrier, self._plan_saves, self._first = barrier, plan_saves, True

    def load(self, shard: int) -> ShardCheckpoint | None:
        if self._first:
            self._first = False
            self._barrier.wait(timeout=30)
        return super().load(shard)

    def save(self, shard: int, state: ShardCheckpoint) -> None:
        if state.last_key is None and state.batches == 0:
            self._plan_saves.append(shard)
        super().save(shard, state)


def test_concurrent_shard_workers_save_one_plan_and_update_every_row_once(database: str, tmp_path: Path) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO t (id) SELECT generate_series(1, 3000)")
    backfill = parse_backfill({
        "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": "alo", "namespace": "t"},
        "spec": {"table": "t", "set": {"n": "n + 1"}, "parallelism": 2, "checkpoint": {"mode": "atLeastOnce"},
                 "batch": {"size": 100, "minSize": 1, "maxSize": 100, "targetDuration": "0"}},
    })
    barrier, plan_saves, errors = threading.Barrier(2), [], []

    def worker(shard: int) -> None:
        store = FirstLoadMeets(tmp_path, backfill.identity, barrier, plan_saves)
        try:
            run_backfill(backfill, database, shards=[shard], at_least_once_store=store)
        except Exception as error:  # reported below, with the other worker's outcome
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(shard,)) for shard in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert sorted(plan_saves) == [0, 1], "exactly one plan (one row per shard) may be saved"
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT n, count(*) FROM t GROUP BY n").fetchall() == [(1, 3000)]
