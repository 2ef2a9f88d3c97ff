"""Health throttles (``spec.limits.health``, ``maxWalBytesPerSecond``, ``maxActiveBackends``,
``maxLockWaits``): from samples to wait-or-go (PURE; the queries are in ``health_probe.py``).

The WAL bound is a rate limit over marks: a mark is taken whenever the backfill goes on; before
the next batch the WAL written since the mark (by every session: that is what replicas and the
archive must keep up with) must not exceed ``maxWalBytesPerSecond`` times the time since the
mark, or the backfill waits until it does. So between any two consecutive marks the server's
WAL rate is within the bound, and the bound holds on average over the run. While the
application alone writes more than the bound, the backfill waits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

from backfill_api.model import LimitsSpec
from backfill_api.status import ThrottleReason
from backfill_worker.throttles.throttle import Wait

POLL_SECONDS = 1.0
"""Re-check interval while a threshold (backends, lock waits) says wait."""
MIN_WAL_WAIT_SECONDS = 0.01
"""Shorter WAL waits are not worth a round trip: go."""


class HealthValueError(ValueError):
    """The health query's answer is not one row with a boolean or a number."""


@dataclass(frozen=True)
class ServerSample:
    at: float
    """``time.monotonic()`` of the sample."""
    wal_bytes: int | None
    """``pg_current_wal_lsn()`` as bytes; None when not asked for."""
    active_backends: int
    """Other client sessions not idle (the backfill's own excluded)."""
    lock_waits: int
    """Other sessions waiting for a lock."""


@dataclass(frozen=True)
class WalMark:
    at: float
    wal_bytes: int


def interpret(rows: list[tuple[object, ...]]) -> bool | float:
    """The health query's verdict value: its first row's first column, a boolean or a number."""
    if not rows:
        raise HealthValueError("returned no row: it must return exactly one row (a boolean or a number)")
    if not rows[0]:
        raise HealthValueError("returned a row without columns: select one boolean or number")
    value = rows[0][0]
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float | Decimal):
        number = float(value)
        if math.isnan(number):
            raise HealthValueError("returned NaN: return a number or a boolean")
        return number
    if value is None:
        raise HealthValueError("returned NULL: return a boolean or a number (e.g. coalesce(..., 0))")
    raise HealthValueError(f"returned a {type(value).__name__} ({str(value)[:40]!r}): return a boolean or a number")


def check_shape(value: bool | float, max_value: float | None) -> str | None:
    """Why this result cannot be judged with this ``maxValue`` (None: it can)."""
    if isinstance(value, bool) and max_value is not None:
        return "the query returns a boolean, so maxValue does not apply: remove maxValue (or return a number)"
    if not isinstance(value, bool) and max_value is None:
        return f"the query returns a number ({value:g}): set maxValue, the value above which the backfill pauses"
    return None


def query_unhealthy(value: bool | float, max_value: float | None) -> bool:
    """True pauses: a boolean as it is, a number when it exceeds ``max_value``."""
    if isinstance(value, bool):
        return value
    return max_value is not None and value > max_value


def wal_wait(mark: WalMark | None, wal_bytes: int, at: float, max_bytes_per_second: int) -> float:
    """Seconds to wait before the next batch so the WAL since ``mark`` stays within the rate."""
    if mark is None or max_bytes_per_second <= 0:
        return 0.0
    written = max(0, wal_bytes - mark.wal_bytes)
    return max(0.0, written / max_bytes_per_second - (at - mark.at))


def threshold_wait(limits: LimitsSpec, sample: ServerSample) -> Wait | None:
    """The active-backends and lock-wait bounds (0 disables each)."""
    if limits.max_active_backends > 0 and sample.active_backends > limits.max_active_backends:
        return Wait(ThrottleReason.ACTIVE_BACKENDS, POLL_SECONDS)
    if limits.max_lock_waits > 0 and sample.lock_waits > limits.max_lock_waits:
        return Wait(ThrottleReason.LOCK_WAITS, POLL_SECONDS)
    return None


@dataclass(frozen=True)
class Decision:
    wait: Wait | None
    """None: go on with the next batch."""
    mark: WalMark | None
    """The WAL mark to keep (moves to this sample when the backfill goes on)."""


def decide(
    limits: LimitsSpec, *, unhealthy: bool, sample: ServerSample | None, mark: WalMark | None,
    query_poll_seconds: float = POLL_SECONDS,
) -> Decision:
    """Wait or go, and why: the health query first, then backends, lock waits, the WAL rate.

    ``unhealthy`` is the health query's verdict (a failed query counts as unhealthy); ``sample``
    is None when no server-side bound is set. The WAL mark only moves when the backfill goes on,
    so a wait is measured from the last batch's start, application WAL included.
    """
    if unhealthy:
        return Decision(Wait(ThrottleReason.HEALTH_QUERY, query_poll_seconds), mark)
    if sample is None:
        return Decision(None, mark)
    threshold = threshold_wait(limits, sample)
    if threshold is not None:
        return Decision(threshold, mark)
    if limits.max_wal_bytes_per_second > 0 and sample.wal_bytes is not None:
        wait = wal_wait(mark, sample.wal_bytes, sample.at, limits.max_wal_bytes_per_second)
        if wait >= MIN_WAL_WAIT_SECONDS:
            return Decision(Wait(ThrottleReason.WAL_RATE, min(wait, POLL_SECONDS)), mark)
        return Decision(None, WalMark(sample.at, sample.wal_bytes))
    return Decision(None, mark)


def enabled(limits: LimitsSpec) -> bool:
    """Whether any health bound is set (the probe and its session are needed)."""
    return (
        limits.health is not None or limits.max_wal_bytes_per_second > 0
        or limits.max_active_backends > 0 or limits.max_lock_waits > 0
    )


def server_sample_needed(limits: LimitsSpec) -> bool:
    return limits.max_wal_bytes_per_second > 0 or limits.max_active_backends > 0 or limits.max_lock_waits > 0


def first_reason(limits: LimitsSpec) -> ThrottleReason:
    """The reason shown while the probe itself fails (it counts as unhealthy)."""
    if limits.health is not None:
        return ThrottleReason.HEALTH_QUERY
    if limits.max_wal_bytes_per_second > 0:
        return ThrottleReason.WAL_RATE
    if limits.max_active_backends > 0:
        return ThrottleReason.ACTIVE_BACKENDS
    return ThrottleReason.LOCK_WAITS
