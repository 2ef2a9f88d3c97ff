"""Finding the next batch's upper bound while the current batch writes.

The bound probe walks ``size`` entries of the key index: about 4% of a run's time when done
between batches. Run on a second, read-only connection in a background thread, it overlaps
with the current batch's UPDATE and COMMIT (PostgreSQL runs them in two backends, on two
cores). Only a read: a wrong or stale result cannot affect correctness, because the batch
always uses the bound of the range it actually starts from (``lower`` must match), and the
probe itself is outside any write transaction in both variants.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import psycopg

from backfill_worker.checkpoints.checkpoint import Key
from backfill_worker.sql import statements
from backfill_worker.sql.statements import Target

log = logging.getLogger(__name__)

SHRINK_TOLERANCE = 0.75
GROWTH_TOLERANCE = 1.5
"""A prefetched bound sized for ``n`` keys is used when the wanted size is within [0.75 n, 1.5 n]:
adaptive growth (at most 1.5x per batch) may lag one batch; a shrink after a slow batch, or a
live re-tuning, may not."""


@dataclass(frozen=True)
class Bound:
    lower: Key | None
    size: int
    upper: Key | None
    """The key ``size`` keys after ``lower``; None when fewer keys are left."""


def probe(conn: psycopg.Connection, target: Target, lower: Key | None, run_upper: Key, size: int) -> Key | None:
    row = conn.execute(
        statements.probe_upper_bound(target, has_lower=lower is not None),
        [*statements.range_params(lower, run_upper), size - 1],
    ).fetchone()
    return tuple(row) if row else None


def usable(bound: Bound, lower: Key | None, wanted_size: int) -> bool:
    """Pure: may the batch starting after ``lower`` that wants ``wanted_size`` keys use ``bound``?

    Growth may lag one batch (it is bounded anyway); a shrink below the tolerance may not,
    because a slow batch must be followed by a smaller one at once.
    """
    return bound.lower == lower and bound.size * SHRINK_TOLERANCE <= wanted_size <= bound.size * GROWTH_TOLERANCE


class BoundPrefetcher:
    """One background probe at a time on its own connection; failures only disable the shortcut."""

    def __init__(self, connect: Callable[[], psycopg.Connection], target: Target) -> None:
        self._connect = connect
        self._target = target
        self._conn: psycopg.Connection | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backfill-probe")
        self._pending: Future[Bound] | None = None

    def start(self, lower: Key, run_upper: Key, size: int) -> None:
        self._discard()
        if self._target.by_ctid:  # a block range's end is arithmetic: nothing to probe
            return
        self._pending = self._pool.submit(self._probe, lower, run_upper, size)

    def take(self, lower: Key | None, wanted_size: int) -> Bound | None:
        """The prefetched bound if it fits this batch (waits for the probe to finish)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            bound = pending.result()
        except Exception as error:  # noqa: BLE001 - the synchronous probe will retry properly
            log.debug("prefetch probe failed: %s", type(error).__name__)
            self._close_connection()
            return None
        return bound if usable(bound, lower, wanted_size) else None

    def _probe(self, lower: Key, run_upper: Key, size: int) -> Bound:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return Bound(lower, size, probe(self._conn, self._target, lower, run_upper, size))

    def _discard(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            try:
                self._pending.result()
            except Exception:  # noqa: BLE001  (an abandoned probe's outcome does not matter)
                pass
            self._pending = None

    def _close_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001
                pass
            self._conn = None

    def close(self) -> None:
        self._discard()
        self._pool.shutdown(wait=True)
        self._close_connection()
