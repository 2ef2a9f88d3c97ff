"""The backfill loop: validate, lock, plan shards, then keyset-batched committed UPDATEs.

Per batch: (1) outside any transaction, walk the key index ``size`` keys past the last
checkpoint to find the batch's upper bound; (2) one short transaction: ``SET LOCAL`` timeouts,
one set-based ``UPDATE ... WHERE key > lo AND key <= hi AND (where)`` (or the ``DELETE`` /
``INSERT ... SELECT`` of ``spec.delete`` / ``spec.copy``: ``changes.py``), the checkpoint row,
``COMMIT``. Row locks are held only for (2). The probe of the next batch runs on a second
connection during (2) (``prefetch.py``); all but the last batch commit asynchronously (data and
checkpoint are one transaction, so a server crash loses both or neither). Under
``limits.applicationImpact.mode: protect`` (the default) a governor (``impact_governor.py``)
measures the other sessions before the first batch and between batches and sets the pause and
the batch duration (``app_impact.py``, pure). Decisions (SQL text,
batch size, waits, progress) live in pure modules; this module does the I/O and the ordering.
The pieces: ``checkpointing.py`` (one checkpoint interface: the table, or the atLeastOnce
store), ``batch_transaction.py`` (the key walk and the batch's transaction), ``pacing.py``
(batch size, waits, replica lag, the governor's hooks); here: the loop, retries, the session.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import InitVar, dataclass, field, replace
from typing import TypeVar

import psycopg
from tenacity import RetryCallState, RetryError, Retrying, retry_if_exception, stop_after_attempt

from backfill_api.errors import (
    AlreadyRunning,
    BackfillError,
    RetriesExhausted,
    ValidationFailed,
)
from backfill_api.model import Backfill, CheckpointMode, ImpactMode
from backfill_api.status import ShardState
from backfill_worker.changes import changes, handlers
from backfill_worker.checkpoints.checkpoint import (
    DONE,
    FAILED,
    PAUSED,
    RUNNING,
    CheckpointTable,
    Key,
    ProgressStore,
    ShardCheckpoint,
)
from backfill_worker.observe.events import (
    BatchCommitted,
    Event,
    Listener,
    RetryScheduled,
    RunControl,
    RunFinished,
    RunStarted,
    StaticControl,
    Tuning,
)
from backfill_worker.plan import validation
from backfill_worker.run import batch_transaction, checkpointing
from backfill_worker.sql import blocks, locking, prefetch, retry
from backfill_worker.sql.connection import (
    Connections,
    DsnConnections,
    connect,
    database_errors,
    first_line,
    open_connection,
)
from backfill_worker.sql.secrets import redact, register_dsn, secrets_of
from backfill_worker.sql.statements import Target
from backfill_worker.throttles import health_probe, impact_governor, pacing

log = logging.getLogger(__name__)
T = TypeVar("T")

@dataclass(frozen=True)
class ShardReport:
    shard: int
    state: ShardState
    """``done``, ``paused`` or ``failed``."""
    rows_updated: int
    batches: int
    remaining_matches: int | None
    duration: float
    error: str | None = None


@dataclass(frozen=True)
class RunReport:
    shards: tuple[ShardReport, ...]
    duration: float

    @property
    def state(self) -> ShardState:
        states = {s.state for s in self.shards}
        if FAILED in states:
            return FAILED
        if PAUSED in states:
            return PAUSED
        return DONE

    @property
    def rows_updated(self) -> int:
        return sum(s.rows_updated for s in self.shards)

    @property
    def batches(self) -> int:
        return sum(s.batches for s in self.shards)

    @property
    def remaining_matches(self) -> int | None:
        counts = [s.remaining_matches for s in self.shards]
        return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)


@dataclass
class _Emitter:
    listeners: Sequence[Listener]

    def __call__(self, event: Event) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a broken sink must not break the backfill
                log.exception("backfill listener %r failed on %s", listener, type(event).__name__)


@dataclass
class ShardSession:
    """One shard's database session: the connection (after a loss: reopened, the shard's advisory
    lock taken again, the checkpoint re-read through ``reloaded``) and the retries of transient
    errors around whatever runs on it. The :class:`~backfill_worker.throttles.pacing.Session` the
    pacer's probes use; used by the shard's thread only.
    """

    identity: str
    shard: int
    dsn: str
    conn: psycopg.Connection | None
    pacer: pacing.Pacer
    emit: _Emitter
    resume_after: Callable[[], Key | None]
    """Where the shard stands (for messages)."""
    reloaded: Callable[[psycopg.Connection], None]
    """Called with a reopened connection, before anything runs on it."""
    connections: Connections | None = None
    """Where a reconnect gets the shard's session (default: a new session of ``dsn``)."""
    consecutive_timeouts: int = 0
    backend_pid: int | None = None
    lost_backend_pid: int | None = None
    """Server pid of this runner's last lost session (see ``locking.take_over_from_own_session``)."""

    def __post_init__(self) -> None:
        if self.conn is not None:
            self.backend_pid = self.conn.info.backend_pid

    def succeeded(self) -> None:
        """A batch committed: timeouts no longer come in a row."""
        self.consecutive_timeouts = 0

    def with_retries(self, attempt: Callable[[], T]) -> T:
        retrying = Retrying(
            stop=stop_after_attempt(self.pacer.tuning.limits.max_retries + 1),
            wait=retry.BACKOFF,
            retry=retry_if_exception(self._retryable),
            before_sleep=self._before_retry,
            sleep=self.pacer.sleep,
        )
        try:
            return retrying(attempt)
        except RetryError as error:
            last = error.last_attempt.exception()
            kind = retry.classify(last) if last else None
            raise RetriesExhausted(
                f"shard {self.shard}: the batch after key {list(self.resume_after() or ())} failed "
                f"{error.last_attempt.attempt_number} times in a row ({kind.kind if kind else 'error'}: "
                f"{self.redact(first_line(last)) if last else '?'}); raise spec.limits.maxRetries or "
                "lockTimeout/statementTimeout, or run when the table is less busy. The run resumes from the checkpoint"
            ) from None

    def _retryable(self, error: BaseException) -> bool:
        closed = self.conn is None or self.conn.closed
        return retry.classify(error, closed) is not None

    def _before_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        assert error is not None
        closed = self.conn is None or self.conn.closed
        transient = retry.classify(error, closed)
        assert transient is not None
        if transient.timeout:
            self.consecutive_timeouts += 1
            if transient.kind == retry.STATEMENT_TIMEOUT or self.consecutive_timeouts >= 2:
                self.pacer.halve()
        if transient.reconnect:
            self.drop_connection()
        delay = state.next_action.sleep if state.next_action else 0.0
        self.emit(
            RetryScheduled(
                self.identity, self.shard, transient.kind, state.attempt_number, delay, self.pacer.batch_size,
                self.redact(first_line(error)),
            )
        )
        log.warning("shard %s: %s, retry %s in %.2fs", self.shard, transient.kind, state.attempt_number, delay)

    def redact(self, text: str) -> str:
        return redact(text, secrets_of(self.dsn))

    def connection(self) -> psycopg.Connection:
        """The shard's connection; after a loss: reconnect, re-take the lock, re-read the checkpoint."""
        if self.conn is not None and not self.conn.closed:
            return self.conn
        conn = (self.connections or DsnConnections(self.dsn)).open(f"backfill {self.identity} shard {self.shard}")
        stale = self.lost_backend_pid
        if not locking.try_lock(conn, self.identity, self.shard) and not (
            stale is not None and locking.take_over_from_own_session(conn, self.identity, self.shard, stale)
        ):
            conn.close()
            raise AlreadyRunning(
                f"shard {self.shard} of {self.identity}: another runner took over while this one was reconnecting; stopping"
            )
        self.conn = conn
        self.backend_pid = conn.info.backend_pid
        self.reloaded(conn)
        return conn

    def drop_connection(self) -> None:
        """Close the session (lost, or the run is over); the next :meth:`connection` reopens it."""
        if self.conn is not None:
            self.lost_backend_pid = self.backend_pid  # may live on, server-side, after a partition
            try:
                self.conn.close()
            except (psycopg.Error, OSError):  # already broken
                pass
        self.conn = None


