"""SIGKILL the ``backfill run`` process at random moments (>= 20 times) during one
1,000,000-row backfill whose SET is not idempotent; rerun after each kill. Every matching row
must end up incremented exactly once and no other row touched.

Kill moments are drawn at random: most are "when the checkpoint has passed a random point of
the key range, plus 0-30 ms" (so kills land before, inside and right after batch transactions,
spread over the whole run), a few are "0-1.2 s after start" (startup, validation, planning).
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import psycopg
import pytest

from support_faults import ledger
from support_faults.cli import start, wait_for_backends_gone, write_manifest
from support_faults.secrets import CANARY_PASSWORD, assert_absent

ROWS = 1_000_000
PROGRESS_KILLS = 21
STARTUP_KILLS = 3
NAME = "sigkill"
APPLICATION = f"backfill faults/{NAME}"
"""Prefix of the engine's application_name (``backfill <namespace>/<name> ...``)."""


def _progress(conn: psycopg.Connection) -> tuple[int, str | None]:
    """(keys done, state) of the checkpoint, (0, None) before the plan exists."""
    try:
        row = conn.execute(
            "SELECT keys_done, state FROM backfill.checkpoints WHERE identity = %s AND shard = 0", [f"faults/{NAME}"]
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0, None
    return (int(row[0]), row[1]) if row else (0, None)


def _in_transaction(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s AND xact_start IS NOT NULL",
        [APPLICATION + "%"],
    ).fetchone()
    return bool(row and row[0])


@pytest.mark.slow
def test_sigkill_at_random_moments_changes_every_row_exactly_once(database: str, tmp_path: Path) -> None:
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    print(f"random seed: {seed}")
    ledger.seed(database, ROWS)
    document = ledger.manifest(
        NAME, batch={"size": 2_000, "minSize": 500, "maxSize": 20_000, "targetDuration": "40ms"}
    )
    manifest = write_manifest(tmp_path, document)
    # Kill plan: random points of the key range (sorted: the run moves forward) and startup kills.
    points = sorted(rng.uniform(0.02, 0.95) for _ in range(PROGRESS_KILLS))
    plan: list[tuple[str, float]] = [("progress", p) for p in points]
    for _ in range(STARTUP_KILLS):
        plan.insert(rng.randrange(len(plan) + 1), ("startup", rng.uniform(0.0, 1.2)))

    kills = inside_transaction = finished_early = 0
    lingering: list[float] = []
    outputs: dict[str, str] = {}
    runs = 0
    started = time.monotonic()
    with psycopg.connect(database, autocommit=True) as watch:
        for number, (kind, value) in enumerate(plan):
            process, out, err = start(["run", str(manifest)], database, tmp_path, f"run{number}")
            runs += 1
            if kind == "startup":
                time.sleep(value)
            else:
                target = int(value * ROWS)
                while process.poll() is None and _progress(watch)[0] < target:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0, 0.03))
            if process.poll() is None:
                in_txn = _in_transaction(watch)
                process.send_signal(signal.SIGKILL)
                process.wait(30)
                kills += 1
                inside_transaction += in_txn
            else:
                finished_early += 1
            outputs[f"run{number} stdout"], outputs[f"run{number} stderr"] = out.read_text(), err.read_text()
            if process.returncode not in (-signal.SIGKILL, 0):
                raise AssertionError(f"run {number} exited {process.returncode}: {outputs[f'run{number} stderr']}")
            lingering.append(wait_for_backends_gone(database, APPLICATION))

        final, out, err = start(["run", str(manifest)], database, tmp_path, "final")
        runs += 1
        assert final.wait(180) == 0, err.read_text()
        outputs["final stdout"], outputs["final stderr"] = out.read_text(), err.read_text()
        keys_done, state = _progress(watch)
    elapsed = time.monotonic() - started

    assert kills >= 20, f"only {kills} kills landed mid-run ({finished_early} runs finished first)"
    assert state == "done" and keys_done == ROWS
    result = ledger.check(database)
    result.assert_exact()
    assert "state=done" in outputs["final stdout"]
    assert_absent([CANARY_PASSWORD, database], outputs)
    ledger.report(
        "SIGKILL of `backfill run` (random moments), rerun each time",
        faults_injected=kills,
        runs=runs,
        ledger=result,
        kills_with_statement_or_transaction_open=inside_transaction,
        runs_that_finished_before_their_kill=finished_early,
        max_seconds_until_lock_released=round(max(lingering), 3),
        seconds=round(elapsed, 1),
    )
