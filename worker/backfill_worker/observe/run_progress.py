"""Pure progress math: rate over a sliding window, percent, ETA, and a per-shard tally of events.

Used by the CLI's progress bar and available to any listener (status reporter, metrics).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from backfill_api.status import ShardState
from backfill_worker.observe.events import BatchCommitted, Event, ImpactObserved, RunFinished, RunStarted, Throttled

RATE_WINDOW_SECONDS = 10.0


@dataclass
class RateWindow:
    """Rows and keys per second over the last ``window`` seconds of committed batches."""

    window: float = RATE_WINDOW_SECONDS
    samples: deque[tuple[float, int, int]] = field(default_factory=deque)

    def add(self, now: float, rows: int, keys: int) -> None:
        self.samples.append((now, rows, keys))
        while len(self.samples) > 2 and now - self.samples[1][0] > self.window:
            self.samples.popleft()

    def _span(self) -> float:
        return self.samples[-1][0] - self.samples[0][0] if len(self.samples) >= 2 else 0.0

    def rows_per_second(self) -> float:
        span = self._span()
        return sum(s[1] for s in list(self.samples)[1:]) / span if span > 0 else 0.0

    def keys_per_second(self) -> float:
        span = self._span()
        return sum(s[2] for s in list(self.samples)[1:]) / span if span > 0 else 0.0


def percent(keys_done: int, estimated_keys: int, done: bool) -> int:
    """0..100; 100 only when finished (estimates can be exceeded before the end)."""
    if done:
        return 100
    if estimated_keys <= 0:
        return 0
    return max(0, min(99, int(100 * keys_done / estimated_keys)))


def eta_seconds(keys_done: int, estimated_keys: int, keys_per_second: float) -> float | None:
    if keys_per_second <= 0 or estimated_keys <= 0:
        return None
    return max(0.0, (estimated_keys - keys_done) / keys_per_second)


@dataclass
class ShardProgress:
    """What one shard has done, folded from its events."""

    shard: int
    state: ShardState = ShardState.PENDING
    rows_updated: int = 0
    batches: int = 0
    keys_done: int = 0
    estimated_keys: int = 0
    batch_size: int = 0
    last_key: tuple[str, ...] = ()
    throttle_reason: str = ""
    next_window_start: datetime | None = None
    """While waiting for a run window: when the next one opens."""
    throttled_seconds: dict[str, float] = field(default_factory=dict)
    """Time waited in this run, by throttle reason."""
    impact: ImpactObserved | None = None
    """The application-impact throttle's latest decision (None under ``mode: fast``)."""
    remaining_matches: int | None = None
    error: str | None = None
    rate: RateWindow = field(default_factory=RateWindow)
    started_at: float | None = None
    finished_at: float | None = None
    rows_at_start: int = 0

    def apply(self, event: Event, now: float) -> None:
        if isinstance(event, RunStarted):
            self.state = ShardState.RUNNING
            self.rows_updated = event.rows_updated
            self.keys_done = event.keys_done
            self.estimated_keys = event.estimated_keys
            self.started_at, self.rows_at_start = now, event.rows_updated
            self.rate.add(now, 0, 0)
        elif isinstance(event, BatchCommitted):
            self.rows_updated = event.total_rows_updated
            self.batches = event.total_batches
            self.keys_done += event.keys_scanned
            self.estimated_keys = max(self.estimated_keys, self.keys_done)
            self.batch_size = event.next_batch_size
            self.last_key = event.last_key
            self.throttle_reason = event.throttle_reason
            self.next_window_start = None
            self.rate.add(now, event.rows_updated, event.keys_scanned)
        elif isinstance(event, Throttled):
            self.throttle_reason = event.reason
            self.next_window_start = event.next_window_start
            self.throttled_seconds[event.reason] = self.throttled_seconds.get(event.reason, 0.0) + max(event.seconds, 0.0)
        elif isinstance(event, ImpactObserved):
            self.impact = event
        elif isinstance(event, RunFinished):
            self.state = event.state
            self.rows_updated = event.rows_updated
            self.batches = event.batches
            self.remaining_matches = event.remaining_matches
            self.error = event.error
            self.throttle_reason = ""
            self.next_window_start = None
            self.finished_at = now

    @property
    def rows_per_second(self) -> float:
        """The recent rate while running; the average of this run once finished."""
        if self.finished_at is None or self.started_at is None:
            return self.rate.rows_per_second()
        elapsed = self.finished_at - self.started_at
        return (self.rows_updated - self.rows_at_start) / elapsed if elapsed > 0 else 0.0

    @property
    def percent(self) -> int:
        return percent(self.keys_done, self.estimated_keys, self.state == ShardState.DONE)

    @property
    def eta_seconds(self) -> float | None:
        if self.state == ShardState.DONE:
            return 0.0
        return eta_seconds(self.keys_done, self.estimated_keys, self.rate.keys_per_second())


@dataclass
class RunProgress:
    """All shards of one run: the aggregate the progress bar (and ``status.progress``) shows."""

    shards: dict[int, ShardProgress] = field(default_factory=dict)

    def apply(self, event: Event, now: float) -> ShardProgress:
        shard = self.shards.setdefault(event.shard, ShardProgress(event.shard))
        shard.apply(event, now)
        return shard

    @property
    def rows_updated(self) -> int:
        return sum(s.rows_updated for s in self.shards.values())

    @property
    def batches(self) -> int:
        return sum(s.batches for s in self.shards.values())

    @property
    def keys_done(self) -> int:
        return sum(s.keys_done for s in self.shards.values())

    @property
    def estimated_keys(self) -> int:
        return sum(s.estimated_keys for s in self.shards.values())

    @property
    def rows_per_second(self) -> float:
        return sum(s.rows_per_second for s in self.shards.values())

    @property
    def percent(self) -> int:
        done = bool(self.shards) and all(s.state == ShardState.DONE for s in self.shards.values())
        return percent(self.keys_done, self.estimated_keys, done)

    @property
    def eta_seconds(self) -> float | None:
        etas = [s.eta_seconds for s in self.shards.values() if s.state in (ShardState.RUNNING, ShardState.DONE)]
        if not etas or any(e is None for e in etas):
            return None
        return max(e for e in etas if e is not None)

    @property
    def batch_size(self) -> int:
        return max((s.batch_size for s in self.shards.values()), default=0)

    @property
    def throttle_reason(self) -> str:
        return next((s.throttle_reason for s in self.shards.values() if s.throttle_reason), "")

    @property
    def next_window_start(self) -> datetime | None:
        """The earliest next run window of the shards waiting for one."""
        return min((s.next_window_start for s in self.shards.values() if s.next_window_start), default=None)