@dataclass
class _Shard:
    """One shard's runner: the batch loop, the batch, the end-of-shard labels.

    Its :class:`ShardSession` holds the connection and the retries; how fast it goes is the
    :class:`~backfill_worker.throttles.pacing.Pacer`'s job. Used by one thread only.
    """

    backfill: Backfill
    dsn: str
    target: Target
    checkpoint: ShardCheckpoint
    conn: InitVar[psycopg.Connection | None]
    control: RunControl
    emit: _Emitter
    checkpoints: checkpointing.Checkpoints
    """The table (transactional) or the progress store (atLeastOnce): the same calls either way."""
    change: changes.BatchChange
    """What each batch does to its range (``changes.py``)."""
    tuning: InitVar[Tuning]
    pacer: pacing.Pacer = field(init=False)
    session: ShardSession = field(init=False)
    prefetcher: prefetch.BoundPrefetcher | None = None
    own: impact_governor.OwnActivity = field(default_factory=impact_governor.OwnActivity)
    """The backfill's own transactions over all shards (the application-impact throttle's input)."""
    connections: InitVar[Connections | None] = None
    """Where a reconnect gets the shard's session (default: a new session of ``dsn``)."""

    def __post_init__(self, conn: psycopg.Connection | None, tuning: Tuning, connections: Connections | None) -> None:
        secrets = secrets_of(self.dsn)
        self.pacer = pacing.Pacer(
            self.identity, self.shard, (self.target.schema, self.target.table),
            self.backfill.spec.checkpoint.schema_name, self.control, self.emit, tuning, self.own,
            open_health_session=lambda: open_connection(self.dsn, f"backfill {self.identity} shard {self.shard} health"),
            redact=lambda text: redact(text, secrets),
        )
        self.session = ShardSession(
            self.identity, self.shard, self.dsn, conn, self.pacer, self.emit,
            resume_after=lambda: self.checkpoint.resume_after, reloaded=self._reload, connections=connections,
        )

    def _reload(self, conn: psycopg.Connection) -> None:
        reloaded = self.checkpoints.reload(conn, self.identity, self.shard)
        if reloaded is not None:
            self.checkpoint = reloaded

    @property
    def identity(self) -> str:
        return self.backfill.identity

    @property
    def shard(self) -> int:
        return self.checkpoint.shard

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> ShardReport:
        started = time.monotonic()
        cp = self.checkpoint
        self.emit(
            RunStarted(
                self.identity, cp.shard, cp.shard_count, resumed=cp.last_key is not None,
                rows_updated=cp.rows_updated, estimated_keys=cp.estimated_keys, keys_done=cp.keys_done,
            )
        )
        self.prefetcher = prefetch.BoundPrefetcher(
            lambda: open_connection(self.dsn, f"backfill {self.identity} shard {self.shard} probe"), self.target
        )
        try:
            state = self._loop()
        except pacing.StopRequested:
            state = PAUSED
        except BackfillError as error:
            if not isinstance(error, AlreadyRunning):  # another runner owns the shard now: not ours to label
                self._persist_failure(str(error))
            self._finish(FAILED, None, str(error))
            raise
        except psycopg.Error as error:  # not transient (constraint violation, division by zero...)
            failure = BackfillError(
                f"shard {self.shard}: the batch after key {list(self.checkpoint.resume_after or ())} failed: "
                f"{self.session.redact(first_line(error))}; nothing of that batch was committed"
            )
            self._persist_failure(str(failure))
            self._finish(FAILED, None, str(failure))
            raise failure from None
        finally:
            self.prefetcher.close()
            self.prefetcher = None
            self.pacer.close()
        remaining = None
        if state == DONE:
            try:
                remaining = self._verify()
            except pacing.StopRequested:  # stopped while backing off: the data is done, only the count is missing
                pass
        else:
            self._persist_state(PAUSED)
        self._finish(state, remaining, None)
        cp = self.checkpoint
        return ShardReport(cp.shard, state, cp.rows_updated, cp.batches, remaining, time.monotonic() - started)

    def _finish(self, state: ShardState, remaining: int | None, error: str | None) -> None:
        cp = self.checkpoint
        self.emit(RunFinished(self.identity, cp.shard, state, cp.rows_updated, cp.batches, remaining, error))

    def _loop(self) -> ShardState:
        if self.checkpoint.state == DONE:
            return DONE
        if self.checkpoint.state == FAILED:
            self._persist_state(RUNNING)  # a new attempt: clears the last run's reason
        if self.checkpoint.empty:
            self.checkpoint = replace(self.checkpoint, state=DONE)
            self._persist_state(DONE)
            return DONE
        while True:
            if self.control.stop_reason():
                return PAUSED
            self.pacer.retune()
            self.pacer.before_batch(self.session)
            batch_started = time.monotonic()
            event = self._batch_with_retries()
            self.emit(event)
            self.pacer.throttle_reason = ""
            if self.checkpoint.state == DONE:
                return DONE
            self.pacer.after_batch(self.session, event.rows_updated, time.monotonic() - batch_started, self.checkpoint.shard_count)

    # -- one batch --------------------------------------------------------------------------

    def _batch_with_retries(self) -> BatchCommitted:
        while True:
            try:
                event = self.session.with_retries(self._batch)
                break
            except batch_transaction.LockYielded:  # rolled back: nothing of it stays; again, halved
                self.pacer.lock_yielded()
        self.pacer.locked()
        self.session.succeeded()
        return event

    def _batch(self) -> BatchCommitted:
        conn = self.session.connection()
        cp = self.checkpoint
        run_upper = cp.upper_key
        assert run_upper is not None
        keys = batch_transaction.walk(
            conn, self.target, self.prefetcher, self.shard, cp.resume_after, run_upper, self.pacer.batch_size
        )
        if not keys.last and self.prefetcher is not None:
            self.prefetcher.start(keys.upper, run_upper, self.pacer.batch_size)  # overlaps with this batch's write
        governor = self.pacer.governor
        started = time.monotonic()
        rows = batch_transaction.write(
            conn, self.change, self.pacer.tuning.limits, keys,
            asynchronous=batch_transaction.commits_asynchronously(self.checkpoints, keys.last, governor),
            governor=governor, checkpoints=self.checkpoints, identity=self.identity, shard=self.shard,
            lock_timeout=self.pacer.batch_lock_timeout(),
        )
        duration = time.monotonic() - started
        self.checkpoint = cp.after_batch(keys.upper, rows, keys.keys, keys.last)
        self.checkpoints.batch_committed(self.checkpoint)  # atLeastOnce: saved after COMMIT
        self.pacer.observe(keys.keys, duration)
        return BatchCommitted(
            identity=self.identity,
            shard=self.shard,
            batch_number=self.checkpoint.batches,
            rows_updated=rows,
            keys_scanned=keys.keys,
            batch_size=keys.size,
            next_batch_size=self.pacer.batch_size,
            duration_seconds=duration,
            last_key=keys.upper,
            total_rows_updated=self.checkpoint.rows_updated,
            total_batches=self.checkpoint.batches,
            throttle_reason=self.pacer.throttle_reason,
        )

    # -- end of shard -----------------------------------------------------------------------

    def _persist_state(self, state: ShardState) -> None:
        self.checkpoint = replace(self.checkpoint, state=state, last_error=None)
        self.checkpoints.record_state(self.session.conn, self.checkpoint)

    def _persist_failure(self, reason: str) -> None:
        """State ``failed`` and the reason, for ``backfill status`` (on a fresh session if the shard's broke)."""
        self.checkpoint = replace(self.checkpoint, state=FAILED, last_error=reason)
        self.checkpoints.record_failure(self.session.conn, self.checkpoint)

    def _verify(self) -> int | None:
        """Rows of the shard's range that still need the change (None when the change cannot tell)."""
        cp = self.checkpoint
        lower, upper = cp.lower_key, cp.upper_key
        if upper is None or cp.empty:
            return 0 if self.change.verifiable else None
        if self.target.by_ctid:  # the shards' ranges, the last one open-ended: the whole table
            upper = blocks.verification_upper(cp)
            assert upper is not None
        return self.session.with_retries(lambda: self.change.remaining(self.session.connection(), lower, upper))


