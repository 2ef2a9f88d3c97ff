"""SIGKILL ``backfill run`` with ``walk: ctid`` at random moments, rerun after each kill: every
matching row of a table WITHOUT any unique index is incremented exactly once, no other row
touched.

The ledger table loses its primary key and gains ``done``: the change ``counter + 1, done = true``
is not idempotent, and ``where: grp < 50 AND NOT done`` is what it makes false. Fillfactor 100:
every updated row moves to a block past the fixed end, so a kill also lands between a row's move
and the checkpoint of its batch (both in one transaction: both or neither).
"""

from __future__ import annotations

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


def _blocks(conn: psycopg.Connection, name: str) -> tuple[int, int]:
    """(blocks done, blocks planned) over all shards; (0, 0) before the plan."""
    try:
        row = conn.execute(
            "SELECT coalesce(sum(keys_done), 0), coalesce(sum(estimated_keys), 0) FROM backfill.checkpoints WHERE identity = %s",
            [f"faults/{name}"],
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0, 0
    return (int(row[0]), int(row[1])) if row else (0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("rows,parallelism,kills_wanted", [(120_000, 1, 10), (100_000, 3, 6)])
def test_sigkill_during_a_ctid_walk_changes_every_row_exactly_once(
    database: str, tmp_path: Path, rows: int, parallelism: int, kills_wanted: int
) -> None:
    name = f"sigkill-ctid-{parallelism}"
    rng = seeded_random(name)
    ledger.seed(database, rows)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("ALTER TABLE items DROP CONSTRAINT items_pkey, ADD COLUMN done boolean NOT NULL DEFAULT false")
        assert conn.execute("SELECT count(*) FROM pg_index WHERE indrelid = 'items'::regclass").fetchone() == (0,)
    document = ledger.manifest(
        name, walk="ctid", set={**ledger.SET, "done": "true"}, where=f"{ledger.WHERE} AND NOT done",
        batch={"size": 20, "minSize": 5, "maxSize": 200 // parallelism, "targetDuration": "40ms"},
        parallelism=parallelism, limits={"applicationImpact": {"mode": "fast"}},
    )
    manifest = write_manifest(tmp_path, document)
    points = sorted(rng.uniform(0.03, 0.9) for _ in range(kills_wanted))
    kills = finished_early = 0
    outputs: dict[str, str] = {}
    with psycopg.connect(database, autocommit=True) as watch:
        for number, point in enumerate(points):
            process, out, err = start(["run", str(manifest)], database, tmp_path, f"run{number}")
            while process.poll() is None:
                done, planned = _blocks(watch, name)
                if planned and done >= max(int(point * planned), 1):
                    break
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.03))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(30)
                kills += 1
            else:
                finished_early += 1
            outputs[f"run{number} stderr"] = err.read_text()
            assert process.returncode in (-signal.SIGKILL, 0), outputs[f"run{number} stderr"]
            wait_for_backends_gone(database, f"backfill faults/{name}")
        final, out, err = start(["run", str(manifest)], database, tmp_path, "final")
        assert final.wait(180) == 0, err.read_text()
        outputs["final stdout"], outputs["final stderr"] = out.read_text(), err.read_text()
        done, planned = _blocks(watch, name)
        still = watch.execute(f"SELECT count(*) FROM items WHERE {ledger.WHERE} AND NOT done").fetchone()
    assert kills >= kills_wanted - 2, f"only {kills} kills landed mid-run ({finished_early} finished first)"
    assert done == planned > 0 and still == (0,)
    result = ledger.check(database)
    result.assert_exact()
    assert "state=done" in outputs["final stdout"] and "remaining_matches=0" in outputs["final stdout"]
    assert_absent([CANARY_PASSWORD, database], outputs)
    ledger.report(
        f"SIGKILL of `backfill run`, walk: ctid on a table without a unique key ({parallelism} shard(s))",
        faults_injected=kills, runs=len(points) + 1, ledger=result, parallelism=parallelism,
    )
