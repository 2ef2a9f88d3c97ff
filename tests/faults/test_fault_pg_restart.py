"""PostgreSQL restarted in the middle of a run, several times: the engine reconnects, re-takes
its advisory lock, re-reads its checkpoint and finishes exactly.

``fast`` is the required case (``pg_ctl -m fast``: sessions terminated, clean shutdown);
``immediate`` adds a server crash with WAL recovery on start."""

from __future__ import annotations

import time

import pytest
from support_faults import ledger
from support_faults.engine_run import EngineThread
from support_faults.seeds import seeded_random

from backfill_cli.localpg import LocalPostgres
from backfill_worker.sql.retry import CONNECTION

ROWS = 300_000
BATCH = 2_000
RESTARTS = 3


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_engine_survives_restarts_of_postgres(own_server: LocalPostgres, mode: str) -> None:
    dsn = own_server.dsn()
    ledger.seed(dsn, ROWS)
    document = ledger.manifest(
        "pg-restart",
        batch={"size": BATCH, "minSize": 100, "maxSize": BATCH, "targetDuration": "0s"},
        limits={"maxRetries": 20},
    )
    total_batches = ROWS // BATCH
    engine = EngineThread(document, dsn).start()
    restart_seconds = []
    for i in range(RESTARTS):
        # Spread the restarts over the run: after ~20 %, ~45 %, ~70 % of the batches.
        engine.wait_for_batches(int(total_batches * (0.2 + 0.25 * i)))
        started = time.monotonic()
        own_server.restart(mode)
        restart_seconds.append(time.monotonic() - started)
    report = engine.join(timeout=180)

    assert report.state == "done"
    connection_retries = [r for r in engine.retries() if r.error_kind == CONNECTION]
    assert len(connection_retries) >= RESTARTS, engine.retries()
    result = ledger.check(dsn)
    result.assert_exact()
    assert report.rows_updated == result.matching
    # `where` still selects the incremented rows (the SET does not change grp): verification
    # counts them all, which proves it ran over the whole range after the restarts.
    assert report.remaining_matches == result.matching
    ledger.report(
        f"PostgreSQL restart (-m {mode}) mid-run",
        faults_injected=RESTARTS,
        runs=1,
        ledger=result,
        reconnect_retries=len(connection_retries),
        restart_seconds_max=round(max(restart_seconds), 2),
    )


@pytest.mark.slow
def test_engine_survives_its_sessions_being_terminated_over_and_over(database: str) -> None:
    """``pg_terminate_backend`` on the engine's session every 30-150 ms for the whole run: many
    of the kills land inside a batch transaction or on its COMMIT (whose acknowledgement is then
    lost: the engine must re-read its checkpoint to know whether the batch counted)."""
    import threading

    import psycopg

    ledger.seed(database, ROWS)
    document = ledger.manifest(
        "terminated",
        batch={"size": BATCH, "minSize": 100, "maxSize": BATCH, "targetDuration": "0s"},
        limits={"maxRetries": 50},
    )
    engine = EngineThread(document, database)
    stop = threading.Event()
    kills: list[str] = []

    rng = seeded_random("pg_restart killer")

    def killer() -> None:
        with psycopg.connect(database, autocommit=True) as conn:
            while not stop.wait(rng.uniform(0.03, 0.15)):
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid), state FROM pg_stat_activity"
                    " WHERE application_name LIKE 'backfill faults/terminated%'"
                ).fetchall()
                kills.extend(state for killed, state in rows if killed)

    thread = threading.Thread(target=killer, daemon=True)
    engine.start()
    engine.wait_for_batches(1)  # past validation and planning (a kill there is a plain failure to start)
    thread.start()
    try:
        report = engine.join(timeout=180)
    finally:
        stop.set()
        thread.join(10)

    assert report.state == "done"
    assert len(kills) >= 20, f"only {len(kills)} sessions terminated"
    result = ledger.check(database)
    result.assert_exact()
    assert report.rows_updated == result.matching
    in_transaction = sum(state in ("active", "idle in transaction") for state in kills)
    ledger.report(
        "engine session terminated (pg_terminate_backend) every 30-150 ms",
        faults_injected=len(kills),
        runs=1,
        ledger=result,
        kills_while_active_or_in_transaction=in_transaction,
        reconnect_retries=sum(r.error_kind == CONNECTION for r in engine.retries()),
    )
