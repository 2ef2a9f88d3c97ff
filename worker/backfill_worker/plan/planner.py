"""Dry run: what a backfill would do, without changing anything (``backfill plan``, ``spec.dryRun``).

Resolves the key, estimates the rows to change, renders the exact statements, checks that both
the custom and the generic plan of each batch statement walk the key index, and times one
sample batch inside a transaction that is rolled back. The batch statement is the change's own
(``changes.BatchChange.statement``: update, delete or copy); with ``spec.from`` joins, only the
target's reads must go through its key index (a joined table may be read any way), and the
sample batch's range is checked for target rows the join matches more than once.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from backfill_api.model import Backfill, ChangeKind
from backfill_worker.changes import changes
from backfill_worker.plan import plan_warnings, validation
from backfill_worker.sql import blocks, introspect, sharding, statements
from backfill_worker.sql.connection import connect, database_errors
from backfill_worker.sql.secrets import redact, register_dsn, secrets_of
from backfill_worker.sql.statements import Style
from backfill_worker.throttles import health_probe

INDEX_NODES = ("Index Scan", "Index Only Scan", "Bitmap Index Scan")
BLOCK_RANGE_NODE = "Tid Range Scan"
PREPARED_NAME = "backfill_plan_check"
SMALL_TABLE_BLOCKS = 16
"""A table of at most this many blocks (128 kB at 8 kB) is read whole as cheaply as through an
index, and PostgreSQL rightly plans a sequential scan once it has statistics: the key-index
check is reported but not required."""


@dataclass(frozen=True)
class IndexCheck:
    statement: str
    """``probe`` or ``update``."""
    generic: bool
    """True: the generic plan (what a prepared statement may switch to); False: the custom plan."""
    uses_index: bool
    scans: tuple[str, ...]
    """Scan nodes on the target table, e.g. ``Index Only Scan using customers_pkey``."""
    required: bool = True
    """False when one batch covers the whole table, or the table is tiny (``SMALL_TABLE_BLOCKS``):
    then a sequential scan is the right plan."""

    @property
    def ok(self) -> bool:
        return self.uses_index or not self.required


@dataclass(frozen=True)
class Sample:
    batch_size: int
    keys: int
    rows: int
    seconds: float
    """Probe plus write transaction of one batch (rolled back)."""
    wal_bytes: int | None = None
    """WAL the batch's change wrote before the rollback (None on a standby)."""

    def cost(self) -> plan_warnings.SampleCost:
        return plan_warnings.SampleCost(self.keys, self.rows, self.seconds, self.wal_bytes)


@dataclass(frozen=True)
class Plan:
    identity: str
    table: str
    key: tuple[str, ...]
    key_types: tuple[str, ...]
    key_index: str
    estimated_keys: int
    estimated_rows_to_change: int
    parallelism: int
    statements: dict[str, str]
    index_checks: tuple[IndexCheck, ...]
    sample: Sample | None
    projected_seconds: float | None
    duplicate_matches: int | None = None
    """``spec.from`` only: target rows of the sample batch that the join matches more than once."""
    by_ctid: bool = False
    """``walk: ctid``: keys are blocks, and the check is that every batch is a TID Range Scan."""
    warnings: tuple[plan_warnings.PlanWarning, ...] = ()
    """What may hurt (unindexed foreign keys, row triggers, a sparse where, autovacuum): each with
    its measurement and fix. They do not make the plan fail (``backfill plan --strict`` does)."""
    estimate: plan_warnings.RunEstimate | None = None
    """The whole run scaled from the sample batch (duration, rows, WAL, dead tuples)."""
    vacuum: introspect.VacuumSettings | None = None

    @property
    def index_ok(self) -> bool:
        return all(check.ok for check in self.index_checks)

    @property
    def ok(self) -> bool:
        """Every batch statement uses the key index, and no sampled target row has several join matches."""
        return self.index_ok and not self.duplicate_matches


# -- pure helpers -------------------------------------------------------------------------------


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The plan's nodes, without those of subqueries (``SubPlan``/``InitPlan``): a ``set`` or
    ``where`` subquery reads other rows (often of other tables) and is not the batch's walk."""
    yield plan
    for child in plan.get("Plans", ()):
        if child.get("Parent Relationship") not in ("SubPlan", "InitPlan"):
            yield from _nodes(child)


