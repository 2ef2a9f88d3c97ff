"""A non-idempotent Python handler under SIGKILL: the `backfill run` process is killed at random
moments, rerun, and every matching row must be changed exactly once, with exactly one audit row.

The handler increments a counter per row and inserts an audit row per row (two shards: two threads
call it concurrently), so a batch applied twice shows as a counter of 2 and a second audit row.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import psycopg
import yaml
from support_faults.seeds import seeded_random
from support_faults.sigkill import kill_mid_run, run_to_the_end

ROWS = 6_000
KILLS = 5

HANDLER = """
    def bump_and_audit(batch):
        rows = [row["id"] for row in batch.rows()]
        with batch.connection.cursor() as cur:
            cur.executemany("UPDATE accounts SET counter = counter + 1 WHERE id = %s", [(i,) for i in rows])
            cur.executemany("INSERT INTO audit (account, shard) VALUES (%s, %s)", [(i, batch.shard) for i in rows])
"""


def test_sigkill_mid_run_leaves_each_row_changed_and_audited_once(database: str, tmp_path: Path) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE accounts (id bigint PRIMARY KEY, grp int NOT NULL, counter int NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO accounts (id, grp) SELECT i * 3, i %% 5 FROM generate_series(1, %s) i", [ROWS])
        conn.execute("CREATE TABLE audit (account bigint NOT NULL, shard int NOT NULL)")
    (tmp_path / "crash_handlers.py").write_text(textwrap.dedent(HANDLER))
    document = {
        "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": "crash", "namespace": "t"},
        "spec": {
            "table": "accounts",
            "handler": {"callable": "crash_handlers:bump_and_audit"},
            "where": "grp <> 0",  # stays true: a batch handled twice would show (counter 2, two audit rows)
            "batch": {"size": 40, "minSize": 40, "maxSize": 40, "targetDuration": "0", "pause": "5ms"},
            "parallelism": 2,
        },
    }
    path = tmp_path / "crash.yaml"
    path.write_text(yaml.safe_dump(document))
    env = {**os.environ, "BACKFILL_DSN": database, "PYTHONPATH": str(tmp_path)}
    rng = seeded_random("handler_crash_safety", default=20261202)

    kills = kill_mid_run(path, env, KILLS, rng, max_delay=0.2)
    assert kills == KILLS, f"the backfill finished after {kills} kills: make it longer"
    final = run_to_the_end(path, env)
    assert final.returncode == 0, final.stdout + final.stderr

    matching = ROWS - ROWS // 5
    with psycopg.connect(database, autocommit=True) as conn:
        by_group = conn.execute("SELECT grp <> 0, counter, count(*) FROM accounts GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
        audit = conn.execute("SELECT count(*), count(DISTINCT account), count(DISTINCT shard) FROM audit").fetchone()
        checkpoints = conn.execute("SELECT state, rows_updated FROM backfill.checkpoints ORDER BY shard").fetchall()
    assert by_group == [(False, 0, ROWS // 5), (True, 1, matching)]
    assert audit == (matching, matching, 2)
    assert [state for state, _ in checkpoints] == ["done", "done"]
    assert sum(rows for _, rows in checkpoints) == matching
    print(f"FAULT-FIGURES handler SIGKILL: {kills} kills, {matching} rows changed once, {audit[0]} audit rows")
