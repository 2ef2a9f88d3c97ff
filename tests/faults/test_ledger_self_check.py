"""The exactness check itself must catch every way a backfill can go wrong (else the fault
tests could not fail)."""

from __future__ import annotations

import psycopg
from support_faults import ledger


def test_ledger_counts_missed_doubled_stray_lost_and_other_changes(database: str) -> None:
    ledger.seed(database, 1_000)
    clean = ledger.check(database)
    assert clean.rows_checked == 1_000
    assert 400 < clean.matching < 600
    assert clean.missed == clean.matching and clean.changed_once == 0

    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("UPDATE items SET counter = counter + 1 WHERE grp < 50")
        assert ledger.check(database).lost_or_doubled == 0
        ledger.check(database).assert_exact()
        doubled = conn.execute("SELECT id FROM items WHERE grp < 50 ORDER BY id LIMIT 1").fetchone()[0]
        stray = conn.execute("SELECT id FROM items WHERE grp >= 50 ORDER BY id LIMIT 1").fetchone()[0]
        conn.execute("UPDATE items SET counter = counter + 1 WHERE id IN (%s, %s)", [doubled, stray])
        conn.execute("DELETE FROM items WHERE id = (SELECT max(id) FROM items)")
        conn.execute("UPDATE items SET payload = 'x' WHERE id = 500")
        conn.execute("UPDATE items SET app_counter = app_counter + 2 WHERE id = 600")

    result = ledger.check(database, app_increments={600: 2})
    assert (result.doubled, result.wrongly_changed, result.lost, result.other_columns_changed) == (1, 1, 1, 1)
    assert result.lost_or_doubled == 4
    # Rows the application deleted (and said so) are not lost; unrecorded app changes are caught.
    assert ledger.check(database, deleted=[1_000], app_increments={600: 2}).lost == 0
    assert ledger.check(database, deleted=[1_000]).other_columns_changed == 2
