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
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

import psycopg
from psycopg import sql

from backfill_api.errors import BackfillError
from backfill_api.model import BackfillSpec

from . import statements
from .checkpoint import Key
from .statements import Style, Target


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


def count(conn: psycopg.Connection, statement: sql.Composed, lower: Key | None, upper: Key) -> int:
    """A ``SELECT count(*)`` over the range, without a statement timeout (verification may scan)."""
    with conn.transaction():
        conn.execute("SELECT set_config('statement_timeout', '0', true)")
        row = conn.execute(statement, statements.range_params(lower, upper)).fetchone()
    return int(row[0]) if row else 0


KINDS: dict[str, type[SqlUpdate] | type[SqlDelete] | type[SqlCopy]] = {
    "set": SqlUpdate, "delete": SqlDelete, "copy": SqlCopy,
}
"""``backfill_api.model.KIND_FIELDS`` -> the change that implements it."""


def for_spec(spec: BackfillSpec, target: Target) -> BatchChange:
    """The change a validated spec asks for (``target`` resolved from it by validation)."""
    return KINDS[spec.kind](target)
