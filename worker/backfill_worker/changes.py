"""What one batch does to its key range: the seam between the key walk and the kind of change.

The engine walks keys, opens the batch transaction, and records the checkpoint; a
:class:`BatchChange` decides what happens to the rows of the range inside that transaction and
how the end-of-run verification counts rows that still need the change. Every kind of backfill
(SQL ``set``, and the kinds added beside it) is one implementation here, so the batching loop,
retries, throttles and checkpoints exist once.
"""

from __future__ import annotations

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
from .statements import Target


class BatchChange(Protocol):
    """One kind of change, applied to one key range per batch transaction."""

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


def update_blocks_checked(conn: psycopg.Connection, target: Target, lower: Key | None, upper: Key) -> int:
    """``walk: ctid``: the batch's UPDATE, refused (so rolled back) if a changed row still matches ``where``."""
    statement = statements.update_batch_checked(target, has_lower=lower is not None)
    row = conn.execute(statement, statements.range_params(lower, upper)).fetchone()
    changed, still = (int(row[0]), int(row[1])) if row else (0, 0)
    if still:
        span = f"blocks {0 if lower is None else lower[0]}..{int(upper[0]) - 1}"
        raise BackfillError(f"spec.where: {where_stays_true(still, changed, span)}")
    return changed


def where_stays_true(still: int, changed: int, where: str) -> str:
    """Why a ``walk: ctid`` batch was refused: the change does not make ``where`` false."""
    return (
        f"{still} of the {changed} rows changed in {where} still match where after the change; walk: ctid needs a "
        "where that the change makes false (an updated row may move to another block and be met again, or be "
        "missed). Add the condition that the set makes false, e.g. `<column> IS DISTINCT FROM <new value>`; "
        "nothing of that batch was committed"
    )


@dataclass(frozen=True)
class SqlUpdate:
    """``spec.set``: one set-based ``UPDATE`` of the range; verification counts rows still matching ``where``."""

    target: Target

    def transaction(self, conn: psycopg.Connection) -> AbstractContextManager[object]:
        return _psycopg_transaction(conn)

    def apply(self, conn: psycopg.Connection, lower: Key | None, upper: Key) -> int:
        if self.target.by_ctid:  # a moved row must not match where again: checked before COMMIT
            return update_blocks_checked(conn, self.target, lower, upper)
        statement = statements.update_batch(self.target, has_lower=lower is not None)
        return conn.execute(statement, statements.range_params(lower, upper)).rowcount

    def remaining(self, conn: psycopg.Connection, lower: Key | None, upper: Key) -> int | None:
        if self.target.where is None:
            return None
        return count(conn, statements.count_remaining(self.target, has_lower=lower is not None), lower, upper)


def count(conn: psycopg.Connection, statement: sql.Composed, lower: Key | None, upper: Key) -> int:
    """A ``SELECT count(*)`` over the range, without a statement timeout (verification may scan)."""
    with conn.transaction():
        conn.execute("SELECT set_config('statement_timeout', '0', true)")
        row = conn.execute(statement, statements.range_params(lower, upper)).fetchone()
    return int(row[0]) if row else 0


def for_spec(spec: BackfillSpec, target: Target) -> BatchChange:
    """The change a validated spec asks for."""
    del spec  # one kind today; the spec picks among kinds as they are added
    return SqlUpdate(target)
