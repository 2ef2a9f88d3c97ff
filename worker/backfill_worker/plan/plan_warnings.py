"""What ``backfill plan`` warns about before a run hurts, and the run's estimate (PURE).

Every decision here is made from introspection results (``introspect.ReferencingKey``,
``TableTrigger``, ``VacuumSettings``) and the timed, rolled-back sample batch
(:class:`SampleCost`); the planner gathers those. Each warning has a stable code (its kind's
value, for scripts and ``--strict``), what is wrong, the measurement behind it and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import Enum

from psycopg import sql

from backfill_api.status import format_eta
from backfill_worker.sql.introspect import ReferencingKey, TableTrigger, VacuumSettings


class WarningKind(Enum):
    """The kinds of plan warning; the value is the stable code printed and documented."""

    UNINDEXED_FOREIGN_KEY = "unindexed-foreign-key"
    ROW_TRIGGERS = "row-triggers"
    SPARSE_WHERE = "sparse-where"
    AUTOVACUUM_OFF = "autovacuum-off"
    AUTOVACUUM_BEHIND = "autovacuum-behind"


@dataclass(frozen=True)
class PlanWarning:
    kind: WarningKind
    message: str
    measurement: str
    fix: str

    @property
    def code(self) -> str:
        return self.kind.value


@dataclass(frozen=True)
class SampleCost:
    """The sample batch as measured (rolled back): keys of its range, rows changed, time, WAL."""

    keys: int
    rows: int
    seconds: float
    wal_bytes: int | None
    """WAL the batch wrote before its rollback (``pg_current_wal_insert_lsn`` difference); None on a standby."""

    def per_row_ms(self) -> str:
        return f"{self.seconds * 1000 / self.rows:.2f} ms a row" if self.rows else "no row changed"

    def describe(self) -> str:
        return f"the sample batch (rolled back) changed {self.rows:,} rows of {self.keys:,} keys in {self.seconds * 1000:.1f} ms"


SPARSE_READS_PER_CHANGE = 10.0
"""A ``where`` is sparse when a batch reads at least this many rows of its range per row it changes."""

EVENT_OF_KIND = {"set": "UPDATE", "delete": "DELETE", "copy": "INSERT"}
"""The trigger event a batch fires, by ``Target.kind`` (a ``spec.handler`` batch: unknown)."""

_ACTIONS = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}


def checked_keys(keys: Sequence[ReferencingKey], event: str | None, set_columns: Collection[str]) -> list[ReferencingKey]:
    """The foreign keys a batch makes PostgreSQL check: all of them on a DELETE (cascade, set null,
    or the existence check of no action/restrict), those whose referenced columns it sets on an UPDATE."""
    if event == "DELETE":
        return list(keys)
    if event == "UPDATE":
        return [k for k in keys if set(k.referenced_columns) & set(set_columns)]
    return []


def index_fix(key: ReferencingKey) -> str:
    """The DDL that gives the child an index on the key's columns (rendered without a connection)."""
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in key.columns)
    statement = sql.SQL("CREATE INDEX CONCURRENTLY ON {} ({});").format(sql.Identifier(key.child_schema, key.child_table), columns)
    return statement.as_string(None)


def foreign_key_warnings(
    keys: Sequence[ReferencingKey], event: str | None, set_columns: Collection[str], sample: SampleCost | None
) -> list[PlanWarning]:
    warnings = []
    for key in checked_keys(keys, event, set_columns):
        if key.indexed:
            continue
        action = _ACTIONS.get(key.on_delete if event == "DELETE" else key.on_update, "NO ACTION")
        child = f"{key.child_schema}.{key.child_table}"
        columns = ", ".join(key.columns)
        rows = "never analyzed" if key.child_rows < 0 else f"~{key.child_rows:,} rows"
        warnings.append(PlanWarning(
            WarningKind.UNINDEXED_FOREIGN_KEY,
            f"{child} ({columns}) references the table (foreign key {key.constraint}, ON {event} {action}) and no index of "
            f"{child} leads with ({columns}): every {'deleted' if event == 'DELETE' else 'updated'} row makes PostgreSQL "
            f"scan {child} for its referencing rows",
            f"{child}: {rows}, {key.child_blocks:,} blocks, scanned once per changed row"
            + (f"; {sample.describe()} ({sample.per_row_ms()})" if sample is not None else ""),
            f"before the run: {index_fix(key)}",
        ))
    return warnings


