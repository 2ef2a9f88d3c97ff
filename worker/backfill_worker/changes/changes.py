"""What one batch does to its key range: the seam between the key walk and the kind of change.

The engine walks keys, opens the batch transaction, and records the checkpoint; a
:class:`BatchChange` decides what happens to the rows of the range inside that transaction and
how the end-of-run verification counts rows that still need the change. Every kind of backfill
(SQL ``set`` with its ``from`` joins, ``delete``, ``copy``) is one implementation here, so the
batching loop, retries, throttles and checkpoints exist once. Each kind's batch statement comes
from ``statement()``, which ``backfill plan`` also renders, explains and samples.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import psycopg
from psycopg import sql

from backfill_api.errors import BackfillError
from backfill_api.model import BackfillSpec, ChangeKind
from backfill_worker.changes import handlers
from backfill_worker.checkpoints.checkpoint import Key
from backfill_worker.sql import retry, statements
from backfill_worker.sql.secrets import redact
from backfill_worker.sql.statements import Style, Target

if TYPE_CHECKING:
    from backfill_worker.changes.handlers import Batch, Handler, Runtime


class BatchChange(Protocol):
    """One kind of change, applied to one key range per batch transaction."""

    @property
    def target(self) -> Target:
        """The resolved table, key, fragments (and ``from``/``copy``) the statements are built from."""
        ...

    @property
    def name(self) -> str:
        """What ``backfill plan`` calls its statement: ``update``, ``delete``, ``copy``."""
        ...

    @property
    def verifiable(self) -> bool:
        """Whether :meth:`remaining` can count (an empty range then has 0 rows left)."""
        ...

    def statement(self, *, has_lower: bool, style: Style = Style.PSYCOPG) -> sql.Composed:
        """The batch statement over ``lower < key <= upper`` (params: lo..., hi...)."""
        ...

    def transaction(self, conn: psycopg.Connection) -> AbstractContextManager[object]:
        """Open the batch's transaction on ``conn`` (committed on normal exit, rolled back on error)."""
        ...

    def apply(self, conn: psycopg.Connection, lower: Key | None, upper: Key) -> int:
        """Change the rows with ``lower < key <= upper`` inside the open transaction; rows changed."""
        ...

    def remaining(self, conn: psycopg.Connection, lower: Key | None, upper: Key) -> int | None:
        """Rows of the range that still need the change (the verification); None if it cannot tell."""
        ...


@contextmanager
def _psycopg_transaction(conn: psycopg.Connection) -> Iterator[object]:
    with conn.transaction() as tx:
        yield tx


@dataclass(frozen=True)
class _SetBased(ABC):
    """A change that is one statement over the range, in the batch's plain transaction."""

    target: Target

    def transaction(self, conn: psycopg.Connection) -> AbstractContextManager[object]:
        return _psycopg_transaction(conn)

    @abstractmethod
    def statement(self, *, has_lower: bool, style: Style = Style.PSYCOPG) -> sql.Composed:
        """The kind's batch statement."""

    def apply(self, conn: psycopg.Connection, lower: Key | None, upper: Key) -> int:
        statement = self.statement(has_lower=lower is not None)
        return conn.execute(statement, statements.range_params(lower, upper)).rowcount


@dataclass(frozen=True)
class SqlUpdate(_SetBased):
    """``spec.set`` (joined with ``spec.from``): one set-based ``UPDATE`` of the range; verification
    counts rows still matching ``where`` (and the join)."""

    name = "update"

    @property
    def verifiable(self) -> bool:
        return self.target.where is not None

    def statement(self, *, has_lower: bool, style: Style = Style.PSYCOPG) -> sql.Composed:
        return statements.update_batch(self.target, has_lower=has_lower, style=style)

    def apply(self, conn: psycopg.Connection, lower: Key | None, upper: Key) -> int:
        if self.target.by_ctid:
            return self._apply_to_blocks(conn, lower, upper)
        return super().apply(conn, lower, upper)

    def _apply_to_blocks(self, conn: psycopg.Connection, lower: Key | None, upper: Key) -> int:
        """``walk: ctid``: the UPDATE, refused (rolled back) if a changed row still matches ``where``."""
        statement = statements.update_batch_checked(self.target, has_lower=lower is not None)
        row = conn.execute(statement, statements.range_params(lower, upper)).fetchone()
        changed, still = (int(row[0]), int(row[1])) if row else (0, 0)
        if still:
            raise BackfillError(f"spec.where: {where_stays_true(still, changed, f'blocks {block_span(lower, upper)}')}")
        return changed

    def remaining(self, conn: psycopg.Connection, lower: Key | None, upper: Key) -> int | None:
        if self.target.where is None:
            return None
        return count(conn, statements.count_remaining(self.target, has_lower=lower is not None), lower, upper)


