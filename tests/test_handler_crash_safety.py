"""A non-idempotent Python handler under SIGKILL: the `backfill run` process is killed at random
moments, rerun, and every matching row must be changed exactly once, with exactly one audit row.

The handler increments a counter per row and inserts an audit row per row (two shards: two threads
call it concurrently), so a batch applied twice shows as a counter of 2 and a second audit row.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import yaml
from support_faults.seeds import seeded_random

BACKFILL = str(Path(sys.executable).parent / "backfill")
ROWS = 6_000
KILLS = 5
ALREADY_RUNNING = 3

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

    kills = 0
    started = time.monotonic()
    while kills < KILLS:
        assert time.monotonic() - started < 90, f"only {kills} kills landed mid-run"
        proc = subprocess.Popen(
            [BACKFILL, "run", str(path), "--json-progress"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )
        assert proc.stdout is not None
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
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        kills += 1
    assert kills == KILLS, f"the backfill finished after {kills} kills: make it longer"

    for _ in range(50):  # the last killed run's session may still hold its advisory lock for a moment
        final = subprocess.run([BACKFILL, "run", str(path)], capture_output=True, text=True, env=env, timeout=120)
        if final.returncode != ALREADY_RUNNING:
            break
        time.sleep(0.2)
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