# -- setup: validation, locks, checkpoints ----------------------------------------------------


def _validate(conn: psycopg.Connection, backfill: Backfill, dsn: str) -> Target:
    target = validation.resolve_target(conn, backfill.spec)
    validation.check_permissions(conn, target)
    validation.check_fragments(conn, target, secrets_of(dsn))
    secrets = secrets_of(dsn)
    health_probe.validate(conn, backfill.spec.limits, lambda text: redact(text, secrets))
    return target


def _start_look(conn: psycopg.Connection, backfill: Backfill) -> impact_governor.PreRunLook | None:
    if backfill.spec.limits.application_impact.mode != ImpactMode.PROTECT:
        return None
    return impact_governor.PreRunLook(conn, backfill.identity)


def _shard_numbers(backfill: Backfill, shards: Sequence[int] | None) -> list[int]:
    count = backfill.spec.parallelism
    selected = list(range(count)) if shards is None else list(dict.fromkeys(shards))
    if not selected:
        raise ValidationFailed("shard", "no shard selected: omit the shard list to run all shards")
    for shard in selected:
        if not 0 <= shard < count:
            raise ValidationFailed("shard", f"shard {shard} does not exist: spec.parallelism is {count} (shards 0..{count - 1})")
    return selected


class _WaitAnnouncer:
    """Says what a starting run waits for: at the first poll, then every ``every`` seconds."""

    def __init__(self, identity: str, shard: int, redact_text: Callable[[str], str], every: float = 5.0) -> None:
        self._identity, self._shard, self._redact, self._every = identity, shard, redact_text, every
        self._next = 0.0

    def __call__(self, holder: locking.LockHolder, waited: float) -> None:
        if waited < self._next:
            return
        self._next = waited + self._every
        log.warning(
            "%s shard %s: waiting for the previous run's session to release the shard's lock (waited %.1f s): %s",
            self._identity, self._shard, waited, locking.describe_holder(holder, self._redact),
        )