KeyIndexes = Mapping[str, Collection[str]]
"""Relation name -> the indexes on it that serve the key order (the target, and its partitions
or inheritance children, each with its own index)."""


def table_scans(explain_json: Sequence[dict[str, Any]], relations: str | KeyIndexes) -> list[dict[str, Any]]:
    """Scan nodes of ``EXPLAIN (FORMAT JSON)`` output that read one of ``relations`` (or an index of one)."""
    key_indexes = _as_key_indexes(relations)
    names = set(key_indexes)
    scans = []
    for node in _nodes(explain_json[0]["Plan"]):
        node_type = node.get("Node Type", "")
        if node_type.endswith("Scan") and node_type not in ("Subquery Scan", "Function Scan", "Values Scan", "CTE Scan"):
            if node_type == "Bitmap Index Scan":
                if any(node.get("Index Name") in indexes for indexes in key_indexes.values()) or not _index_elsewhere(node, names):
                    scans.append(node)
            elif node.get("Relation Name") in names or node.get("Relation Name") is None:
                scans.append(node)
    return scans


def _index_elsewhere(node: dict[str, Any], names: set[str]) -> bool:
    # A bitmap index scan names only its index; below a Bitmap Heap Scan of another table it is not ours.
    return bool(node.get("_parent_relation")) and node["_parent_relation"] not in names


def _as_key_indexes(relations: str | KeyIndexes) -> KeyIndexes:
    return {relations: ()} if isinstance(relations, str) else relations


def _mark_bitmap_parents(plan: dict[str, Any], relation: str | None = None) -> None:
    """Record on each Bitmap Index Scan the relation of the Bitmap Heap Scan above it."""
    if plan.get("Node Type") == "Bitmap Heap Scan":
        relation = plan.get("Relation Name")
    elif plan.get("Node Type") == "Bitmap Index Scan" and relation is not None:
        plan["_parent_relation"] = relation
    for child in plan.get("Plans", ()):
        _mark_bitmap_parents(child, relation)


def reads_only_through(explain_json: Sequence[dict[str, Any]], key_indexes: KeyIndexes) -> bool:
    """Every read of the target (and of each partition or child) goes through a key index of that
    relation: no sequential scan, no other index. Subqueries' scans are not the batch's walk."""
    _mark_bitmap_parents(explain_json[0]["Plan"])
    scans = table_scans(explain_json, key_indexes)
    reads = [s for s in scans if s["Node Type"] != "Bitmap Heap Scan"]
    allowed = {index for indexes in key_indexes.values() for index in indexes}
    return bool(reads) and all(s["Node Type"] in INDEX_NODES and s.get("Index Name") in allowed for s in reads)


def uses_key_index(explain_json: Sequence[dict[str, Any]], table: str, index: str) -> bool:
    """Every read of the (unpartitioned) table goes through ``index`` (no sequential scan anywhere)."""
    return reads_only_through(explain_json, {table: (index,)})


def describe_scan(node: dict[str, Any]) -> str:
    index = node.get("Index Name")
    return f"{node['Node Type']} using {index}" if index else f"{node['Node Type']} on {node.get('Relation Name', '?')}"


def projected_seconds(estimated_keys: int, sample: Sample | None, pause_seconds: float, parallelism: int) -> float | None:
    if sample is None or sample.keys <= 0:
        return None
    batches = estimated_keys / sample.keys
    return batches * (sample.seconds + pause_seconds) / max(1, parallelism)


# -- database work ------------------------------------------------------------------------------


def _explain(conn: psycopg.Connection, statement: sql.Composable, params: list[Any]) -> list[dict[str, Any]]:
    row = conn.execute(statements.explain(statement, json=True), params).fetchone()
    assert row is not None
    plan: list[dict[str, Any]] = row[0]
    return plan