@dataclass(frozen=True)
class SqlDelete(_SetBased):
    """``spec.delete``: one ``DELETE`` of the range's rows matching ``where``; verification counts
    rows of the range still matching it (every row of the range with ``allRows``)."""

    name = "delete"
    verifiable = True

    def statement(self, *, has_lower: bool, style: Style = Style.PSYCOPG) -> sql.Composed:
        return statements.delete_batch(self.target, has_lower=has_lower, style=style)

    def remaining(self, conn: psycopg.Connection, lower: Key | None, upper: Key) -> int | None:
        return count(conn, statements.count_remaining(self.target, has_lower=lower is not None), lower, upper)


@dataclass(frozen=True)
class SqlCopy(_SetBased):
    """``spec.copy``: one ``INSERT ... SELECT ... ON CONFLICT`` of the range's rows matching
    ``where``; verification counts those rows whose conflict key is missing from the target."""

    name = "copy"
    verifiable = True

    def statement(self, *, has_lower: bool, style: Style = Style.PSYCOPG) -> sql.Composed:
        return statements.copy_batch(self.target, has_lower=has_lower, style=style)

    def remaining(self, conn: psycopg.Connection, lower: Key | None, upper: Key) -> int | None:
        return count(conn, statements.count_missing_copies(self.target, has_lower=lower is not None), lower, upper)


def block_span(lower: Key | None, upper: Key) -> str:
    return f"{0 if lower is None else lower[0]}..{int(upper[0]) - 1}"


def where_stays_true(still: int, changed: int, where: str) -> str:
    """Why a ``walk: ctid`` batch was refused: the change does not make ``where`` false."""
    return (
        f"{still} of the {changed} rows changed in {where} still match where after the change; walk: ctid needs a "
        "where that the change makes false (an updated row may move to another block and be met again, or be "
        "missed). Add the condition that the set makes false, e.g. `<column> IS DISTINCT FROM <new value>`; "
        "nothing of that batch was committed"
    )