def _refusal_message(backfill: Backfill, shard: int, refusal: locking.Refusal, redact_text: Callable[[str], str]) -> str:
    """Why a run was refused its shard's lock (PURE)."""
    if not refusal.own or refusal.holder is None:
        return (
            f"{backfill.identity} shard {shard} is already being run by another process "
            "(advisory lock held); nothing was changed. Wait for it, or stop it first"
        )
    if refusal.alive:
        return (
            f"{backfill.identity} shard {shard} is already being run by another process: a live run of this backfill "
            f"holds the shard's lock (its session runs new statements, or waits for its client), "
            f"{locking.describe_holder(refusal.holder, redact_text)}; nothing was changed. Wait for it, or stop it first"
        )
    return (
        f"{backfill.identity} shard {shard} is already being run by another process: a session of this backfill "
        f"still holds the shard's lock after {refusal.waited:.0f} s of waiting (spec.limits.restartWait), "
        f"{locking.describe_holder(refusal.holder, redact_text)}; nothing was changed. Wait for it, or stop it first"
    )


def _lock_shards(
    dsn: str, backfill: Backfill, shards: list[int], first: psycopg.Connection | None, connections: Connections,
    redact_text: Callable[[str], str] = str,
) -> dict[int, psycopg.Connection]:
    """One locked connection per shard (the first reuses ``first`` if given); AlreadyRunning if any
    is taken (after waiting up to ``spec.limits.restartWait`` while this backfill's own previous
    session holds it: ``locking.acquire``)."""
    conns: dict[int, psycopg.Connection] = {}
    try:
        for index, shard in enumerate(shards):
            conn = first if index == 0 and first is not None else connect(dsn, f"backfill {backfill.identity} shard {shard}", connections)
            conns[shard] = conn
            refusal = locking.acquire(
                conn, backfill.identity, shard, wait_seconds=backfill.spec.limits.restart_wait.total_seconds(),
                on_wait=_WaitAnnouncer(backfill.identity, shard, redact_text),
            )
            if refusal is not None:
                raise AlreadyRunning(_refusal_message(backfill, shard, refusal, redact_text))
    except BaseException:
        for conn in conns.values():
            if conn is not first:
                connections.close(conn)
        raise
    return conns


