"""Structured logs for the worker and the operator: text or JSON, one line per event.

Every line carries the backfill's ``namespace`` and ``name`` (and the ``shard`` for a worker),
so a log pipeline can filter one backfill out of many pods. Both structlog loggers and plain
stdlib loggers (kopf, psycopg, kubernetes) end in the same handler, and the rendered line is
passed through :data:`backfill_worker.sql.secrets.REDACTOR` last, so a DSN or password that slipped
into any message, field or traceback is masked before it is written.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from backfill_api.status import ShardState, ThrottleReason
from backfill_worker.observe.events import (
    BatchCommitted,
    Event,
    ImpactObserved,
    ReplicationLagObserved,
    RetryScheduled,
    RunFinished,
    RunStarted,
    Throttled,
)
from backfill_worker.sql.secrets import REDACTOR

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

# Process-wide fields added to every line. A worker process serves exactly one backfill and
# shard, so a global is simpler and more robust than contextvars (threads don't inherit those).
_STATIC_FIELDS: dict[str, Any] = {}


def scrub(text: str) -> str:
    """Mask registered secrets and DSN-shaped passwords, through the shared REDACTOR filter."""
    record = logging.LogRecord("backfill", logging.INFO, __file__, 0, text, None, None)
    REDACTOR.filter(record)
    return str(record.msg)


def _add_static_fields(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    for key, value in _STATIC_FIELDS.items():
        event.setdefault(key, value)
    return event


def _lift_kopf_object(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    # kopf's per-object loggers put the object's reference into the record as ``k8s_ref``:
    # surface its namespace/name so operator lines are filterable like worker lines.
    record = event.get("_record")
    ref = getattr(record, "k8s_ref", None) if record is not None else None
    if isinstance(ref, Mapping):
        if ref.get("namespace"):
            event.setdefault("namespace", ref["namespace"])
        if ref.get("name"):
            event.setdefault("name", ref["name"])
    return event


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {k: _scrub_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub_value(v) for v in value]
    return value


_LEADING_KEYS = ("timestamp", "level", "logger", "namespace", "name", "shard", "event")


def _scrub_fields(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    # Field by field before rendering, so JSON escaping cannot hide a secret from the scrubber.
    # Leading keys first: a JSON line reads "when, how bad, which backfill, what" left to right.
    ordered = {key: event[key] for key in _LEADING_KEYS if key in event}
    ordered.update(event)
    return {key: _scrub_value(value) for key, value in ordered.items()}


# kopf's per-object loggers pass these as ``extra``: the reference is lifted into namespace/name
# above, and the settings object would only add a large repr to every line.
_KOPF_EXTRAS = ("k8s_ref", "k8s_skip", "settings")


def _drop_kopf_extras(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    for key in _KOPF_EXTRAS:
        event.pop(key, None)
    return event


class _Redacting:
    """Wraps the final renderer: whatever it produced is scrubbed before it reaches the stream."""

    def __init__(self, renderer: Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: WrappedLogger, method: str, event: EventDict) -> str:
        rendered = self._renderer(logger, method, event)
        return scrub(rendered if isinstance(rendered, str) else str(rendered))


def _renderer(log_format: LogFormat) -> Processor:
    if log_format == "json":
        return structlog.processors.JSONRenderer(sort_keys=False)
    return structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        _add_static_fields,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


class _BackfillHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` installs (and replaces when called again)."""


