"""A restart waits for the previous run's session (issue 19, part 3), bounded by spec.limits.restartWait.

The decision (whose lock, wait or refuse) is pure; the acceptance test SIGKILLs a real
``backfill run`` in the middle of a slow batch (a row trigger that sleeps) and reruns it at
once: exit 0, every row changed exactly once (a non-idempotent counter). A lock held by any
other session is still refused at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from support_faults.sigkill import BACKFILL

from backfill_api.errors import AlreadyRunning, ManifestError
from backfill_api.manifest import parse_backfill
from backfill_api.model import Backfill
from backfill_worker.run.engine import run_backfill
from backfill_worker.sql import locking
from backfill_worker.sql.locking import LockDecision, LockHolder, decide_lock, describe_holder, own_application_names

IDENTITY = "t/restart"


def holder(application_name: str, query: str = "UPDATE t SET n = n + 1", seconds: float = 1.5) -> LockHolder:
    return LockHolder(4242, application_name, "active", query, seconds)


# -- pure -----------------------------------------------------------------------------------------


def test_a_session_of_this_backfill_is_waited_for_up_to_the_bound() -> None:
    for name in ("backfill t/restart", "backfill t/restart shard 0"):
        assert decide_lock(holder(name), IDENTITY, 0, waited=0.0, bound=60) is LockDecision.WAIT
        assert decide_lock(holder(name), IDENTITY, 0, waited=59.9, bound=60) is LockDecision.WAIT
        assert decide_lock(holder(name), IDENTITY, 0, waited=60.0, bound=60) is LockDecision.REFUSE
    assert decide_lock(holder("backfill t/restart"), IDENTITY, 0, waited=0.0, bound=0) is LockDecision.REFUSE


def test_anything_else_is_refused_at_once() -> None:
    for name in ("", "psql", "backfill t/restart shard 1", "backfill t/restart-other", "backfill t/restart plan",
                 "backfill t/restartx shard 0"):
        assert decide_lock(holder(name), IDENTITY, 0, waited=0.0, bound=60) is LockDecision.REFUSE, name


def test_a_lock_released_between_try_and_look_up_is_tried_again() -> None:
    assert decide_lock(None, IDENTITY, 0, waited=1.0, bound=60) is LockDecision.WAIT


def test_long_identities_match_the_name_the_server_kept() -> None:
    identity = "namespace-" + "n" * 40 + "/" + "backfill-" + "x" * 40
    names = own_application_names(identity, 3)
    assert all(len(name.encode()) <= 63 for name in names)
    assert decide_lock(holder(f"backfill {identity} shard 3"[:63]), identity, 3, waited=0, bound=60) is LockDecision.WAIT


def test_the_holder_is_described_redacted_and_cut() -> None:
    text = describe_holder(holder("x", "UPDATE t\n   SET secret = 'Sekr3t-pw'  " + "x" * 500),
                           lambda s: s.replace("Sekr3t-pw", "***"), limit=60)
    assert text.startswith("pid 4242 (active for 1.5 s): UPDATE t SET secret = '***'")
    assert len(text) < 100 and text.endswith("...") and "Sekr3t" not in text


def test_acquire_polls_while_its_own_session_holds_the_lock_then_takes_it() -> None:
    answers = iter([False, False, True])
    seen: list[float] = []
    now = [0.0]

    class Conn:  # the two queries acquire runs, answered in order (the decision logic is what is under test)
        def execute(self, query: str, params: Any) -> Any:
            result = next(answers) if "pg_try_advisory_lock" in query else None
            row = (result,) if result is not None else (1234, "backfill t/restart", "active", "UPDATE t", 2.0, 1000.0, 0.0)
            return type("R", (), {"fetchone": lambda self: row})()

    def sleep(seconds: float) -> None:
        now[0] += seconds

    refusal = locking.acquire(Conn(), IDENTITY, 0, wait_seconds=60, on_wait=lambda h, w: seen.append(w),  # type: ignore[arg-type]
                              clock=lambda: now[0], sleep=sleep)
    assert refusal is None and seen == [0.0, 0.2]


# -- real PostgreSQL ----------------------------------------------------------------------------

ROWS = 120


def document(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "backfill.dev/v1alpha1",
        "kind": "Backfill",
        "metadata": {"name": "restart", "namespace": "t"},
        "spec": {
            "table": "t",
            "set": {"n": "n + 1"},  # not idempotent: a batch applied twice shows as 2
            # Fixed 40-row batches; the trigger sleeps 100 ms a row: each batch runs ~4 s,
            # longer than a rerun takes to start and reach the lock.
            "batch": {"size": 40, "minSize": 40, "maxSize": 40, "targetDuration": "0", "pause": "0"},
            **spec,
        },
    }


def make(**spec: Any) -> Backfill:
    return parse_backfill(document(**spec))


def slow_table(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO t (id) SELECT generate_series(1, %s)", [ROWS])
        conn.execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.1); RETURN NEW; END $$"
        )
        conn.execute("CREATE TRIGGER t_slow BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION slow()")


def test_rerun_right_after_sigkill_mid_batch_waits_and_changes_every_row_once(database: str, tmp_path: Path) -> None:
    slow_table(database)
    path = tmp_path / "restart.yaml"
    path.write_text(yaml.safe_dump(document()))
    env = {**os.environ, "BACKFILL_DSN": database}
    proc = subprocess.Popen([BACKFILL, "run", str(path), "--json-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if '"BatchCommitted"' in line:
            break
    with psycopg.connect(database, autocommit=True) as conn:
        deadline = time.monotonic() + 20
        while conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'backfill t/restart' AND wait_event = 'PgSleep'"
        ).fetchone() != (1,):
            assert time.monotonic() < deadline, "no batch in flight"
            time.sleep(0.02)
        time.sleep(0.1)  # mid-batch: the trigger is sleeping row by row
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        started = time.monotonic()
        rerun = subprocess.run([BACKFILL, "run", str(path)], capture_output=True, text=True, env=env, timeout=120)
        took = time.monotonic() - started
        counters = conn.execute("SELECT n, count(*) FROM t GROUP BY n ORDER BY n").fetchall()
    print(f"rerun took {took:.1f} s; stderr: {rerun.stderr}")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "waiting for the previous run's session to release the shard's lock" in rerun.stderr
    assert "pid " in rerun.stderr and "active for" in rerun.stderr
    assert counters == [(1, ROWS)]


def refused_while_held(
    database: str, application_name: str, restart_wait: str, match: str, busy_seconds: float = 0.0
) -> tuple[float, str]:
    """Run the backfill while a session named ``application_name`` holds shard 0's lock (and, with
    ``busy_seconds``, runs one statement that long, as a killed run's backend finishing its batch
    does): the seconds until it was refused and the message; nothing may have changed."""
    slow_table(database)
    backfill = make(limits={"restartWait": restart_wait})
    with psycopg.connect(database, autocommit=True, application_name=application_name) as other:
        other.execute("SELECT pg_advisory_lock(hashtext('backfill:' || %s), 0)", [backfill.identity])
        busy = threading.Thread(target=other.execute, args=(f"SELECT pg_sleep({busy_seconds})",), daemon=True)
        if busy_seconds:
            busy.start()
            time.sleep(0.2)  # the statement is running
        started = time.monotonic()
        with pytest.raises(AlreadyRunning, match=match) as raised:
            run_backfill(backfill, database)
        took = time.monotonic() - started
        if busy_seconds:
            busy.join()
    with psycopg.connect(database, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM t WHERE n <> 0").fetchone() == (0,)
    return took, str(raised.value)


def test_a_lock_held_by_another_session_is_refused_at_once(database: str) -> None:
    took, _ = refused_while_held(database, "psql", "60s", r"already being run by another process \(advisory lock held\)")
    assert took < 10  # not the 60 s bound


def test_a_live_session_of_this_backfill_is_waited_for_only_up_to_the_bound(database: str) -> None:
    took, message = refused_while_held(database, "backfill t/restart", "1s",
                                       r"still holds the shard's lock after 1 s .*restartWait.*pid \d+", busy_seconds=3)
    assert 1.0 <= took < 10 and "nothing was changed" in message


def test_an_idle_session_of_this_backfill_is_a_live_runner_refused_without_the_bound(database: str) -> None:
    # Idle with the lock for longer than a dying backend can be: its client is alive (or frozen).
    took, message = refused_while_held(database, "backfill t/restart", "60s", r"a live run of this backfill holds the shard's lock")
    assert took < 10 and "nothing was changed" in message


def test_the_bound_is_a_validated_setting_with_a_default() -> None:
    assert make().spec.limits.restart_wait.total_seconds() == 60
    assert make(limits={"restartWait": "0"}).spec.limits.restart_wait.total_seconds() == 0
    with pytest.raises(ManifestError, match=r"spec.limits.restartWait: must be between 0 and 5m"):
        make(limits={"restartWait": "10m"})


def test_a_holder_that_goes_on_to_a_new_statement_is_a_live_runner_refused_at_once():
    # A killed run's backend finishes the statement it was on and exits; a live runner of the same
    # backfill starts statement after statement: that one is refused without waiting out the bound.
    name = f"backfill {IDENTITY}"
    first = LockHolder(4242, name, "active", "UPDATE ...", 0.5, statement_started=1000.0)
    same = LockHolder(4242, name, "active", "UPDATE ...", 2.5, statement_started=1000.0)
    next_statement = LockHolder(4242, name, "active", "UPDATE ...", 0.1, statement_started=1002.4)
    other_backend = LockHolder(4343, name, "active", "UPDATE ...", 0.1, statement_started=1000.0)
    assert decide_lock(same, IDENTITY, 0, waited=2.0, bound=60, first_seen=first) is LockDecision.WAIT
    assert decide_lock(next_statement, IDENTITY, 0, waited=2.0, bound=60, first_seen=first) is LockDecision.REFUSE
    assert decide_lock(other_backend, IDENTITY, 0, waited=2.0, bound=60, first_seen=first) is LockDecision.REFUSE
    assert not same.moved_on_from(first) and next_statement.moved_on_from(first)


def test_an_own_holder_idle_for_its_client_is_a_live_runner_refused_at_once():
    # A killed client's backend exits as soon as its statement ends; one idle for a second waits
    # for a live (perhaps frozen) client: no reason to wait out the bound.
    name = f"backfill {IDENTITY}"
    for state in ("idle", "idle in transaction"):
        just_now = LockHolder(4242, name, state, "UPDATE ...", 0.5, statement_started=1000.0, idle_seconds=0.05)
        a_while = LockHolder(4242, name, state, "UPDATE ...", 0.5, statement_started=1000.0, idle_seconds=1.0)
        assert decide_lock(just_now, IDENTITY, 0, waited=0.2, bound=60, first_seen=just_now) is LockDecision.WAIT
        assert decide_lock(a_while, IDENTITY, 0, waited=0.2, bound=60, first_seen=just_now) is LockDecision.REFUSE
    running = LockHolder(4242, name, "active", "UPDATE ...", 9.0, statement_started=1000.0, idle_seconds=0.0)
    assert decide_lock(running, IDENTITY, 0, waited=9.0, bound=60, first_seen=running) is LockDecision.WAIT