def run_backfill(
    backfill: Backfill,
    dsn: str,
    *,
    shards: Sequence[int] | None = None,
    listeners: Sequence[Listener] = (),
    control: RunControl | None = None,
    at_least_once_store: ProgressStore | None = None,
    runtime: handlers.Runtime | None = None,
) -> RunReport:
    """Run the given shards (default all) until done, paused by ``control``, or failed.

    Validates everything before the first write. Several shards run concurrently, one thread
    and one connection each. Raises ``errors.*`` with redacted messages; a failing shard's
    error is raised after the other shards finished (``error.report`` holds the RunReport).
    ``runtime``: where a ``spec.handler`` runs (default: ``handlers.runtime_for`` the spec,
    e.g. Django's connection for ``spec.handler.django``; plain psycopg sessions otherwise).
    """
    register_dsn(dsn)
    started = time.monotonic()
    control = control or StaticControl()
    emit = _Emitter(listeners)
    selected = _shard_numbers(backfill, shards)
    spec = backfill.spec
    secrets = secrets_of(dsn)
    redact_text = lambda text: redact(text, secrets)  # noqa: E731
    if runtime is None:
        runtime = handlers.runtime_for(spec, dsn)
    if runtime is not None and runtime.one_shard_per_process and len(selected) > 1:
        raise ValidationFailed(
            "spec.parallelism",
            f"this handler runs on a per-thread connection (Django's), so one process runs one shard: run each of the "
            f"{spec.parallelism} shards in its own process with --shard N (the in-cluster worker does), or set parallelism: 1",
        )
    if spec.handler is not None:
        handlers.load(spec.handler, redact_text)  # before connecting: nothing is written if it does not import
    connections: Connections = runtime.connections if runtime is not None else DsnConnections(dsn)
    store = _checkpoints(backfill, dsn, at_least_once_store)
    # Validation and planning always on a plain session (parameters bound server-side); a runtime's
    # connections only run the shards' batches.
    main = connect(dsn, f"backfill {backfill.identity}")
    conns: dict[int, psycopg.Connection] = {}
    runners: list[_Shard] = []
    try:
        with database_errors(dsn):
            look = _start_look(main, backfill)
            target = _validate(main, backfill, dsn)
            # The throttle's "is anybody there?" look spans the (read-only) validation instead of
            # a sleep of its own; walk: ctid's validation samples an UPDATE, a transaction id of ours.
            seen = look.finish(main, time.sleep) if look is not None and not target.by_ctid else None
            shard_changes = {
                s: changes.for_spec(spec, target, shard=s, runtime=runtime, redact_text=redact_text) for s in selected
            }
            conns = _lock_shards(dsn, backfill, selected, main if runtime is None else None, connections, redact_text)
            checkpoints = checkpointing.plan(main, store, backfill, target)
        tuning = Tuning(batch=spec.batch, limits=spec.limits, schedule=spec.schedule)
        own = impact_governor.OwnActivity()  # shared: one shard's batches are not "the application" to another
        runners = [
            _Shard(backfill, dsn, target, checkpoints[s], conns[s], control, emit, store, shard_changes[s], tuning,
                   own=own, connections=connections)
            for s in selected
        ]
        for runner in runners:
            runner.pacer.pre_run_look = seen
        reports, errors = _run_all(runners, dsn)
    finally:
        for conn in conns.values():
            if conn is not main:
                connections.close(conn)
        for runner in runners:  # a shard that reconnected holds its lock on a connection of its own
            if runner.session.conn is not None and runner.session.conn not in conns.values():
                connections.close(runner.session.conn)  # (Django's: through Django, so it reconnects on next use)
            runner.session.drop_connection()
        main.close()
    report = RunReport(tuple(sorted(reports, key=lambda r: r.shard)), time.monotonic() - started)
    if errors:
        error = errors[0]
        error.report = report  # type: ignore[attr-defined]
        raise error
    return report


