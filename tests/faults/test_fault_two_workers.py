"""Two workers for the same backfill and shard: one runs, the other exits cleanly with exit
code 3 (``AlreadyRunning``) and touches nothing (table checksum and checkpoint row unchanged)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psycopg
import pytest
from manifests import write_manifest
from support_faults import ledger
from support_faults.cli import run, start
from support_faults.secrets import CANARY_PASSWORD, assert_absent

from backfill_api.errors import AlreadyRunning
from backfill_api.manifest import parse_backfill
from backfill_worker.run.engine import reset_checkpoints

CHECKSUM = "SELECT md5(string_agg(i::text, ',' ORDER BY id)) FROM items i"


def _checkpoint(conn: psycopg.Connection, identity: str) -> tuple | None:
    return conn.execute("SELECT * FROM backfill.checkpoints WHERE identity = %s", [identity]).fetchone()


def _wait_batches(conn: psycopg.Connection, identity: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            row = conn.execute("SELECT batches FROM backfill.checkpoints WHERE identity = %s", [identity]).fetchone()
        except psycopg.errors.UndefinedTable:
            row = None
        if row and row[0] >= count:
            return
        assert time.monotonic() < deadline, f"fewer than {count} batches after {timeout} s"
        time.sleep(0.01)


@pytest.mark.slow
def test_second_worker_exits_3_and_touches_nothing(database: str, tmp_path: Path) -> None:
    ledger.seed(database, 50_000)
    document = ledger.manifest(
        "two-workers", batch={"size": 1_000, "minSize": 100, "maxSize": 1_000, "targetDuration": "0s", "pause": "20ms"}
    )
    manifest = write_manifest(tmp_path, document)
    first, first_out, first_err = start(["run", str(manifest), "--shard", "0"], database, tmp_path, "first")
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            _wait_batches(conn, "faults/two-workers", 3)
            # Freeze the first worker: nothing changes while the second one tries its luck.
            first.send_signal(signal.SIGSTOP)
            time.sleep(0.2)
            before = conn.execute(CHECKSUM).fetchone(), _checkpoint(conn, "faults/two-workers")
            started = time.monotonic()
            second = run(["run", str(manifest), "--shard", "0"], database, timeout=60)
            took = time.monotonic() - started
            after = conn.execute(CHECKSUM).fetchone(), _checkpoint(conn, "faults/two-workers")
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == AlreadyRunning.exit_code == 3, second.stderr
    assert "already being run by another process" in second.stderr and "nothing was changed" in second.stderr
    assert "Traceback" not in second.stderr
    assert after == before, "the second worker changed the table or the checkpoint"
    assert first.wait(120) == 0, first_err.read_text()
    result = ledger.check(database)
    result.assert_exact()
    assert_absent([CANARY_PASSWORD, database], {"second stdout": second.stdout, "second stderr": second.stderr,
                                                "first stdout": first_out.read_text(), "first stderr": first_err.read_text()})
    ledger.report("second worker for the same shard (first frozen mid-run)", faults_injected=1, runs=2,
                  ledger=result, second_worker_exit=second.returncode, second_worker_seconds=round(took, 2))


@pytest.mark.slow
def test_two_workers_started_together_exactly_one_runs(database: str, tmp_path: Path) -> None:
    ledger.seed(database, 20_000)
    pairs, results = 3, []
    previous: dict | None = None
    for pair in range(pairs):
        if previous is not None:  # the same change again under a new name is refused unless the old checkpoint is reset
            reset_checkpoints(parse_backfill(previous), database)
        document = previous = ledger.manifest(
            f"together-{pair}",
            set={"counter": "counter + 1"},
            batch={"size": 1_000, "minSize": 100, "maxSize": 1_000, "targetDuration": "0s", "pause": "100ms"},
        )
        manifest = write_manifest(tmp_path, document, f"pair{pair}.yaml")
        both = [start(["run", str(manifest)], database, tmp_path, f"pair{pair}-{i}") for i in range(2)]
        codes = sorted(process.wait(120) for process, _, _ in both)
        errors = [err.read_text() for _, _, err in both]
        assert codes == [0, 3], errors
        assert sum("already being run" in text for text in errors) == 1
        assert_absent([CANARY_PASSWORD, database], {f"pair{pair} stderr {i}": text for i, text in enumerate(errors)})
        results.append(codes)
    # Each pair is a distinct backfill incrementing the matching rows once: +pairs in total.
    with psycopg.connect(database, autocommit=True) as conn:
        wrong = conn.execute(
            "SELECT count(*) FROM items i JOIN items_snapshot s USING (id)"
            " WHERE i.counter <> s.counter + CASE WHEN s.grp < 50 THEN %s ELSE 0 END",
            [pairs],
        ).fetchone()[0]
        checked = conn.execute("SELECT count(*) FROM items_snapshot").fetchone()[0]
    assert wrong == 0
    ledger.figures("two workers started at the same moment", faults_injected=pairs, runs=2 * pairs,
                   rows_checked=checked, lost_or_doubled=wrong, exit_codes=results)
