"""SIGKILL a real ``backfill run`` of each new kind (delete, copy with both conflict policies,
joined update) at random moments, rerun after each kill, and check exactly-once against the
frozen snapshot of the seeded table (``support_faults.ledger``):

- delete: exactly the matching rows are gone, every other row is untouched;
- copy: every matching row is in the target once with the source's values (the target's primary
  key makes a duplicate impossible, so "once" is also checked by a trigger that counts writes:
  ``update`` rewrites only the rows that were there before, exactly once; ``doNothing`` leaves
  them as they were);
- joined update: ``counter + 1`` from the join on every matching row exactly once.

The checkpoints' ``rows_updated`` must equal the rows changed: a batch committed twice, or a
committed batch whose checkpoint was lost, shows up there too.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from manifests import write_manifest
from support_faults import ledger
from support_faults.cli import start, wait_for_backends_gone
from support_faults.secrets import CANARY_PASSWORD, assert_absent
from support_faults.seeds import seeded_random

ROWS = 30_000
KILLS = 5
BATCH = {"size": 300, "minSize": 100, "maxSize": 600, "targetDuration": "20ms"}

TARGET = (
    "CREATE SCHEMA archive",
    "CREATE TABLE archive.items (id bigint PRIMARY KEY, grp int NOT NULL, payload text NOT NULL,"
    " writes int NOT NULL DEFAULT 0)",
    # Counts every UPDATE of a target row (ON CONFLICT DO UPDATE included).
    "CREATE FUNCTION archive.count_writes() RETURNS trigger LANGUAGE plpgsql AS"
    " $$ BEGIN NEW.writes := OLD.writes + 1; RETURN NEW; END $$",
    "CREATE TRIGGER count_writes BEFORE UPDATE ON archive.items FOR EACH ROW EXECUTE FUNCTION archive.count_writes()",
    # Rows already in the target before the copy (every 10th matching row), with a stale payload.
    "INSERT INTO archive.items (id, grp, payload) SELECT id, grp, 'stale' FROM items WHERE grp < 50 AND id % 10 = 0",
)
ACCOUNTS = (
    "CREATE TABLE accounts (grp int PRIMARY KEY, bonus int NOT NULL)",
    "INSERT INTO accounts SELECT g, 1 FROM generate_series(0, 99) g",
)

KINDS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "delete": ({"set": None, "delete": {}}, ()),
    "copy-doNothing": ({"set": None, "copy": {"table": "archive.items", "columns": {"id": "id", "grp": "grp", "payload": "payload"},
                                               "onConflict": "doNothing"}}, TARGET),
    "copy-update": ({"set": None, "copy": {"table": "archive.items", "columns": {"id": "id", "grp": "grp", "payload": "payload"},
                                            "onConflict": "update"}}, TARGET),
    "join-update": ({"set": {"counter": "items.counter + a.bonus"},
                     "from": [{"table": "accounts", "alias": "a", "condition": "a.grp = items.grp"}],
                     "where": "items.grp < 50"}, ACCOUNTS),
}


def _keys_done(conn: psycopg.Connection, identity: str) -> int:
    try:
        row = conn.execute("SELECT coalesce(sum(keys_done), 0) FROM backfill.checkpoints WHERE identity = %s", [identity]).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row[0]) if row else 0


def _scalar(conn: psycopg.Connection, query: str) -> Any:
    row = conn.execute(query).fetchone()
    return row[0] if row else None


def _check(conn: psycopg.Connection, kind: str) -> dict[str, int]:
    """Rows that differ from what exactly-once gives, by what went wrong (all must be 0)."""
    if kind == "delete":
        return {
            "matching rows left": _scalar(conn, "SELECT count(*) FROM items WHERE grp < 50"),
            "other rows gone or changed": _scalar(
                conn, "SELECT count(*) FROM items_snapshot s WHERE s.grp >= 50 AND NOT EXISTS"
                      " (SELECT 1 FROM items i WHERE (i.*)::text = (s.*)::text)"),
        }
    if kind.startswith("copy"):
        stale = "'stale'" if kind == "copy-doNothing" else "s.payload"
        rewritten = 0 if kind == "copy-doNothing" else 1
        return {
            "missing or wrong in the target": _scalar(
                conn, f"SELECT count(*) FROM items_snapshot s WHERE s.grp < 50 AND NOT EXISTS (SELECT 1 FROM archive.items a"
                      f" WHERE a.id = s.id AND a.grp = s.grp AND a.payload = CASE WHEN s.id % 10 = 0 THEN {stale} ELSE s.payload END)"),
            "target rows that are not matching source rows": _scalar(
                conn, "SELECT count(*) FROM archive.items a WHERE NOT EXISTS (SELECT 1 FROM items_snapshot s WHERE s.id = a.id AND s.grp < 50)"),
            "target rows written a wrong number of times": _scalar(
                conn, f"SELECT count(*) FROM archive.items WHERE writes <> CASE WHEN id % 10 = 0 THEN {rewritten} ELSE 0 END"),
            "source rows changed": _scalar(
                conn, "SELECT count(*) FROM items_snapshot s JOIN items i USING (id) WHERE (i.*)::text <> (s.*)::text"),
        }
    raise AssertionError(f"no check for {kind}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_sigkill_mid_run_then_rerun_is_exactly_once(database: str, tmp_path: Path, kind: str) -> None:
    name = f"kinds-{kind.lower()}"
    identity = f"faults/{name}"
    application = f"backfill {identity}"
    rng = seeded_random(f"fault kinds {kind}")
    ledger.seed(database, ROWS)
    spec, setup = KINDS[kind]
    with psycopg.connect(database, autocommit=True) as conn:
        for command in setup:
            conn.execute(command)
        preexisting = _scalar(conn, "SELECT count(*) FROM archive.items") if kind.startswith("copy") else 0
    document = ledger.manifest(name, batch=BATCH, parallelism=2, **spec)
    manifest = write_manifest(tmp_path, document)

    kills, outputs = 0, {}
    with psycopg.connect(database, autocommit=True) as watch:
        for number, point in enumerate(sorted(rng.uniform(0.05, 0.85) for _ in range(KILLS))):
            process, out, err = start(["run", str(manifest)], database, tmp_path, f"run{number}")
            goal = max(int(point * ROWS), _keys_done(watch, identity) + 1)
            while process.poll() is None and _keys_done(watch, identity) < goal:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.02))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(30)
                kills += 1
            outputs[f"run{number} stdout"], outputs[f"run{number} stderr"] = out.read_text(), err.read_text()
            assert process.returncode in (-signal.SIGKILL, 0), outputs[f"run{number} stderr"]
            wait_for_backends_gone(database, application)
        final, out, err = start(["run", str(manifest)], database, tmp_path, "final")
        assert final.wait(180) == 0, err.read_text()
        outputs["final stdout"], outputs["final stderr"] = out.read_text(), err.read_text()

        matching = _scalar(watch, "SELECT count(*) FROM items_snapshot WHERE grp < 50")
        states, counted = watch.execute(
            "SELECT array_agg(DISTINCT state), sum(rows_updated)::bigint FROM backfill.checkpoints WHERE identity = %s", [identity]
        ).fetchone()
        if kind == "join-update":
            result = ledger.check(database)
            result.assert_exact()
            wrong = {"rows not changed exactly once": result.lost_or_doubled}
        else:
            wrong = _check(watch, kind)
    assert kills >= KILLS - 2, f"only {kills} kills landed mid-run"
    assert states == ["done"]
    assert wrong == dict.fromkeys(wrong, 0), wrong
    # rows changed, once each: copy doNothing skips the rows already there
    assert counted == (matching - preexisting if kind == "copy-doNothing" else matching)
    assert "state=done" in outputs["final stdout"]
    if kind != "join-update":  # its where (grp < 50) stays true after the change, so it counts every row
        assert "remaining_matches=0" in outputs["final stdout"]
    assert_absent([CANARY_PASSWORD, database], outputs)
    ledger.figures(f"SIGKILL of `backfill run` ({kind}), rerun each time", faults_injected=kills, runs=KILLS + 1,
                   rows_checked=ROWS, **wrong)