def configure_logging(
    log_format: LogFormat = "text",
    level: str | int = "INFO",
    *,
    fields: Mapping[str, Any] | None = None,
    stream: TextIO | None = None,
) -> None:
    """Route structlog and stdlib logging to one redacting handler on ``stream`` (stderr).

    ``fields`` (e.g. ``{"namespace": "shop", "name": "customers-inactive", "shard": 0}``) are
    added to every line. Calling it again replaces the previous configuration.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    _STATIC_FIELDS.clear()
    _STATIC_FIELDS.update({k: v for k, v in (fields or {}).items() if v is not None})

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), _lift_kopf_object, structlog.stdlib.ExtraAdder(), _drop_kopf_extras],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _scrub_fields,
            _Redacting(_renderer(log_format)),
        ],
    )
    handler = _BackfillHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _BackfillHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    # kopf's liveness endpoint is aiohttp: one access line per kubelet probe is noise, not news.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

    structlog.configure(
        processors=[*_shared_processors(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def bind_fields(**fields: Any) -> None:
    """Add fields to every following line of this process (e.g. once the backfill is known)."""
    _STATIC_FIELDS.update({k: v for k, v in fields.items() if v is not None})


def bind_backfill(identity: str, shard: int | None = None) -> None:
    """Put ``namespace``/``name`` (from ``namespace/name``) and the shard on every line."""
    bind_fields(**_identity_fields(identity), shard=shard)


def get_logger(name: str = "backfill") -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)


def _identity_fields(identity: str) -> dict[str, str]:
    namespace, _, name = identity.rpartition("/")
    return {"namespace": namespace or "default", "name": name}


class LogListener:
    """Engine listener that logs events: lifecycle and retries always, batches at a bounded rate.

    Every batch is logged at DEBUG; at INFO a progress line appears at most every
    ``progress_interval`` seconds, so a million-batch run does not flood the log.
    """

    def __init__(
        self,
        logger: structlog.stdlib.BoundLogger | None = None,
        *,
        progress_interval: float = 10.0,
        clock: Any = time.monotonic,
    ) -> None:
        self._log = logger or get_logger("backfill.engine")
        self._interval = progress_interval
        self._clock = clock
        self._last_progress: float | None = None

    def __call__(self, event: Event) -> None:
        try:
            self._handle(event)
        except Exception:  # a listener must never break the run
            logging.getLogger(__name__).exception("log listener failed")

    def _handle(self, event: Event) -> None:
        log = self._log.bind(**_identity_fields(event.identity), shard=event.shard)
        if isinstance(event, RunStarted):
            log.info(
                "run resumed" if event.resumed else "run started",
                shards=event.shard_count, rows_updated=event.rows_updated,
                estimated_keys=event.estimated_keys, keys_done=event.keys_done,
            )
            self._last_progress = self._clock()
        elif isinstance(event, BatchCommitted):
            fields = dict(
                batch=event.batch_number, rows=event.rows_updated, keys=event.keys_scanned,
                batch_size=event.batch_size, next_batch_size=event.next_batch_size,
                duration_ms=round(event.duration_seconds * 1000, 1), last_key=list(event.last_key),
                total_rows_updated=event.total_rows_updated, total_batches=event.total_batches,
            )
            now = self._clock()
            if self._last_progress is None or now - self._last_progress >= self._interval:
                self._last_progress = now
                log.info("progress", **fields)
            else:
                log.debug("batch committed", **fields)
        elif isinstance(event, Throttled):
            # Pauses happen after every batch when configured: routine, so DEBUG. The others
            # mean the database (or the rate limit) is holding the run back: worth an INFO.
            # The WAL-rate bound paces every batch when it binds: routine as well.
            level = log.debug if event.reason in (ThrottleReason.PAUSE, ThrottleReason.APPLICATION_IMPACT, ThrottleReason.WAL_RATE) else log.info
            extra = {"next_window_start": event.next_window_start.isoformat()} if event.next_window_start else {}
            level("throttled", reason=event.reason, seconds=round(event.seconds, 3), **extra)
        elif isinstance(event, ReplicationLagObserved):
            log.debug("replication lag", lag_seconds=event.lag_seconds)
        elif isinstance(event, ImpactObserved):
            log.debug(
                "application impact", summary=event.summary, duty=round(event.duty, 3),
                pressure=round(event.pressure, 2), limited_by=event.limited_by,
                pause_ms=round(event.pause_seconds * 1000, 1), lock_waiters=event.lock_waiters,
                lock_yields=event.lock_yields,
            )
        elif isinstance(event, RetryScheduled):
            log.warning(
                "batch failed, retrying", error_kind=event.error_kind, attempt=event.attempt,
                delay_seconds=round(event.delay_seconds, 3), next_batch_size=event.next_batch_size,
                error=event.message,
            )
        elif isinstance(event, RunFinished):
            fields = dict(
                state=event.state, rows_updated=event.rows_updated, batches=event.batches,
                remaining_matches=event.remaining_matches,
            )
            if event.state == ShardState.FAILED:
                log.error("run failed", error=event.error, **fields)
            else:
                log.info("run finished" if event.state == ShardState.DONE else f"run {event.state}", **fields)
