"""Crash safety: SIGKILL the `backfill run` process at random moments, rerun, and check exactly-once.

The SET is not idempotent (``counter = counter + 1``): a batch applied twice, or a batch whose
checkpoint was lost, shows up as a counter of 2 (or 0) on some row.
"""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import yaml
from support_faults.seeds import seeded_random
from support_faults.sigkill import kill_mid_run, run_to_the_end

ROWS = 60_000
KILLS = 12


def test_sigkill_at_random_moments_changes_every_matching_row_exactly_once(database: str, tmp_path: Path) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE accounts (id bigint PRIMARY KEY, grp int NOT NULL, counter int NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO accounts (id, grp) SELECT i * 3, i %% 5 FROM generate_series(1, %s) i", [ROWS])
    document = {
        "apiVersion": "backfill.dev/v1alpha1",
        "kind": "Backfill",
        "metadata": {"name": "crash", "namespace": "t"},
        "spec": {
            "table": "accounts",
            "set": {"counter": "counter + 1"},
            "where": "grp <> 0",
            # Small batches and a short pause: about 600 batches per shard, ~4 s in all, so that
            # every kill lands mid-run; the kills hit transactions, commits and pauses alike.
            "batch": {"size": 50, "minSize": 50, "maxSize": 50, "targetDuration": "0", "pause": "5ms"},
            "parallelism": 2,
        },
    }
    path = tmp_path / "crash.yaml"
    path.write_text(yaml.safe_dump(document))
    env = {**os.environ, "BACKFILL_DSN": database}
    rng = seeded_random("crash_safety", default=20261128)

    kills = kill_mid_run(path, env, KILLS, rng, max_delay=0.25)
    assert kills >= 10, f"the backfill finished after {kills} kills: make it longer"
    final = run_to_the_end(path, env)
    assert final.returncode == 0, final.stdout + final.stderr

    with psycopg.connect(database, autocommit=True) as conn:
        by_group = conn.execute(
            "SELECT grp <> 0 AS matching, counter, count(*) FROM accounts GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall()
        checkpoints = conn.execute("SELECT state, rows_updated FROM backfill.checkpoints ORDER BY shard").fetchall()
    matching = ROWS - ROWS // 5
    assert by_group == [(False, 0, ROWS // 5), (True, 1, matching)]
    assert [state for state, _ in checkpoints] == ["done", "done"]
    assert sum(rows for _, rows in checkpoints) == matching  # the checkpoint counted each row once too