def _checkpoints(backfill: Backfill, dsn: str, at_least_once_store: ProgressStore | None) -> checkpointing.Checkpoints:
    """The spec's checkpoint mode as one interface (``atLeastOnce`` needs ``at_least_once_store``)."""
    if backfill.spec.checkpoint.mode == CheckpointMode.AT_LEAST_ONCE:
        if at_least_once_store is None:
            raise ValidationFailed(
                "spec.checkpoint.mode", "atLeastOnce keeps progress outside the database, but no progress store was given"
            )
        return checkpointing.StoredCheckpoints(at_least_once_store)
    secrets = secrets_of(dsn)
    return checkpointing.TableCheckpoints(
        CheckpointTable(backfill.spec.checkpoint.schema_name), dsn, lambda text: redact(text, secrets)
    )


def _run_all(runners: list[_Shard], dsn: str) -> tuple[list[ShardReport], list[BackfillError]]:
    reports: list[ShardReport] = []
    errors: list[BackfillError] = []
    lock = threading.Lock()

    def run_one(runner: _Shard) -> None:
        started = time.monotonic()
        try:
            with database_errors(dsn):
                report = runner.run()
        except BackfillError as error:
            cp = runner.checkpoint
            report = ShardReport(cp.shard, FAILED, cp.rows_updated, cp.batches, None, time.monotonic() - started, str(error))
            with lock:
                errors.append(error)
        with lock:
            reports.append(report)

    if len(runners) == 1:
        run_one(runners[0])  # in the caller's thread: signals and tracebacks stay simple
    else:
        with ThreadPoolExecutor(max_workers=len(runners), thread_name_prefix="backfill-shard") as pool:
            list(pool.map(run_one, runners))
    return reports, errors


