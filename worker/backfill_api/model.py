"""The ``Backfill`` API (group ``backfill.dev``, version ``v1alpha1``): the single source of truth.

The same model validates a local manifest for the CLI, the object the in-cluster worker reads,
and generates the CRD's ``openAPIV3Schema`` (``backfill crd``). Field names (camelCase in YAML)
are the public contract.

Trusted input: the values of ``spec.set``, ``spec.where``, ``spec.from[].condition`` and
``spec.copy.columns`` are SQL fragments written by the manifest's author and run with the
database role's privileges. They are never concatenated with
identifiers; identifiers (table, key and column names) are always quoted by
``psycopg.sql.Identifier``.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import time, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from .durations import DURATION_PATTERN, format_duration, parse_duration
from .identifiers import QualifiedName, parse_qualified_name
from .timezones import CLOCK_PATTERN, WEEKDAYS, Weekday, load_zone, parse_clock

API_GROUP = "backfill.dev"
API_VERSION = "v1alpha1"
KIND = "Backfill"
PLURAL = "backfills"
SINGULAR = "backfill"
SHORT_NAMES = ["bf"]

Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN}),
]


class _Model(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields rejected with their path."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )


class SecretKeyRef(_Model):
    """A key of a Secret in the Backfill's own namespace."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the Secret (same namespace as the Backfill)."""
    key: str = Field(default="dsn", min_length=1, max_length=253)
    """Key in the Secret whose value is a libpq connection string or URI."""


class DatabaseSpec(_Model):
    """Where the target PostgreSQL is. Locally the CLI takes ``--dsn`` or ``BACKFILL_DSN`` instead."""

    dsn_secret_ref: SecretKeyRef | None = None
    """Secret holding the connection string; injected into the worker as an env var, never copied."""


class BatchSpec(_Model):
    """How many rows each committed transaction covers, and the pace between batches."""

    size: int = Field(default=1000, ge=1, le=1_000_000)
    """Starting number of keys per batch."""
    target_duration: Duration = Field(default=timedelta(milliseconds=200))
    """Adapt the batch size so one batch takes about this long; 0 keeps the size fixed."""
    min_size: int = Field(default=100, ge=1, le=1_000_000)
    """Lower bound for the adaptive batch size."""
    max_size: int = Field(default=50_000, ge=1, le=1_000_000)
    """Upper bound for the adaptive batch size."""
    pause: Duration = Field(default=timedelta(0))
    """Sleep after each committed batch, leaving room for the application."""

    @model_validator(mode="after")
    def _bounds_are_ordered(self) -> BatchSpec:
        if self.min_size > self.max_size:
            raise ValueError(f"minSize ({self.min_size}) must not exceed maxSize ({self.max_size})")
        if not self.min_size <= self.size <= self.max_size:
            raise ValueError(
                f"size ({self.size}) must lie between minSize ({self.min_size}) and maxSize ({self.max_size})"
            )
        return self


class Walk(StrEnum):
    """``spec.walk``: how batches cover the table."""

    KEY = "key"
    CTID = "ctid"


class ImpactMode(StrEnum):
    """``spec.limits.applicationImpact.mode``."""

    PROTECT = "protect"
    FAST = "fast"


class ApplicationImpactSpec(_Model):
    """How much the backfill may slow the other sessions of the database (the application).

    ``protect`` measures the application before the run and while it runs (its transaction
    rate, active sessions, sessions waiting for the backfill's row locks, ``pg_stat_statements``
    latency where installed) and adapts the pause and the batch duration to stay within this
    budget; with nobody else on the database it runs at full speed. ``fast`` ignores the
    application (batch and limits only): for maintenance windows."""

    mode: ImpactMode = ImpactMode.PROTECT
    """``protect`` (default) or ``fast``."""
    min_throughput_ratio: float = Field(default=0.75, ge=0.01, le=0.99)
    """Keep the other sessions' transaction rate at least this fraction of what it was without
    the backfill."""
    max_latency_ratio: float = Field(default=1.5, ge=1.01, le=100)
    """Keep their mean statement latency (``pg_stat_statements``) and their number of active
    sessions within this multiple of what it was without the backfill."""
    max_lock_hold: Duration = Field(default=timedelta(milliseconds=20))
    """While an application is present, batch transactions last about this long at most: the
    longest an application transaction should wait for a row the backfill holds (halved at
    each observed lock wait)."""

    @field_validator("max_lock_hold")
    @classmethod
    def _lock_hold_positive(cls, value: timedelta) -> timedelta:
        if value.total_seconds() <= 0:
            raise ValueError("maxLockHold must be positive, e.g. 20ms (use mode: fast to switch the throttle off)")
        return value