@dataclass(frozen=True)
class PythonHandler:
    """``spec.handler``: the user's callable changes the range's rows inside the batch transaction.

    The transaction is the engine's (``handlers.owned_transaction``) or a framework's (Django's
    ``atomic``); either way the handler's writes commit with the checkpoint or not at all, and
    only the engine ends it (``handlers`` guards it). Transient database errors the handler
    raises (lock or statement timeout, deadlock, lost connection) retry like ``set``'s.
    """

    target: Target
    handler: Handler
    callable_name: str
    """``spec.handler.callable``, for messages."""
    shard: int
    redact_text: Callable[[str], str] = redact
    open_transaction: Callable[[psycopg.Connection], AbstractContextManager[object]] = field(
        default=handlers.owned_transaction
    )
    decorate: Callable[[Batch], Batch] | None = None
    """Turns the plain batch into the runtime's own (``DjangoBatch``)."""

    name = "rows"
    """What ``backfill plan`` calls the batch statement: the handler's ``rows()``."""

    @property
    def verifiable(self) -> bool:
        return self.target.where is not None

    def statement(self, *, has_lower: bool, style: Style = Style.PSYCOPG) -> sql.Composed:
        """What ``backfill plan`` explains and samples: the locking read ``batch.rows()`` runs."""
        return statements.lock_batch_rows(self.target, has_lower=has_lower, style=style)

    def transaction(self, conn: psycopg.Connection) -> AbstractContextManager[object]:
        return self.open_transaction(conn)

    def apply(self, conn: psycopg.Connection, lower: Key | None, upper: Key) -> int:
        token = handlers.arm_guard(conn)
        batch = handlers.make_batch(conn, self.target, lower, upper, self.shard)
        if self.decorate is not None:
            batch = self.decorate(batch)
        try:
            result = self.handler(batch)
        except Exception as error:  # noqa: BLE001 - user code may raise anything: each becomes a clear, redacted failure
            raise self._failure(conn, token, error, lower) from None
        if not handlers.guard_intact(conn, token):
            raise self._ended_by_handler(lower)
        rows = self._rows(result, batch)
        handlers.release_guard(conn)
        return rows

    def remaining(self, conn: psycopg.Connection, lower: Key | None, upper: Key) -> int | None:
        if self.target.where is None:
            return None
        return count(conn, statements.count_remaining(self.target, has_lower=lower is not None), lower, upper)

    def _rows(self, result: object, batch: Batch) -> int:
        if result is None:
            return batch.rows_yielded
        if isinstance(result, bool) or not isinstance(result, int) or result < 0:
            raise handlers.HandlerFailed(
                f"{handlers.FIELD}: {self.callable_name} returned {type(result).__name__} {self.redact_text(repr(result))[:80]}: return the "
                "number of rows it changed (an int >= 0) or None (counts the rows batch.rows() yielded); the batch was rolled back"
            )
        return result

    def _where(self, lower: Key | None) -> str:
        return f"shard {self.shard}, the batch after key {list(lower or ())}"

    def _ended_by_handler(self, lower: Key | None) -> handlers.HandlerFailed:
        return handlers.HandlerFailed(
            f"{handlers.FIELD}: {self.callable_name} committed or rolled back the batch transaction itself ({self._where(lower)}); "
            "refused: the engine commits each batch together with its checkpoint, which is what makes the handler run "
            "exactly once per row. Remove conn.commit()/rollback()/COMMIT/ROLLBACK from the handler; nothing of the batch "
            "was committed"
        )

    def _failure(self, conn: psycopg.Connection, token: str, error: BaseException, lower: Key | None) -> BaseException:
        """What leaves ``apply`` when the handler raised: transient database errors as they are (retried)."""
        if handlers.is_guard_error(error) or not _still_armed(conn, token):
            return self._ended_by_handler(lower)
        transient = _transient_database_error(error, conn)
        if transient is not None:
            return transient
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return handlers.HandlerFailed(self.redact_text(
            f"{handlers.FIELD}: {self.callable_name} raised {type(error).__name__}{': ' + message if message else ''} "
            f"({handlers.handler_location(error, self.handler)}; {self._where(lower)}); the batch was rolled back, "
            "nothing of it was committed. Fix the handler and rerun: the run resumes from the checkpoint"
        ))


def _transient_database_error(error: BaseException, conn: psycopg.Connection) -> psycopg.Error | None:
    """The retryable psycopg error behind ``error`` (itself, or its cause: Django wraps them), if any."""
    seen: BaseException | None = error
    for _ in range(5):  # a short chain: a wrapper or two
        if seen is None:
            return None
        if isinstance(seen, psycopg.Error) and retry.classify(seen, conn.closed) is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _still_armed(conn: psycopg.Connection, token: str) -> bool:
    """After a handler raised: was the batch transaction ended by it? (An aborted one is still ours.)"""
    if conn.closed:
        return True  # lost connection: a transient error, not the handler's doing
    status = conn.info.transaction_status
    if status == psycopg.pq.TransactionStatus.INERROR:
        return True
    return handlers.guard_intact(conn, token)


def count(conn: psycopg.Connection, statement: sql.Composed, lower: Key | None, upper: Key) -> int:
    """A ``SELECT count(*)`` over the range, without a statement timeout (verification may scan)."""
    with conn.transaction():
        conn.execute("SELECT set_config('statement_timeout', '0', true)")
        row = conn.execute(statement, statements.range_params(lower, upper)).fetchone()
    return int(row[0]) if row else 0


KINDS: dict[ChangeKind, type[SqlUpdate] | type[SqlDelete] | type[SqlCopy]] = {
    ChangeKind.SET: SqlUpdate, ChangeKind.DELETE: SqlDelete, ChangeKind.COPY: SqlCopy,
}
"""The SQL kinds of change -> the change that implements it (``handler``: below)."""


def for_spec(
    spec: BackfillSpec, target: Target, *, shard: int = 0, runtime: Runtime | None = None,
    redact_text: Callable[[str], str] = redact,
) -> BatchChange:
    """The change a validated spec asks for (``target`` resolved from it by validation; ``shard``:
    whose batches it runs, a handler is told)."""
    if spec.handler is not None:
        handler = handlers.load(spec.handler, redact_text)
        if runtime is not None:
            change: BatchChange = runtime.change(target, handler, shard, redact_text)
            return change
        return PythonHandler(target, handler, spec.handler.callable, shard, redact_text)
    return KINDS[spec.kind](target)
