"""Prometheus metrics of a worker, fed by engine events; ``start_process_metrics(port)`` exposes ``/metrics``.

Every series carries ``namespace``, ``name`` (of the Backfill) and ``shard`` labels, taken from the
event's identity (``namespace/name``), never from anything that could hold a secret.

| metric | type | labels | meaning |
|---|---|---|---|
| ``backfill_rows_updated_total`` | counter | | rows changed by committed batches (this process) |
| ``backfill_keys_scanned_total`` | counter | | keys covered by committed batches |
| ``backfill_batches_total`` | counter | | committed batches |
| ``backfill_batch_duration_seconds`` | histogram | | time each batch's write transaction was open |
| ``backfill_batch_size`` | gauge | | batch size the next batch is planned with |
| ``backfill_throttled_seconds_total`` | counter | ``reason`` | time spent waiting, by ``throttleReason`` (pause, window, healthQuery, ...) |
| ``backfill_replication_lag_seconds`` | gauge | | largest replica replay lag last seen (NaN: no replicas) |
| ``backfill_retries_total`` | counter | ``kind`` | failed batch attempts by cause (lockTimeout, deadlock, ...) |
| ``backfill_progress_ratio`` | gauge | | estimated fraction of the shard's keys done, 0..1 |
| ``backfill_shard_state`` | gauge | ``state`` | 1 for the shard's current state (running, done, paused, failed) |
| ``backfill_app_impact_duty_ratio`` | gauge | | application-impact throttle: fraction of time the shard may spend in batches |
| ``backfill_app_impact_pressure`` | gauge | | largest application signal relative to its budget (1 = at the budget) |
| ``backfill_app_impact_pause_seconds`` | gauge | | pause the throttle wants after each batch |
| ``backfill_app_throughput_ratio`` | gauge | | other sessions' write rate over their rate without the backfill (NaN: idle baseline) |
| ``backfill_app_lock_waiters`` | gauge | | most sessions seen waiting for the backfill's row locks in the last window |
| ``backfill_app_active_sessions`` | gauge | | mean number of other sessions running a statement |
| ``backfill_wal_bytes_per_second`` | gauge | | server-wide WAL rate over the last window |
| ``backfill_throttled`` | gauge | ``reason`` | 1 while the shard waits for this reason (``window``, ``healthQuery``, ...), else 0 |
| ``backfill_health_wal_bytes_per_second`` | gauge | | health throttles: server-wide WAL rate between the last two looks |
| ``backfill_health_active_backends`` | gauge | | other client sessions not idle, last look |
| ``backfill_health_lock_waits`` | gauge | | other sessions waiting for a lock, last look |
| ``backfill_health_query_value`` | gauge | | ``spec.limits.health.query``'s last value (a boolean as 0/1) |
| ``backfill_next_window_start_timestamp_seconds`` | gauge | | outside ``spec.schedule``: when the next window opens (Unix time; NaN inside) |
"""

from __future__ import annotations

import logging
import math

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from backfill_api.serving import MetricsServer, serve
from backfill_api.status import ShardState, ThrottleReason
from backfill_worker.observe.events import (
    BatchCommitted,
    Event,
    HealthObserved,
    ImpactObserved,
    ReplicationLagObserved,
    RetryScheduled,
    RunFinished,
    RunStarted,
    Throttled,
)

LABELS = ("namespace", "name", "shard")
SHARD_STATES = tuple(state.value for state in ShardState if state is not ShardState.PENDING)
# Batches aim at ~200 ms (spec.batch.targetDuration); buckets resolve 5 ms .. 30 s around it.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

log = logging.getLogger(__name__)