MAX_FRAGMENT_CHARS = 65536
"""Upper bound on one ``set`` expression or the ``where`` predicate (checked before any SQL runs)."""


class HealthQuerySpec(_Model):
    """A health signal of your own: SQL run between batches, on a separate session.

    The query is trusted input (run with the database role's privileges) and must return one
    row whose first column is a boolean (pause while true) or a number (pause while it exceeds
    ``maxValue``). It is run once before the first write: an error, no row, NULL or another type
    fails validation."""

    query: str = Field(min_length=1, max_length=MAX_FRAGMENT_CHARS)
    """SQL returning one row; e.g. ``SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'IO'``."""
    max_value: float | None = None
    """For a numeric result: pause while the value is greater than this. Omit for a boolean result."""
    timeout: Duration = Field(default=timedelta(seconds=1))
    """``statement_timeout`` of the health query (at most 1m); a slow answer counts as unhealthy."""
    interval: Duration = Field(default=timedelta(seconds=1))
    """Run the query at most this often while healthy, and re-check this often while paused (at most 1m)."""

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query is blank: give an SQL query returning one boolean or number")
        return value

    @field_validator("timeout", "interval")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        # At most a minute: a waiting worker reports after every check, and the operator points
        # out a worker silent for 5 minutes.
        if not 0 < value.total_seconds() <= 60:
            raise ValueError("must be positive and at most 1m, e.g. 1s")
        return value


class LimitsSpec(_Model):
    """Safety limits that keep the live application's latency intact."""

    max_rows_per_second: int = Field(default=0, ge=0)
    """Upper bound on updated rows per second; 0 means unlimited."""
    lock_timeout: Duration = Field(default=timedelta(seconds=1))
    """``lock_timeout`` of each batch transaction: the longest the backfill waits for a row lock."""
    statement_timeout: Duration = Field(default=timedelta(seconds=30))
    """``statement_timeout`` of each batch statement."""
    max_replication_lag: Duration = Field(default=timedelta(seconds=10))
    """Wait while any replica lags more than this (read from pg_stat_replication); 0 disables."""
    max_retries: int = Field(default=10, ge=0, le=1000)
    """Consecutive failed attempts of one batch before the run gives up."""
    restart_wait: Duration = Field(default=timedelta(seconds=60))
    """How long a starting run waits for a shard's lock while a session of this same backfill
    holds it (a killed run's backend still finishing its batch; identified by the
    ``application_name`` the engine sets), printing what it waits for; then it is refused as
    already running. A lock held by any other session is refused at once. 0 never waits; at most 5m."""
    application_impact: ApplicationImpactSpec = Field(default_factory=ApplicationImpactSpec)
    """The application-aware throttle (on by default: ``mode: protect``)."""
    health: HealthQuerySpec | None = None
    """Pause while a query of your own says the database is unhealthy (see ``docs/throttle.md``)."""
    @field_validator("restart_wait")
    @classmethod
    def _bounded_wait(cls, value: timedelta) -> timedelta:
        # A waiting worker has not reported yet; the operator points out a worker silent for 5 minutes.
        if not 0 <= value.total_seconds() <= 300:
            raise ValueError("must be between 0 and 5m, e.g. 60s")
        return value

    max_wal_bytes_per_second: int = Field(default=0, ge=0)
    """Keep the server's WAL rate (all sessions, from ``pg_current_wal_lsn()``) under this many
    bytes per second, pausing between batches; 0 disables. Needs a primary."""
    max_active_backends: int = Field(default=0, ge=0)
    """Pause while more than this many other client sessions are not idle (running a statement or
    inside a transaction); 0 disables."""
    max_lock_waits: int = Field(default=0, ge=0)
    """Pause while more than this many other sessions wait for a lock; 0 disables."""