def _explain_generic(conn: psycopg.Connection, statement: sql.Composable, params: list[Any]) -> list[dict[str, Any]]:
    """The generic plan (``plan_cache_mode = force_generic_plan``) of a prepared ``statement``.

    ``statement`` uses ``$n`` placeholders and was validated before (one statement only).
    """
    conn.execute(sql.SQL("PREPARE {} AS {}").format(sql.Identifier(PREPARED_NAME), statement))
    try:
        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        arguments = sql.SQL(", ").join(sql.Literal(p) for p in params)
        row = conn.execute(
            sql.SQL("EXPLAIN (FORMAT JSON) EXECUTE {}({})").format(sql.Identifier(PREPARED_NAME), arguments)
        ).fetchone()
        assert row is not None
        plan: list[dict[str, Any]] = row[0]
        return plan
    finally:
        conn.execute(sql.SQL("DEALLOCATE {}").format(sql.Identifier(PREPARED_NAME)))


def check_index_use(
    conn: psycopg.Connection, change: changes.BatchChange, lower: Sequence[str], run_upper: Sequence[str], size: int
) -> list[IndexCheck]:
    """Custom and generic plans of the probe and the change's statement of a real batch after ``lower``."""
    target = change.target
    checks = []
    key_indexes = introspect.hierarchy_key_indexes(conn, target)
    probe_params = [*statements.range_params(lower, run_upper), size - 1]
    row = conn.execute(statements.probe_upper_bound(target, has_lower=True), probe_params).fetchone()
    batch_upper = tuple(row) if row else tuple(run_upper)
    whole_table = row is None
    small_table = introspect.hierarchy_blocks(conn, target) <= SMALL_TABLE_BLOCKS
    def probe(has_lower: bool, style: Style = Style.PSYCOPG) -> sql.Composed:
        return statements.probe_upper_bound(target, has_lower=has_lower, style=style)

    cases = (
        ("probe", probe, probe_params),
        (change.name, change.statement, statements.range_params(lower, batch_upper)),
    )
    with conn.transaction(force_rollback=True):
        for name, build, params in cases:
            for generic in (False, True):
                if generic:
                    plan = _explain_generic(conn, build(has_lower=True, style=Style.DOLLAR), params)
                else:
                    plan = _explain(conn, build(has_lower=True), params)
                scans = table_scans(plan, key_indexes)
                uses = reads_only_through(plan, key_indexes)
                required = not small_table and not (whole_table and name == change.name)
                checks.append(IndexCheck(name, generic, uses, tuple(describe_scan(s) for s in scans), required))
    return checks


def reads_only_block_ranges(explain_json: Sequence[dict[str, Any]], table: str) -> bool:
    """Every read of the table is a TID Range Scan (``walk: ctid``): no sequential scan, no index."""
    reads = table_scans(explain_json, table)
    return bool(reads) and all(s["Node Type"] == BLOCK_RANGE_NODE for s in reads)


def check_block_ranges(conn: psycopg.Connection, change: changes.BatchChange, table_blocks: int, size: int) -> list[IndexCheck]:
    """Custom and generic plans of the second batch's statement (blocks ``size .. 2 size - 1``).

    The batch runs the UPDATE inside a CTE (``update_batch_checked``), which PostgreSQL plans as
    its own subquery (EXPLAIN shows it as an InitPlan): the plain UPDATE's plan is that plan.
    """
    target = change.target
    bounds = statements.range_params((str(min(size, table_blocks)),), (str(min(2 * size, table_blocks)),))
    checks = []
    with conn.transaction(force_rollback=True):
        for generic in (False, True):
            if generic:
                plan = _explain_generic(conn, change.statement(has_lower=True, style=Style.DOLLAR), bounds)
            else:
                plan = _explain(conn, change.statement(has_lower=True), bounds)
            scans = tuple(describe_scan(s) for s in table_scans(plan, target.table))
            uses = reads_only_block_ranges(plan, target.table)
            checks.append(IndexCheck(change.name, generic, uses, scans, required=size < table_blocks))
    return checks