class WorkerMetrics:
    """The worker's metric families in their own registry (tests and several runs stay apart)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if process_metrics:  # process_cpu_seconds_total, process_resident_memory_bytes, python_info
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.rows_updated = Counter("backfill_rows_updated", "Rows changed by committed batches.", LABELS, registry=r)
        self.keys_scanned = Counter("backfill_keys_scanned", "Keys covered by committed batches.", LABELS, registry=r)
        self.batches = Counter("backfill_batches", "Committed batches.", LABELS, registry=r)
        self.batch_duration = Histogram(
            "backfill_batch_duration_seconds", "Time each batch's write transaction was open.",
            LABELS, buckets=DURATION_BUCKETS, registry=r,
        )
        self.batch_size = Gauge("backfill_batch_size", "Batch size the next batch is planned with.", LABELS, registry=r)
        self.throttled = Counter(
            "backfill_throttled_seconds", "Seconds spent throttled, by reason.", (*LABELS, "reason"), registry=r,
        )
        self.replication_lag = Gauge(
            "backfill_replication_lag_seconds", "Largest replica replay lag last seen (NaN when no replicas).",
            LABELS, registry=r,
        )
        self.retries = Counter("backfill_retries", "Failed batch attempts, by cause.", (*LABELS, "kind"), registry=r)
        self.progress = Gauge("backfill_progress_ratio", "Estimated fraction of the shard's keys done.", LABELS, registry=r)
        self.state = Gauge("backfill_shard_state", "1 for the shard's current state.", (*LABELS, "state"), registry=r)
        impact = {
            "duty": ("backfill_app_impact_duty_ratio", "Fraction of time the shard may spend in batches (applicationImpact)."),
            "pressure": ("backfill_app_impact_pressure", "Largest application signal relative to its budget (1 = at it)."),
            "pause": ("backfill_app_impact_pause_seconds", "Pause the application-impact throttle wants after each batch."),
            "throughput": ("backfill_app_throughput_ratio", "Other sessions' write rate over their rate without the backfill."),
            "lock_waiters": ("backfill_app_lock_waiters", "Most sessions seen waiting for the backfill's row locks."),
            "active": ("backfill_app_active_sessions", "Mean number of other sessions running a statement."),
            "wal": ("backfill_wal_bytes_per_second", "Server-wide WAL bytes per second over the last window."),
        }
        self.impact = {key: Gauge(name, doc, LABELS, registry=r) for key, (name, doc) in impact.items()}
        self.throttled_now = Gauge(
            "backfill_throttled", "1 while the shard waits for this reason, else 0.", (*LABELS, "reason"), registry=r,
        )
        health = {
            "wal": ("backfill_health_wal_bytes_per_second", "Server-wide WAL bytes per second between the last two health looks."),
            "backends": ("backfill_health_active_backends", "Other client sessions not idle, at the last health look."),
            "lock_waits": ("backfill_health_lock_waits", "Other sessions waiting for a lock, at the last health look."),
            "query": ("backfill_health_query_value", "The health query's last value (a boolean as 0/1)."),
        }
        self.health = {key: Gauge(name, doc, LABELS, registry=r) for key, (name, doc) in health.items()}
        self.next_window_start = Gauge(
            "backfill_next_window_start_timestamp_seconds", "When the next run window opens (NaN inside one).",
            LABELS, registry=r,
        )
        self._windowed: set[tuple[str, str, str]] = set()
        """Shards that waited for a run window (only they get the next-window series)."""
        self._estimated_keys: dict[tuple[str, str, str], int] = {}
        self._keys_done: dict[tuple[str, str, str], int] = {}

    def __call__(self, event: Event) -> None:
        """Engine listener: never raises (a metrics bug must not stop a backfill)."""
        try:
            self._observe(event)
        except Exception:
            log.exception("metrics listener failed on %s", type(event).__name__)

    def _observe(self, event: Event) -> None:
        namespace, _, name = event.identity.rpartition("/")
        labels = (namespace or "default", name, str(event.shard))
        if isinstance(event, RunStarted):
            self._estimated_keys[labels] = event.estimated_keys
            self._keys_done[labels] = event.keys_done
            self._set_progress(labels)
            self._set_state(labels, ShardState.RUNNING)
        elif isinstance(event, BatchCommitted):
            self.rows_updated.labels(*labels).inc(event.rows_updated)
            self.keys_scanned.labels(*labels).inc(event.keys_scanned)
            self.batches.labels(*labels).inc()
            self.batch_duration.labels(*labels).observe(event.duration_seconds)
            self.batch_size.labels(*labels).set(event.next_batch_size)
            self._set_throttled(labels, "")
            if labels in self._windowed:  # running again: inside a window
                self.next_window_start.labels(*labels).set(math.nan)
            self._keys_done[labels] = self._keys_done.get(labels, 0) + event.keys_scanned
            self._set_progress(labels)
        elif isinstance(event, Throttled):
            self.throttled.labels(*labels, event.reason).inc(max(event.seconds, 0.0))
            self._set_throttled(labels, event.reason)
            start = event.next_window_start
            if start is not None or labels in self._windowed:
                self._windowed.add(labels)
                self.next_window_start.labels(*labels).set(start.timestamp() if start is not None else math.nan)
        elif isinstance(event, HealthObserved):
            looked: dict[str, float | None] = {
                "wal": event.wal_bytes_per_second, "backends": event.active_backends,
                "lock_waits": event.lock_waits, "query": event.query_value,
            }
            for key, measured in looked.items():
                if measured is not None:  # not measured at this look: keep the last value
                    self.health[key].labels(*labels).set(measured)
        elif isinstance(event, ReplicationLagObserved):
            lag = math.nan if event.lag_seconds is None else event.lag_seconds
            self.replication_lag.labels(*labels).set(lag)
        elif isinstance(event, ImpactObserved):
            values = {
                "duty": event.duty, "pressure": event.pressure, "pause": event.pause_seconds,
                "throughput": math.nan if event.throughput_ratio is None else event.throughput_ratio,
                "lock_waiters": event.lock_waiters, "active": event.active_sessions, "wal": event.wal_bytes_per_second,
            }
            for key, value in values.items():
                self.impact[key].labels(*labels).set(value)
        elif isinstance(event, RetryScheduled):
            self.retries.labels(*labels, event.error_kind).inc()
            self.batch_size.labels(*labels).set(event.next_batch_size)
        elif isinstance(event, RunFinished):
            self._set_state(labels, event.state)
            self._set_throttled(labels, "")
            if event.state == ShardState.DONE:
                self.progress.labels(*labels).set(1.0)

    def _set_progress(self, labels: tuple[str, str, str]) -> None:
        estimated = self._estimated_keys.get(labels, 0)
        if estimated > 0:
            self.progress.labels(*labels).set(min(self._keys_done.get(labels, 0) / estimated, 1.0))

    def _set_throttled(self, labels: tuple[str, str, str], current: str) -> None:
        """One series per reason, 1 for the reason waited on now ("" = none)."""
        for reason in ThrottleReason:
            self.throttled_now.labels(*labels, reason.value).set(1.0 if reason.value == current else 0.0)

    def _set_state(self, labels: tuple[str, str, str], current: str) -> None:
        for state in SHARD_STATES:
            self.state.labels(*labels, state).set(1.0 if state == current else 0.0)


# -- process-wide worker metrics (the CLI's ``--metrics-port``) ----------------------------------

_PROCESS: WorkerMetrics | None = None
_SERVER: MetricsServer | None = None


def start_process_metrics(port: int, addr: str = "0.0.0.0") -> WorkerMetrics:
    """Serve this process's worker metrics on ``port`` (once; later calls return the same)."""
    global _PROCESS, _SERVER
    if _PROCESS is None:
        _PROCESS = WorkerMetrics()
        _SERVER = serve(port, _PROCESS.registry, addr=addr)
    return _PROCESS


def process_listener() -> WorkerMetrics | None:
    """The engine listener to add to a run when ``--metrics-port`` was given, else None."""
    return _PROCESS