class WindowSpec(_Model):
    """One run window: on these days (of its start), from ``start`` to ``end`` local time.

    An ``end`` at or before ``start`` crosses midnight (``22:00``-``06:00`` runs into the next
    day); ``00:00``-``00:00`` is the whole day."""

    days: list[Weekday] = Field(default_factory=lambda: list(WEEKDAYS), min_length=1, max_length=7)
    """Days the window opens on: ``mon`` .. ``sun`` (default every day)."""
    start: str = Field(pattern=CLOCK_PATTERN)
    """Opening time, ``HH:MM`` (24 h; ``HH:MM:SS`` allowed) in ``spec.schedule.timeZone``."""
    end: str = Field(pattern=CLOCK_PATTERN)
    """Closing time, ``HH:MM``; at or before ``start``: the next day."""

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        parse_clock(value)
        return value

    @field_validator("days")
    @classmethod
    def _distinct_days(cls, value: list[Weekday]) -> list[Weekday]:
        if len(set(value)) != len(value):
            raise ValueError("days must be distinct")
        return value

    @property
    def start_time(self) -> time:
        return parse_clock(self.start)

    @property
    def end_time(self) -> time:
        return parse_clock(self.end)


class ScheduleSpec(_Model):
    """When the backfill may run. Outside every window it waits at a batch boundary (phase stays
    ``Running``, ``throttleReason: window``, ``nextWindowStart`` in the status)."""

    time_zone: str = Field(default="UTC", min_length=1, max_length=100)
    """IANA time zone of the windows, e.g. ``Europe/Berlin`` (daylight saving time applies)."""
    windows: list[WindowSpec] = Field(min_length=1, max_length=50)
    """The run windows; the backfill runs while any of them is open."""

    @field_validator("time_zone")
    @classmethod
    def _zone_exists(cls, value: str) -> str:
        load_zone(value)
        return value


class CheckpointMode(StrEnum):
    TRANSACTIONAL = "transactional"
    AT_LEAST_ONCE = "atLeastOnce"


class CheckpointSpec(_Model):
    """Where progress is remembered."""

    schema_name: str = Field(default="backfill", alias="schema", min_length=1, max_length=63)
    """Schema of the checkpoint table, created on first use."""
    mode: CheckpointMode = CheckpointMode.TRANSACTIONAL
    """``transactional``: checkpoint committed with each batch (exactly-once). ``atLeastOnce``: for
    roles that may not create the checkpoint table; progress is kept outside the database, so a
    crash can apply the last batch twice (only safe for idempotent ``set`` expressions)."""


