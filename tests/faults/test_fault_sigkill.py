"""SIGKILL the ``backfill run`` process at random moments (>= 20 times) during one
1,000,000-row backfill whose SET is not idempotent; rerun after each kill. Every matching row
must end up incremented exactly once and no other row touched.

Kill moments are drawn at random: most are "when the checkpoint has passed a random point of
the key range, plus 0-30 ms" (so kills land before, inside and right after batch transactions,
spread over the whole run), a few are "0-0.6 s after start" (imports, validation, planning: the engine needs ~0.4 s to its first batch).
A second, smaller case runs three shards (threads of one process) so one kill interrupts
several shards' batches at once.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psycopg
import pytest
from manifests import write_manifest
from support_faults import ledger
from support_faults.cli import start, wait_for_backends_gone
from support_faults.secrets import CANARY_PASSWORD, assert_absent
from support_faults.seeds import seeded_random


def _progress(conn: psycopg.Connection, name: str) -> tuple[int, set[str]]:
    """(keys done over all shards, shard states) of the checkpoint; (0, set()) before the plan."""
    try:
        row = conn.execute(
            "SELECT coalesce(sum(keys_done), 0), coalesce(array_agg(DISTINCT state), '{}') FROM backfill.checkpoints"
            " WHERE identity = %s",
            [f"faults/{name}"],
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0, set()
    return (int(row[0]), set(row[1])) if row else (0, set())


def _in_transaction(conn: psycopg.Connection, application: str) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s AND xact_start IS NOT NULL",
        [application + "%"],
    ).fetchone()
    return bool(row and row[0])


@pytest.mark.slow
@pytest.mark.parametrize(
    "rows,parallelism,progress_kills,startup_kills",
    [
        pytest.param(1_000_000, 1, 21, 3, id="1M-rows-1-shard-24-kills"),
        # Shards run on threads of one process: a kill interrupts several batches at once.
        pytest.param(300_000, 3, 8, 2, id="300k-rows-3-shards-10-kills"),
    ],
)
def test_sigkill_at_random_moments_changes_every_row_exactly_once(
    database: str, tmp_path: Path, rows: int, parallelism: int, progress_kills: int, startup_kills: int
) -> None:
    name = f"sigkill-{parallelism}"
    application = f"backfill faults/{name}"  # prefix of every engine session's application_name
    rng = seeded_random(name)
    ledger.seed(database, rows)
    # maxSize bounds how far one batch round jumps (shards x maxSize keys), so kill points stay spread.
    document = ledger.manifest(
        name, batch={"size": 2_000, "minSize": 500, "maxSize": 20_000 // parallelism, "targetDuration": "40ms"},
        parallelism=parallelism,
    )
    manifest = write_manifest(tmp_path, document)
    # Kill plan: random points of the key range (sorted: the run moves forward) and startup kills.
    # With shards, progress is a sum that jumps by up to a round of batches: stop earlier.
    last_point = 0.95 if parallelism == 1 else 0.8
    points = sorted(rng.uniform(0.02, last_point) for _ in range(progress_kills))
    plan: list[tuple[str, float]] = [("progress", p) for p in points]
    for _ in range(startup_kills):
        plan.insert(rng.randrange(len(plan) + 1), ("startup", rng.uniform(0.0, 0.6)))

    kills = inside_transaction = finished_early = 0
    lingering: list[float] = []
    outputs: dict[str, str] = {}
    runs = 0
    trace: list[tuple[str, float, int, int | None]] = []
    """(kill kind, point, keys done at the kill, exit code if already exited): for failure reports."""
    started = time.monotonic()
    with psycopg.connect(database, autocommit=True) as watch:
        for number, (kind, value) in enumerate(plan):
            process, out, err = start(["run", str(manifest)], database, tmp_path, f"run{number}")
            runs += 1
            if kind == "startup":
                time.sleep(value)
            else:
                # At least one more batch than what earlier runs did, so that no progress kill
                # degenerates into a startup kill when the previous run overshot this point.
                target = max(int(value * rows), _progress(watch, name)[0] + 1)
                while process.poll() is None and _progress(watch, name)[0] < target:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0, 0.03))
            trace.append((kind, round(value, 3), _progress(watch, name)[0], process.poll()))
            if process.poll() is None:
                in_txn = _in_transaction(watch, application)
                process.send_signal(signal.SIGKILL)
                process.wait(30)
                kills += 1
                inside_transaction += in_txn
            else:
                finished_early += 1
            outputs[f"run{number} stdout"], outputs[f"run{number} stderr"] = out.read_text(), err.read_text()
            if process.returncode not in (-signal.SIGKILL, 0):
                raise AssertionError(f"run {number} exited {process.returncode}: {outputs[f'run{number} stderr']}")
            lingering.append(wait_for_backends_gone(database, application))

        final, out, err = start(["run", str(manifest)], database, tmp_path, "final")
        runs += 1
        assert final.wait(180) == 0, err.read_text()
        outputs["final stdout"], outputs["final stderr"] = out.read_text(), err.read_text()
        keys_done, states = _progress(watch, name)
    elapsed = time.monotonic() - started

    assert kills >= progress_kills + startup_kills - 2, f"only {kills} kills landed mid-run ({finished_early} finished first): {trace}"
    if rows == 1_000_000:
        assert kills >= 20  # issue 5's bar
    assert states == {"done"} and keys_done == rows
    result = ledger.check(database)
    result.assert_exact()
    assert "state=done" in outputs["final stdout"]
    assert_absent([CANARY_PASSWORD, database], outputs)
    ledger.report(
        f"SIGKILL of `backfill run` (random moments, {parallelism} shard(s)), rerun each time",
        faults_injected=kills,
        runs=runs,
        ledger=result,
        kills_with_statement_or_transaction_open=inside_transaction,
        runs_that_finished_before_their_kill=finished_early,
        parallelism=parallelism,
        max_seconds_until_lock_released=round(max(lingering), 3),
        seconds=round(elapsed, 1),
    )


@pytest.mark.slow
def test_sigkill_in_at_least_once_mode_with_an_idempotent_set(database: str, tmp_path: Path) -> None:
    """``checkpoint.mode: atLeastOnce`` keeps progress in a file (``--state-dir``), saved after each
    commit: a kill between the two re-applies the last batch. With an idempotent ``set`` (as
    documented) the result is still exact. A row trigger counts every committed update of each
    row, so re-applied rows are counted exactly."""
    rows, kills_wanted = 300_000, 8
    rng = seeded_random("sigkill atLeastOnce")
    ledger.seed(database, rows)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION count_updates() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN NEW.app_counter := OLD.app_counter + 1; RETURN NEW; END $$"
        )
        conn.execute("CREATE TRIGGER count_updates BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION count_updates()")
    name = "sigkill-alo"
    document = ledger.manifest(
        name, set={"counter": "-1"}, checkpoint={"mode": "atLeastOnce"},
        batch={"size": 2_000, "minSize": 500, "maxSize": 2_000, "targetDuration": "0s"},
    )
    manifest = write_manifest(tmp_path, document)
    state_dir = tmp_path / "state"
    state_file = state_dir / f"faults__{name}.json"
    args = ["run", str(manifest), "--state-dir", str(state_dir)]
    kills, runs, outputs = 0, 0, {}
    with psycopg.connect(database, autocommit=True) as watch:
        for point in sorted(rng.uniform(0.05, 0.9) for _ in range(kills_wanted)):
            process, out, err = start(args, database, tmp_path, f"alo{runs}")
            runs += 1
            target = int(point * rows / 2)  # about half the rows match
            while process.poll() is None and watch.execute("SELECT count(*) FROM items WHERE counter = -1").fetchone()[0] < target:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.02))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(30)
                kills += 1
            outputs[f"alo{runs} stderr"] = err.read_text()
            wait_for_backends_gone(database, f"backfill faults/{name}")
        final, out, err = start(args, database, tmp_path, "alo-final")
        runs += 1
        assert final.wait(180) == 0, err.read_text()
        outputs["final stdout"], outputs["final stderr"] = out.read_text(), err.read_text()
        wrong, reapplied = watch.execute(
            "SELECT count(*) FILTER (WHERE CASE WHEN s.grp < 50"
            "   THEN i.counter <> -1 OR i.app_counter < s.app_counter + 1"
            "   ELSE i.counter <> s.counter OR i.app_counter <> s.app_counter END OR i.payload <> s.payload),"
            " count(*) FILTER (WHERE i.app_counter > s.app_counter + 1)"
            " FROM items_snapshot s JOIN items i USING (id)"
        ).fetchone()
        total = watch.execute("SELECT count(*) FROM items").fetchone()[0]
    assert kills >= kills_wanted - 2
    assert wrong == 0 and total == rows
    assert {shard["state"] for shard in json.loads(state_file.read_text()).values()} == {"done"}
    assert_absent([CANARY_PASSWORD, database], outputs)
    ledger.figures("SIGKILL in atLeastOnce mode, idempotent set", faults_injected=kills, runs=runs,
                   rows_checked=rows, rows_wrong=wrong, rows_updated_twice=reapplied)