def _plan_blocks(conn: psycopg.Connection, backfill: Backfill, change: changes.BatchChange, rendered: dict[str, str]) -> Plan:
    """``walk: ctid``: estimates in blocks, the TID Range Scan check, and a rolled-back sample of the first blocks."""
    spec = backfill.spec
    target = change.target
    table_blocks = blocks.relation_blocks(conn, target)
    head = (backfill.identity, target.display_table, ("ctid",), ("tid",), "(none: block ranges)", table_blocks)
    if table_blocks == 0:
        return Plan(*head, 0, spec.parallelism, rendered, (), None, 0.0, by_ctid=True)
    checks = check_block_ranges(conn, change, table_blocks, spec.batch.size)
    to_change = _estimated_rows_to_change(conn, change, (str(table_blocks),))
    upper = (str(min(spec.batch.size, table_blocks)),)
    started = time.monotonic()
    with conn.transaction(force_rollback=True):
        _batch_timeouts(conn, backfill)
        wal_before = _wal_position(conn)
        if target.kind == ChangeKind.SET:  # as the batches run it: refused if a changed row still matches where
            row = conn.execute(statements.update_batch_checked(target, has_lower=False), list(upper)).fetchone()
            rows = int(row[0]) if row else 0
        else:
            rows = conn.execute(change.statement(has_lower=False), list(upper)).rowcount
        wal = _wal_since(conn, wal_before)
        sample = Sample(spec.batch.size, int(upper[0]), rows, time.monotonic() - started, wal)
    projected = projected_seconds(table_blocks, sample, spec.batch.pause.total_seconds(), spec.parallelism)
    warnings, estimate, vacuum = _assess(conn, backfill, target, sample, table_blocks)
    return Plan(*head, to_change, spec.parallelism, rendered, tuple(checks), sample, projected, by_ctid=True,
                warnings=warnings, estimate=estimate, vacuum=vacuum)


def _wal_position(conn: psycopg.Connection) -> str | None:
    row = conn.execute("SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_insert_lsn()::text END").fetchone()
    return row[0] if row else None


def _wal_since(conn: psycopg.Connection, before: str | None) -> int | None:
    """WAL bytes inserted since ``before`` (the whole server's: on a busy one, an over-estimate)."""
    if before is None:
        return None
    row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s::pg_lsn)::bigint", [before]).fetchone()
    return max(0, int(row[0])) if row and row[0] is not None else None


def _assess(
    conn: psycopg.Connection, backfill: Backfill, target: statements.Target, sample: Sample | None, estimated_keys: int
) -> tuple[tuple[plan_warnings.PlanWarning, ...], plan_warnings.RunEstimate | None, introspect.VacuumSettings | None]:
    """The plan's warnings and estimate: catalog facts and the sample batch, judged by ``plan_warnings``."""
    spec = backfill.spec
    event = plan_warnings.EVENT_OF_KIND.get(target.kind)
    set_columns = [column for column, _ in target.set]
    cost = sample.cost() if sample is not None else None
    oid = _oid(conn, target.schema, target.table)
    fired_on = (target.copy.schema, target.copy.table) if target.copy is not None else (target.schema, target.table)
    estimate = plan_warnings.estimate_run(
        estimated_keys, cost, batch_size=spec.batch.size, pause_seconds=spec.batch.pause.total_seconds(),
        parallelism=spec.parallelism, event=event, unit="blocks" if target.by_ctid else "keys",
    )
    vacuum = introspect.vacuum_settings(conn, oid)
    warnings = [
        *plan_warnings.foreign_key_warnings(introspect.referencing_keys(conn, oid), event, set_columns, cost),
        *plan_warnings.trigger_warnings(
            introspect.triggers(conn, _oid(conn, *fired_on)), event, set_columns, cost, ".".join(fired_on)
        ),
        *plan_warnings.vacuum_warnings(vacuum, estimate, target.display_table),
    ]
    if not target.by_ctid:  # a ctid sample's "keys" are blocks: no rows-read ratio
        sparse = plan_warnings.where_warning(target.where, cost, estimated_keys)
        warnings.extend([sparse] if sparse is not None else [])
    return tuple(warnings), estimate, vacuum


def _oid(conn: psycopg.Connection, schema: str, table: str) -> int:
    row = conn.execute("SELECT to_regclass(format('%%I.%%I', %s::text, %s::text))::oid", [schema, table]).fetchone()
    assert row is not None and row[0] is not None
    return int(row[0])


def _batch_timeouts(conn: psycopg.Connection, backfill: Backfill) -> None:
    limits = backfill.spec.limits
    conn.execute(
        "SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
        [f"{int(limits.lock_timeout.total_seconds() * 1000)}ms", f"{int(limits.statement_timeout.total_seconds() * 1000)}ms"],
    )