class Toleration(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    key: str | None = None
    operator: str | None = None
    value: str | None = None
    effect: str | None = None
    toleration_seconds: int | None = Field(default=None, alias="tolerationSeconds")


QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
"""A non-negative Kubernetes resource quantity (``256Mi``, ``1Gi``, ``500m``, ``2``)."""
RESOURCE_SECTIONS = ("requests", "limits")


def _quantity(value: str) -> str:
    if not re.fullmatch(QUANTITY_PATTERN, value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity: write it like 256Mi, 1Gi or 500m")
    return value


Quantity = Annotated[str, AfterValidator(_quantity), Field(max_length=64, json_schema_extra={"pattern": QUANTITY_PATTERN})]


class WorkerSpec(_Model):
    """Pod settings of the worker Job the operator launches. Ignored by the local CLI."""

    image: str | None = None
    """Worker image; default: the operator's configured worker image."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    service_account_name: str | None = None
    """ServiceAccount of the worker pod; it needs get/watch on its Backfill and patch on its status."""
    resources: dict[str, dict[str, Quantity]] | None = None
    """Container resources (``requests``/``limits``, e.g. ``limits: {memory: 512Mi}``): too small a
    memory limit gets the worker OOMKilled (status reason ``OOMKilled``)."""
    node_selector: dict[str, str] | None = None
    tolerations: list[Toleration] | None = None
    security_context: dict[str, Any] | None = None
    """Container securityContext; default: non-root, read-only root filesystem, no privileges."""
    pod_security_context: dict[str, Any] | None = None
    backoff_limit: int = Field(default=6, ge=0, le=100)
    """Pod restarts before the Job, and so the Backfill, is Failed."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)

    @field_validator("resources")
    @classmethod
    def _resource_sections(cls, value: dict[str, dict[str, str]] | None) -> dict[str, dict[str, str]] | None:
        # Kubernetes would drop an unknown section (e.g. "limit") silently: no limit at all.
        unknown = sorted(set(value or {}) - set(RESOURCE_SECTIONS))
        if unknown:
            raise ValueError(f"unknown section {unknown[0]!r}: use requests or limits")
        return value


CALLABLE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
"""``package.module:function`` (or ``module:Class.method``): what ``spec.handler.callable`` names."""


class DjangoHandlerSpec(_Model):
    """Run the handler on Django's own database connection and hand it a QuerySet of the batch."""

    settings_module: str | None = Field(default=None, min_length=1, max_length=300, pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$")
    """Django settings module, e.g. ``shop.settings``; default: ``$DJANGO_SETTINGS_MODULE``."""
    model: str = Field(min_length=3, max_length=300, pattern=r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")
    """The model of ``spec.table``, as ``app_label.ModelName`` (e.g. ``customers.Customer``)."""
    database: str = Field(default="default", min_length=1, max_length=100)
    """Alias in ``DATABASES`` whose connection runs the batches."""


class HandlerSpec(_Model):
    """A Python callable that changes each batch's rows, inside the batch's transaction (docs/handlers.md).

    Trusted input like ``set``: the worker imports and runs this code with the database role's
    privileges. The callable takes one argument, the batch (``backfill_worker.changes.handlers.Batch``),
    and returns the number of rows it changed (or None: the rows ``batch.rows()`` yielded)."""

    callable: str = Field(min_length=3, max_length=300, pattern=CALLABLE_PATTERN)
    """``module:function`` imported by the worker, e.g. ``shop.backfills:deactivate``."""
    django: DjangoHandlerSpec | None = None
    """Run on Django's connection and pass a ``DjangoBatch`` (with ``queryset``); needs the ``[django]`` extra."""


def _parses_as_table(value: str) -> str:
    parse_qualified_name(value)
    return value


OtherTable = Annotated[str, Field(min_length=1, max_length=300), AfterValidator(_parses_as_table)]
"""The name of a table other than ``spec.table``: ``schema.table`` or ``table``."""


class DeleteSpec(_Model):
    """``spec.delete``: delete the rows of each batch's key range that match ``where``."""

    all_rows: bool = False
    """Delete every row of the table: required (``true``) when ``where`` is omitted, so that a
    missing ``where`` never empties a table by accident."""


class ConflictPolicy(StrEnum):
    """``spec.copy.onConflict``: what a row whose conflict key is already in the target does."""

    DO_NOTHING = "doNothing"
    UPDATE = "update"


class CopySpec(_Model):
    """``spec.copy``: ``INSERT INTO copy.table (...) SELECT ... FROM spec.table`` per key range."""

    table: OtherTable
    """Target table, ``schema.table`` or ``table`` (may be partitioned; not the source itself)."""
    columns: dict[str, Annotated[str, Field(min_length=1, max_length=MAX_FRAGMENT_CHARS)]] | None = None
    """Target column -> SQL expression over the source row (trusted input); default: every
    target column that has a same-named column in the source."""
    on_conflict: ConflictPolicy
    """Required, no default: ``doNothing`` keeps a row already in the target, ``update`` overwrites
    its copied columns (``ON CONFLICT ... DO UPDATE``)."""
    conflict_key: list[str] | None = Field(default=None, min_length=1)
    """Target columns of the unique index the conflict policy applies to; default: the target's
    primary key. Also what the verification matches source rows with."""

    @property
    def qualified_table(self) -> QualifiedName:
        return parse_qualified_name(self.table)


class FromTable(_Model):
    """One table joined into an update (``UPDATE t SET ... FROM table AS alias WHERE ... AND (condition)``)."""

    table: OtherTable
    """``schema.table`` or ``table``."""
    alias: str | None = Field(default=None, min_length=1, max_length=63)
    """Name the ``set``, ``condition`` and ``where`` fragments use for it; default: the table's name."""
    condition: str = Field(min_length=1, max_length=MAX_FRAGMENT_CHARS)
    """Join condition (trusted SQL), e.g. ``a.id = orders.account_id``; the target is named by its
    table name. (Not ``on``: YAML 1.1 reads a bare ``on`` key as the boolean true.)"""

    @property
    def qualified_table(self) -> QualifiedName:
        return parse_qualified_name(self.table)


class ChangeKind(StrEnum):
    """What a backfill does: which one of ``spec.set``, ``spec.delete``, ``spec.copy``, ``spec.handler``
    is given (exactly one)."""

    SET = "set"
    DELETE = "delete"
    COPY = "copy"
    HANDLER = "handler"

    @property
    def attribute(self) -> str:
        """The :class:`BackfillSpec` attribute of the field (``copy_``: ``BaseModel.copy`` is taken)."""
        return "copy_" if self is ChangeKind.COPY else self.value


KIND_FIELDS = tuple(kind.value for kind in ChangeKind)
"""The kinds' field names, as plain strings (for the CRD's schema)."""


class BackfillSpec(_Model):
    """What to change, where, and how gently."""

    database: DatabaseSpec = Field(default_factory=DatabaseSpec)
    table: str = Field(min_length=1, max_length=300)
    """Target table, ``schema.table`` or ``table``; double-quote parts containing dots or quotes."""
    key: list[str] | None = None
    """Keyset columns; default: the table's primary key. Must be covered by a unique index."""
    set: dict[str, Annotated[str, Field(max_length=MAX_FRAGMENT_CHARS)]] | None = Field(default=None, min_length=1)
    """Update: column -> SQL expression (trusted input, may reference the row's columns and the
    ``from`` tables). Exactly one of ``set``, ``delete``, ``copy``, ``handler``."""
    delete: DeleteSpec | None = None
    """Batched DELETE of the rows matching ``where`` (``delete: {}``; ``{allRows: true}`` without ``where``)."""
    copy_: CopySpec | None = Field(default=None, alias="copy")
    """Copy the rows matching ``where`` into another table, with an explicit conflict policy."""
    from_: list[FromTable] | None = Field(default=None, alias="from", min_length=1, max_length=8)
    """Tables joined into a ``set`` update (``UPDATE ... FROM``), each with its join ``condition``.
    A target row must match at most one row of the join (``backfill plan`` checks a sample batch)."""
    handler: HandlerSpec | None = None
    """A Python callable run per batch instead of ``set`` (docs/handlers.md)."""
    where: str | None = Field(default=None, max_length=MAX_FRAGMENT_CHARS)
    """SQL predicate selecting the rows that still need the change (trusted input)."""
    walk: Walk = Walk.KEY
    """``key`` (default): batches are ranges of the unique key. ``ctid``: batches are ranges of
    physical blocks (TID Range Scan, PostgreSQL >= 14), for tables without a usable unique key;
    needs a ``where`` that the change makes false, and ``batch`` sizes count blocks (give them: the
    key defaults are refused) (docs/ctid.md)."""
    batch: BatchSpec = Field(default_factory=BatchSpec)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    schedule: ScheduleSpec | None = None
    """Run windows (e.g. nights only); absent: any time. Pacing only: may change mid-run."""
    parallelism: int = Field(default=1, ge=1, le=64)
    """Number of key-range shards processed concurrently."""
    suspend: bool = False
    """Pause the run at the next batch boundary; set back to false to resume from the checkpoint."""
    dry_run: bool = False
    """Validate and plan only; write nothing."""
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    worker: WorkerSpec = Field(default_factory=WorkerSpec)

    @model_validator(mode="after")
    def _one_kind(self) -> BackfillSpec:
        given = [kind.value for kind in ChangeKind if getattr(self, kind.attribute) is not None]
        choices = ", ".join(f"spec.{name}" for name in KIND_FIELDS)
        if not given:
            raise ValueError(
                f"nothing to change: give exactly one of {choices} (what the backfill does; spec.set: column -> SQL expression)"
            )
        if len(given) > 1:
            both = " and ".join(f"spec.{name}" for name in given)
            raise ValueError(f"{both} are both given: give exactly one of {choices} (what the backfill does)")
        if self.delete is not None and self.where is None and not self.delete.all_rows:
            raise ValueError(
                "spec.where is required with delete (the rows to delete); to delete every row of the table, "
                "say so explicitly with delete: {allRows: true}"
            )
        if self.delete is not None and self.where is not None and self.delete.all_rows:
            raise ValueError("delete.allRows: true deletes every row, but spec.where is given: drop one of them")
        if self.from_ is not None and self.set is None:
            raise ValueError("spec.from joins tables into an update: it needs spec.set")
        return self

    @field_validator("key", mode="before")
    @classmethod
    def _key_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("key")
    @classmethod
    def _key_columns_valid(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("key must name at least one column, or be omitted to use the primary key")
        if any(not column for column in value):
            raise ValueError("key column names must not be empty")
        if len(set(value)) != len(value):
            raise ValueError("key columns must be distinct")
        return value

    @field_validator("table")
    @classmethod
    def _table_parses(cls, value: str) -> str:
        parse_qualified_name(value)
        return value

    @field_validator("set")
    @classmethod
    def _set_entries_valid(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for column, expression in (value or {}).items():
            if not column:
                raise ValueError("column names in set must not be empty")
            if not expression.strip():
                raise ValueError(f"expression for column {column!r} is empty: give an SQL expression, e.g. \"'inactive'\"")
        return value

    @field_validator("where")
    @classmethod
    def _where_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("where is blank: omit it to touch every row, or give an SQL predicate")
        return value

    @model_validator(mode="after")
    def _ctid_walk_is_complete(self) -> BackfillSpec:
        if self.walk is Walk.CTID and self.handler is not None:
            raise ValueError(
                "walk: ctid is not available with spec.handler: a handler's batch is a key range (batch.lower/upper, "
                "rows() in key order); use walk: key with a unique key"
            )
        if self.walk is Walk.CTID:
            if self.key is not None:
                raise ValueError(
                    "walk: ctid batches by physical block ranges and takes no key: remove spec.key "
                    "(or use walk: key to batch by that key)"
                )
            if self.where is None:
                raise ValueError(
                    "walk: ctid needs spec.where, a predicate the change makes false: an updated row may move to "
                    "another block (behind the walk, or past the last block fixed at the start), and only a where "
                    "that no longer matches it keeps it from being missed or changed twice"
                )
            sizes, defaults = self.batch, BatchSpec()
            if (sizes.size, sizes.min_size, sizes.max_size) == (defaults.size, defaults.min_size, defaults.max_size):
                raise ValueError(
                    "walk: ctid counts batch sizes in blocks (8 kB pages, often ~50-200 rows each), and the defaults "
                    f"(size {defaults.size}, minSize {defaults.min_size}, maxSize {defaults.max_size}) are meant as keys: "
                    "as blocks, one batch would lock ~100,000 rows. Set spec.batch.size, minSize and maxSize in blocks, "
                    "e.g. size: 10, minSize: 1, maxSize: 1000"
                )
        return self

    @property
    def qualified_table(self) -> QualifiedName:
        return parse_qualified_name(self.table)

    @property
    def kind(self) -> ChangeKind:
        """Which kind of change this spec gives (validated: exactly one)."""
        return next(kind for kind in ChangeKind if getattr(self, kind.attribute) is not None)

    def fingerprint(self) -> str:
        """Hash of what defines the change; a checkpoint of another fingerprint is not resumed."""
        essence: dict[str, Any] = {
            "table": self.table,
            "key": self.key,
            "set": self.set,
            "where": self.where,
            "parallelism": self.parallelism,
        }
        # Only when given, so checkpoints of updates written before these fields existed still match.
        for name, value in (("delete", self.delete), ("copy", self.copy_), ("from", self.from_), ("handler", self.handler)):
            if value is not None:
                essence[name] = _dump(value)
        if self.walk is not Walk.KEY:  # absent for key walks: their fingerprints stay as they were
            essence["walk"] = self.walk.value
        return hashlib.sha256(json.dumps(essence, sort_keys=True).encode()).hexdigest()[:16]


# Fields that define *which* rows change and *how*: changing them mid-run would break
# exactly-once, so they are immutable once a run has started.
IMMUTABLE_SPEC_FIELDS = (
    "database", "table", "key", "walk", "set", "delete", "copy", "from", "handler", "where", "parallelism", "checkpoint",
)


def _dump(value: BaseModel | list[FromTable]) -> Any:
    if isinstance(value, list):
        return [item.model_dump(mode="json", by_alias=True) for item in value]
    return value.model_dump(mode="json", by_alias=True)


class ObjectMeta(BaseModel):
    """The parts of Kubernetes metadata the engine uses; everything else is kept as-is."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    namespace: str = Field(default="default", min_length=1, max_length=63)
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class Backfill(BaseModel):
    """A ``Backfill`` manifest: ``kubectl apply``-able, and runnable locally with ``backfill run``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    api_version: Literal["backfill.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["Backfill"]
    metadata: ObjectMeta
    spec: BackfillSpec
    # The status is written by the operator and the worker; manifests may carry it (kubectl get -o yaml).
    status: dict[str, Any] | None = None

    @property
    def identity(self) -> str:
        """Stable name of this backfill's checkpoint: ``namespace/name``."""
        return f"{self.metadata.namespace}/{self.metadata.name}"