def firing_triggers(triggers: Sequence[TableTrigger], event: str | None, set_columns: Collection[str]) -> list[TableTrigger]:
    """The row-level triggers a batch fires (an ``UPDATE OF`` trigger only for the columns it sets)."""
    if event is None:
        return []
    return [
        t for t in triggers
        if t.per_row and event in t.events and (event != "UPDATE" or not t.columns or set(t.columns) & set(set_columns))
    ]


def trigger_warnings(
    triggers: Sequence[TableTrigger], event: str | None, set_columns: Collection[str], sample: SampleCost | None, table: str
) -> list[PlanWarning]:
    firing = firing_triggers(triggers, event, set_columns)
    if not firing:
        return []
    names = ", ".join(f"{t.name} ({t.timing} {' OR '.join(t.events)} FOR EACH ROW, {t.function})" for t in firing)
    return [PlanWarning(
        WarningKind.ROW_TRIGGERS,
        f"{len(firing)} trigger(s) on {table} fire for every row a batch changes: {names}; a batch's cost grows with "
        "its rows and with whatever they do (writes to other tables, notifications)",
        sample.describe() + f", with the triggers firing ({sample.per_row_ms()})" if sample is not None else "no sample batch",
        "make sure the backfill's rows should fire them; if not, skip them for the backfill's changes (a WHEN condition on "
        "the trigger, or ALTER TABLE ... DISABLE TRIGGER for the run's duration, which the application's writes skip too). "
        "Keep batch.targetDuration as the guard: adaptive sizing shrinks batches that run long",
    )]


def where_warning(where: str | None, sample: SampleCost | None, estimated_keys: int) -> PlanWarning | None:
    """A ``where`` that matches few rows: the key walk reads every row of each range anyway."""
    if where is None or sample is None or sample.keys <= 0:
        return None
    reads = sample.keys / max(sample.rows, 1)
    if reads < SPARSE_READS_PER_CHANGE:
        return None
    matches = round(estimated_keys * sample.rows / sample.keys)
    return PlanWarning(
        WarningKind.SPARSE_WHERE,
        f"where matches few rows: a batch reads every row of its key range (the walk goes through the key index, "
        f"so no index on the where's columns helps it) and reads ~{reads:,.0f} rows per row it changes",
        f"{sample.describe()}: {reads:,.1f} rows read per row changed; the whole run reads ~{estimated_keys:,} rows "
        f"to change ~{matches:,}",
        "raise spec.batch.size and maxSize so that each batch covers more keys (its cost is mostly reading), or, "
        "when the matching rows are few enough for one transaction's locks, change them with a single statement "
        "through an index on the where's columns instead",
    )


# -- WAL, dead tuples and autovacuum --------------------------------------------------------------


@dataclass(frozen=True)
class RunEstimate:
    """The whole run scaled from the sample batch: an estimate, never a promise."""

    seconds: float | None
    rows: int
    """Rows to change, by the sample batch's ratio of changed rows to keys."""
    batches: int
    wal_bytes: int | None
    dead_tuples: int
    """Rows an UPDATE or DELETE leaves dead in the table (a copy inserts elsewhere: 0)."""
    rows_per_second: float | None
    basis: str
    """Where the numbers come from."""

    @property
    def duration(self) -> str:
        return "" if self.seconds is None else (format_eta(self.seconds) or "0s")


def estimate_run(
    estimated_keys: int, sample: SampleCost | None, *, batch_size: int, pause_seconds: float, parallelism: int,
    event: str | None, unit: str = "keys",
) -> RunEstimate | None:
    if sample is None or sample.keys <= 0:
        return None
    batches = math.ceil(estimated_keys / sample.keys)
    rows = round(estimated_keys * sample.rows / sample.keys)
    per_batch = sample.seconds + pause_seconds
    seconds = batches * per_batch / max(1, parallelism)
    rate = sample.rows * max(1, parallelism) / per_batch if per_batch > 0 else None
    wal = round(sample.wal_bytes * rows / sample.rows) if sample.wal_bytes is not None and sample.rows else sample.wal_bytes
    dead = rows if event in ("UPDATE", "DELETE") else 0
    basis = (
        f"one timed sample batch of {sample.keys:,} {unit} ({sample.rows:,} rows, {sample.seconds * 1000:.1f} ms, rolled back) "
        f"scaled to ~{estimated_keys:,} {unit} at batch size {batch_size:,}, pause {pause_seconds:g} s, "
        f"{parallelism} shard(s); before adaptive sizing and throttling"
    )
    return RunEstimate(seconds, rows, batches, wal, dead, rate, basis)