def _estimated_rows_to_change(conn: psycopg.Connection, change: changes.BatchChange, upper: Sequence[str]) -> int:
    plan = _explain(conn, change.statement(has_lower=False), statements.range_params(None, upper))
    top = plan[0]["Plan"]
    child = top["Plans"][0] if top.get("Node Type") in ("ModifyTable", "LockRows") and top.get("Plans") else top
    return int(child.get("Plan Rows", 0))


def _sample_batch(
    conn: psycopg.Connection, change: changes.BatchChange, backfill: Backfill, upper: Sequence[str]
) -> tuple[Sample, int | None]:
    """The first batch, timed and rolled back; and (``spec.from``) its target rows with several join matches."""
    target = change.target
    size = backfill.spec.batch.size
    started = time.monotonic()
    with conn.transaction(force_rollback=True):
        _batch_timeouts(conn, backfill)
        row = conn.execute(statements.probe_upper_bound(target, has_lower=False), [*upper, size - 1]).fetchone()
        batch_upper = tuple(row) if row else tuple(upper)
        if row is None:
            counted = conn.execute(statements.count_keys(target, has_lower=False), list(batch_upper)).fetchone()
            keys = int(counted[0]) if counted else 0
        else:
            keys = size
        duplicates = None
        if target.joins:  # before the change: afterwards `where` may no longer match
            counted = conn.execute(statements.count_duplicate_matches(target, has_lower=False), list(batch_upper)).fetchone()
            duplicates = int(counted[0]) if counted else 0
            started = time.monotonic()  # the check is not part of a batch's time
        # A handler's sample locks and reads the batch's rows (rows()); the handler itself is not called.
        wal_before = _wal_position(conn)
        rows = conn.execute(change.statement(has_lower=False), list(batch_upper)).rowcount
        wal = _wal_since(conn, wal_before)
        seconds = time.monotonic() - started
    return Sample(size, keys, rows, seconds, wal), duplicates


def plan_backfill(backfill: Backfill, dsn: str) -> Plan:
    """Validate and plan without changing any row (the sample batch is rolled back)."""
    register_dsn(dsn)
    with connect(dsn, f"backfill {backfill.identity} plan") as conn, database_errors(dsn):
        target = validation.resolve_target(conn, backfill.spec)
        validation.check_permissions(conn, target)
        validation.check_fragments(conn, target, secrets_of(dsn))
        health_probe.validate(conn, backfill.spec.limits, lambda text: redact(text, secrets_of(dsn)))
        change = changes.for_spec(backfill.spec, target)
        if target.by_ctid:
            shown = (
                statements.update_batch_checked(target, has_lower=True, style=Style.DOLLAR)
                if target.kind == ChangeKind.SET else change.statement(has_lower=True, style=Style.DOLLAR)
            )
            return _plan_blocks(conn, backfill, change, {change.name: shown.as_string(conn)})
        rendered = {
            "probe": statements.probe_upper_bound(target, has_lower=True, style=Style.DOLLAR).as_string(conn),
            change.name: change.statement(has_lower=True, style=Style.DOLLAR).as_string(conn),
        }
        low = sharding.edge(conn, target, last=False)
        high = sharding.edge(conn, target, last=True)
        if low is None or high is None:
            return Plan(
                backfill.identity, target.display_table, target.key, target.key_types, target.key_index, 0, 0,
                backfill.spec.parallelism, rendered, (), None, 0.0,
            )
        estimated_keys = sharding.estimate_keys(conn, target)
        checks = check_index_use(conn, change, low, high, backfill.spec.batch.size)
        unfiltered = target.where is None and not target.joins and target.copy is None
        to_change = estimated_keys if unfiltered else _estimated_rows_to_change(conn, change, high)
        sample, duplicates = _sample_batch(conn, change, backfill, high)
        projected = projected_seconds(
            estimated_keys, sample, backfill.spec.batch.pause.total_seconds(), backfill.spec.parallelism
        )
        warnings, estimate, vacuum = _assess(conn, backfill, target, sample, estimated_keys)
        return Plan(
            backfill.identity, target.display_table, target.key, target.key_types, target.key_index,
            estimated_keys, to_change, backfill.spec.parallelism, rendered, tuple(checks), sample, projected, duplicates,
            warnings=warnings, estimate=estimate, vacuum=vacuum,
        )