# -- checkpoint inspection for `backfill status` / `backfill reset` ----------------------------


def read_checkpoints(backfill: Backfill, dsn: str, *, store: ProgressStore | None = None) -> list[ShardCheckpoint]:
    """The recorded progress of every shard (empty when the backfill never ran)."""
    if backfill.spec.checkpoint.mode == CheckpointMode.AT_LEAST_ONCE and store is not None:
        return [cp for i in range(backfill.spec.parallelism) if (cp := store.load(i)) is not None]
    with connect(dsn, f"backfill {backfill.identity} status") as conn, database_errors(dsn):
        return CheckpointTable(backfill.spec.checkpoint.schema_name).load(conn, backfill.identity)


def reset_checkpoints(backfill: Backfill, dsn: str, *, store: checkpointing.ClearableStore | None = None) -> int:
    """Forget the checkpoint (refused while a runner holds a shard's lock); returns rows removed."""
    with connect(dsn, f"backfill {backfill.identity} reset") as conn, database_errors(dsn):
        shards = list(range(backfill.spec.parallelism))
        held = [s for s in shards if not locking.try_lock(conn, backfill.identity, s)]
        try:
            if held:
                raise AlreadyRunning(
                    f"{backfill.identity} is running (shards {held} locked): stop it before resetting its checkpoint"
                )
            if backfill.spec.checkpoint.mode == CheckpointMode.AT_LEAST_ONCE and store is not None:
                return store.clear()
            return CheckpointTable(backfill.spec.checkpoint.schema_name).delete(conn, backfill.identity)
        finally:
            for s in shards:
                if s not in held:
                    locking.unlock(conn, backfill.identity, s)
