"""The plan warnings' decisions, from introspection results alone (PURE; no database)."""

from __future__ import annotations

import math

from backfill_worker.plan.plan_warnings import (
    SampleCost,
    WarningKind,
    checked_keys,
    estimate_run,
    firing_triggers,
    foreign_key_warnings,
    human_bytes,
    index_fix,
    vacuum_pages_per_second,
    vacuum_trigger,
    vacuum_warnings,
    where_warning,
)
from backfill_worker.sql.introspect import ReferencingKey, TableTrigger, VacuumSettings

SAMPLE = SampleCost(keys=1000, rows=1000, seconds=0.5, wal_bytes=100_000)


def key(columns: tuple[str, ...] = ("customer_id",), refs: tuple[str, ...] = ("id",), *, indexed: bool = False,
        on_delete: str = "c") -> ReferencingKey:
    return ReferencingKey("orders_fk", "app", 'Order "Lines"', columns, refs, on_delete, "a", indexed, 5000, 40)


def test_which_foreign_keys_a_batch_makes_postgresql_check() -> None:
    keys = [key(refs=("id",)), key(refs=("code",))]
    assert checked_keys(keys, "DELETE", ()) == keys
    assert checked_keys(keys, "UPDATE", ("code", "n")) == [keys[1]]
    assert checked_keys(keys, "UPDATE", ("n",)) == []
    assert checked_keys(keys, "INSERT", ("id",)) == [] and checked_keys(keys, None, ("id",)) == []


def test_the_fix_quotes_identifiers_and_only_unindexed_keys_warn() -> None:
    assert index_fix(key(("a", "B c"))) == 'CREATE INDEX CONCURRENTLY ON "app"."Order ""Lines""" ("a", "B c");'
    assert foreign_key_warnings([key(indexed=True)], "DELETE", (), SAMPLE) == []
    [warning] = foreign_key_warnings([key(on_delete="n")], "DELETE", (), SAMPLE)
    assert warning.code == "unindexed-foreign-key" and "ON DELETE SET NULL" in warning.message
    assert "~5,000 rows, 40 blocks" in warning.measurement and "0.50 ms a row" in warning.measurement


def test_only_row_triggers_of_the_changes_event_and_columns_fire() -> None:
    row_update = TableTrigger("a", "AFTER", ("UPDATE",), True, (), "f")
    of_code = TableTrigger("b", "BEFORE", ("UPDATE",), True, ("code",), "f")
    statement = TableTrigger("c", "AFTER", ("UPDATE", "DELETE"), False, (), "f")
    on_delete = TableTrigger("d", "BEFORE", ("INSERT", "DELETE"), True, (), "f")
    triggers = [row_update, of_code, statement, on_delete]
    assert firing_triggers(triggers, "UPDATE", ("n",)) == [row_update]
    assert firing_triggers(triggers, "UPDATE", ("code",)) == [row_update, of_code]
    assert firing_triggers(triggers, "DELETE", ()) == [on_delete]
    assert firing_triggers(triggers, None, ("n",)) == []


def test_a_where_is_sparse_from_ten_rows_read_per_row_changed() -> None:
    assert where_warning(None, SampleCost(1000, 1, 0.1, None), 10_000) is None
    assert where_warning("x", SampleCost(1000, 101, 0.1, None), 10_000) is None  # 9.9 reads per change
    warning = where_warning("x", SampleCost(1000, 100, 0.1, None), 10_000)
    assert warning is not None and warning.kind is WarningKind.SPARSE_WHERE and "~1,000" in warning.measurement
    nothing = where_warning("x", SampleCost(500, 0, 0.1, None), 10_000)  # no match at all in the sample
    assert nothing is not None and "500.0 rows read per row changed" in nothing.measurement


def test_the_estimate_scales_the_sample() -> None:
    estimate = estimate_run(100_000, SampleCost(1000, 250, 0.2, 40_000), batch_size=1000, pause_seconds=0.05,
                            parallelism=2, event="UPDATE")
    assert estimate is not None
    assert estimate.batches == 100 and estimate.rows == 25_000 and estimate.dead_tuples == 25_000
    assert math.isclose(estimate.seconds or 0, 100 * 0.25 / 2) and estimate.duration == "12s"
    assert estimate.wal_bytes == 40_000 * 100 and math.isclose(estimate.rows_per_second or 0, 2000)
    copy = estimate_run(100_000, SampleCost(1000, 250, 0.2, 40_000), batch_size=1000, pause_seconds=0, parallelism=1,
                        event="INSERT")
    assert copy is not None and copy.dead_tuples == 0
    assert estimate_run(100, SampleCost(0, 0, 0.0, None), batch_size=1, pause_seconds=0, parallelism=1, event=None) is None


def vacuum(**changes: object) -> VacuumSettings:
    base = dict(enabled=True, threshold=50, scale_factor=0.2, cost_delay_ms=2.0, cost_limit=200, page_cost=22,
                table_rows=1_000_000, table_blocks=1_000_000)
    return VacuumSettings(**{**base, **changes})  # type: ignore[arg-type]


def test_autovacuum_speed_and_trigger() -> None:
    assert math.isclose(vacuum_pages_per_second(vacuum()), 200 / 22 / 0.002)
    assert math.isinf(vacuum_pages_per_second(vacuum(cost_delay_ms=0)))
    assert vacuum_trigger(vacuum()) == 200_050


def test_autovacuum_off_and_behind_and_keeping_up() -> None:
    estimate = estimate_run(1_000_000, SampleCost(1000, 1000, 0.1, 1), batch_size=1000, pause_seconds=0,
                            parallelism=1, event="UPDATE")  # 10,000 dead tuples/s for 100 s
    assert [w.kind for w in vacuum_warnings(vacuum(enabled=False), estimate, "t")] == [WarningKind.AUTOVACUUM_OFF]
    # A pass over 1M blocks at ~4,545 pages/s: ~220 s, longer than the run: not behind during it.
    assert vacuum_warnings(vacuum(), estimate, "t") == []
    # 100k blocks: ~22 s a pass; 220k dead tuples meanwhile > the 200k trigger: behind.
    behind = vacuum_warnings(vacuum(table_blocks=100_000), estimate, "t")
    assert [w.kind for w in behind] == [WarningKind.AUTOVACUUM_BEHIND] and "~22 s" in behind[0].measurement
    assert vacuum_warnings(vacuum(table_blocks=100_000, cost_delay_ms=0), estimate, "t") == []  # unthrottled
    assert vacuum_warnings(vacuum(table_blocks=10_000), estimate, "t") == []  # a 2 s pass
    inserts = estimate_run(1000, SampleCost(10, 10, 0.1, 1), batch_size=10, pause_seconds=0, parallelism=1, event="INSERT")
    assert vacuum_warnings(vacuum(enabled=False), inserts, "t") == []  # no dead tuples


def test_bytes_read_as_a_person_would() -> None:
    assert [human_bytes(n) for n in (512, 2048, 5 * 1024**3)] == ["512 B", "2.0 kB", "5.0 GB"]