MIN_VACUUM_PASS_SECONDS = 10.0
"""An autovacuum pass shorter than this is never "behind" for long: not warned about."""


def vacuum_pages_per_second(settings: VacuumSettings) -> float:
    """How fast one autovacuum worker can clean pages the backfill dirtied (cost-based delay)."""
    if settings.cost_delay_ms <= 0 or settings.page_cost <= 0:
        return math.inf
    return settings.cost_limit / settings.page_cost / (settings.cost_delay_ms / 1000)


def vacuum_trigger(settings: VacuumSettings) -> int:
    """Dead tuples that start an autovacuum of the table: threshold + scale factor x rows."""
    return round(settings.threshold + settings.scale_factor * settings.table_rows)


def vacuum_warnings(settings: VacuumSettings, estimate: RunEstimate | None, table: str) -> list[PlanWarning]:
    if estimate is None or estimate.dead_tuples <= 0:
        return []
    if not settings.enabled:
        return [PlanWarning(
            WarningKind.AUTOVACUUM_OFF,
            f"autovacuum is off for {table} (autovacuum_enabled = false, or the server's autovacuum/track_counts): the "
            f"run's dead tuples stay until someone runs VACUUM, and the table and its indexes grow by them",
            f"expected dead tuples: ~{estimate.dead_tuples:,} (one per changed row; the sample batch's ratio), on a table of "
            f"~{settings.table_rows:,} rows",
            f"VACUUM (VERBOSE) {table} during or right after the run (e.g. every ~{max(1, estimate.dead_tuples // 10):,} "
            "changed rows), or ALTER TABLE ... RESET (autovacuum_enabled) for the run",
        )]
    pages_per_second = vacuum_pages_per_second(settings)
    rate = estimate.rows_per_second
    if rate is None or math.isinf(pages_per_second) or estimate.seconds is None:
        return []
    pass_seconds = settings.table_blocks / pages_per_second
    trigger = vacuum_trigger(settings)
    produced_per_pass = rate * pass_seconds
    # Behind: while one pass over the table runs, the backfill leaves more dead tuples than the
    # trigger; vacuum then runs back to back and dead tuples peak at trigger + one pass's worth.
    if produced_per_pass <= trigger or estimate.seconds <= pass_seconds or pass_seconds < MIN_VACUUM_PASS_SECONDS:
        return []
    return [PlanWarning(
        WarningKind.AUTOVACUUM_BEHIND,
        f"autovacuum will not keep up with the run on {table}: one pass over the table takes longer than the backfill "
        "needs to leave the next pass's worth of dead tuples, so autovacuum runs back to back and dead tuples pile up",
        f"backfill ~{rate:,.0f} dead tuples/s (the sample batch); one autovacuum pass over {settings.table_blocks:,} blocks "
        f"~{pass_seconds:,.0f} s at {pages_per_second:,.0f} pages/s (cost limit {settings.cost_limit}, delay "
        f"{settings.cost_delay_ms:g} ms, {settings.page_cost} a page); it starts at {trigger:,} dead tuples; "
        f"~{produced_per_pass + trigger:,.0f} dead at the peak",
        f"let autovacuum go faster on this table for the run (ALTER TABLE {table} SET (autovacuum_vacuum_cost_delay = 0) or "
        "a higher autovacuum_vacuum_cost_limit), or slow the backfill (limits.maxRowsPerSecond, a longer batch.pause)",
    )]


def wal_and_vacuum_lines(estimate: RunEstimate, settings: VacuumSettings | None) -> list[str]:
    """The estimate's WAL and dead-tuple lines for ``backfill plan`` (PURE)."""
    wal = "unknown (a standby, or no row changed)" if estimate.wal_bytes is None else f"~{human_bytes(estimate.wal_bytes)}"
    lines = [f"WAL, the whole run: {wal}   dead tuples left in the table: ~{estimate.dead_tuples:,}"]
    if settings is not None and estimate.dead_tuples > 0 and settings.enabled:
        trigger = vacuum_trigger(settings)
        runs = estimate.dead_tuples // trigger if trigger > 0 else 0
        lines.append(
            f"autovacuum starts on this table at {trigger:,} dead tuples "
            f"(threshold {settings.threshold} + scale factor {settings.scale_factor:g} x ~{settings.table_rows:,} rows): "
            + (f"about {runs:,} run(s) during the backfill" if runs else "the run alone will not start one")
        )
    return lines


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{count} B"
