"""Crash safety: SIGKILL the `backfill run` process at random moments, rerun, and check exactly-once.

The SET is not idempotent (``counter = counter + 1``): a batch applied twice, or a batch whose
checkpoint was lost, shows up as a counter of 2 (or 0) on some row.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import yaml
from support_faults.seeds import seeded_random

BACKFILL = str(Path(sys.executable).parent / "backfill")
ROWS = 60_000
KILLS = 12
ALREADY_RUNNING = 3


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

    kills = 0
    started = time.monotonic()
    while kills < KILLS:
        assert time.monotonic() - started < 90, f"only {kills} kills landed mid-run"
        proc = subprocess.Popen(
            [BACKFILL, "run", str(path), "--json-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )
        assert proc.stdout is not None
        # Wait until batches are being committed, then kill at a random moment (often mid-transaction).
        running = False
        for line in proc.stdout:
            if '"BatchCommitted"' in line:
                running = True
                break
        if not running:  # finished already, or lost the lock race against the previous (dying) run
            proc.wait(timeout=30)
            assert proc.returncode in (0, ALREADY_RUNNING), proc.returncode
            if proc.returncode == 0:
                break
            time.sleep(0.1)
            continue
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        kills += 1
    assert kills >= 10, f"the backfill finished after {kills} kills: make it longer"

    for _ in range(50):  # the last killed run's session may still hold its advisory lock for a moment
        final = subprocess.run([BACKFILL, "run", str(path)], capture_output=True, text=True, env=env, timeout=120)
        if final.returncode != ALREADY_RUNNING:
            break
        time.sleep(0.2)
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
