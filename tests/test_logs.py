"""Structured logs: every line names its backfill; no DSN or password ever reaches the stream."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import kopf
import pytest
import structlog

from backfill_worker.observe.events import (
    BatchCommitted,
    ReplicationLagObserved,
    RetryScheduled,
    RunFinished,
    RunStarted,
    Throttled,
)
from backfill_worker.observe.logs import LogListener, configure_logging, get_logger
from backfill_worker.sql.secrets import register_dsn

PASSWORD = "Pa55-w0rd-logs"
DSN = f"host=db.internal port=5432 dbname=shop user=app password={PASSWORD}"
URI = f"postgresql://app:{PASSWORD}@db.internal:5432/shop"
FIELDS = {"namespace": "shop", "name": "customers-inactive", "shard": 0}


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Configure logging onto a buffer; put the root logger and structlog back afterwards."""
    root, access = logging.getLogger(), logging.getLogger("aiohttp.access")
    saved_handlers, saved_level, saved_access = list(root.handlers), root.level, access.level
    saved_structlog = structlog.get_config()
    buffer = io.StringIO()
    try:
        yield buffer
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        access.setLevel(saved_access)
        structlog.configure(**saved_structlog)


def json_lines(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_the_backfill_and_never_the_password(stream):
    register_dsn(DSN)
    configure_logging("json", "DEBUG", fields=FIELDS, stream=stream)
    log = get_logger("backfill.test")
    log.info("connecting", dsn=DSN, target="app@db.internal:5432/shop")
    log.warning("retrying", error=f"connection to {URI} failed", nested={"dsn": [DSN]})
    logging.getLogger("psycopg.pool").error("could not connect with %s", DSN)
    try:
        raise ConnectionError(f"server closed the connection: {DSN}")
    except ConnectionError:
        log.exception("connection lost")

    text = stream.getvalue()
    lines = json_lines(stream)
    assert len(lines) == 4
    for line in lines:
        assert (line["namespace"], line["name"], line["shard"]) == ("shop", "customers-inactive", 0)
        assert {"timestamp", "level", "event", "logger"} <= line.keys()
    assert PASSWORD not in text and DSN not in text
    assert lines[0]["target"] == "app@db.internal:5432/shop"  # non-secret context survives
    assert lines[2]["logger"] == "psycopg.pool" and lines[2]["level"] == "error"
    assert "ConnectionError" in lines[3]["exception"]


def test_unregistered_dsn_shaped_passwords_are_masked_too(stream):
    configure_logging("json", fields=FIELDS, stream=stream)
    get_logger().info("oops", detail="postgres://u:unregistered-pw@h/db password='quoted pw'")
    assert "unregistered-pw" not in stream.getvalue() and "quoted pw" not in stream.getvalue()


def test_text_format_is_one_readable_line_per_event(stream):
    register_dsn(DSN)
    configure_logging("text", fields=FIELDS, stream=stream)
    get_logger().info("run started", dsn=DSN)
    (line,) = stream.getvalue().splitlines()
    assert "run started" in line and "namespace=shop" in line and "name=customers-inactive" in line
    assert PASSWORD not in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_level_filters_and_reconfiguring_does_not_duplicate_lines(stream):
    configure_logging("json", "WARNING", fields=FIELDS, stream=stream)
    configure_logging("json", "WARNING", fields=FIELDS, stream=stream)
    get_logger().info("hidden")
    get_logger().warning("shown")
    assert [line["event"] for line in json_lines(stream)] == ["shown"]


def test_kopf_object_references_become_namespace_and_name(stream):
    configure_logging("json", stream=stream)
    logging.getLogger("kopf.objects").info(
        "Handler succeeded.",
        extra={"k8s_ref": {"namespace": "billing", "name": "fix-totals", "uid": "u1"}, "k8s_skip": False,
               # A real settings object: kopf's own K8sPoster handler, left on "kopf.objects" by the
               # operator tests earlier in the session, reads settings.posting.level.
               "settings": kopf.OperatorSettings(), "attempt": 2},
    )
    (line,) = json_lines(stream)
    assert (line["namespace"], line["name"]) == ("billing", "fix-totals")
    assert not {"k8s_ref", "k8s_skip", "settings"} & line.keys()  # kopf internals stay out of the line
    assert line["attempt"] == 2  # other extras are kept
    logging.getLogger("aiohttp.access").info('127.0.0.1 "GET /healthz HTTP/1.1" 200')  # liveness probes
    assert len(json_lines(stream)) == 1


def test_unknown_format_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="text, json"):
        configure_logging("yaml")  # type: ignore[arg-type]


def test_listener_logs_the_run_and_rate_limits_batch_lines(stream):
    register_dsn(DSN)
    configure_logging("json", "INFO", fields={}, stream=stream)
    now = [0.0]
    listener = LogListener(progress_interval=10.0, clock=lambda: now[0])
    identity = "shop/customers-inactive"
    listener(RunStarted(identity, 0, 1, resumed=True, rows_updated=100, estimated_keys=1000, keys_done=100))
    for number in range(1, 21):
        now[0] += 1.0  # one batch a second: 20 batches -> 2 progress lines at a 10 s interval
        listener(BatchCommitted(identity, 0, number, 10, 10, 10, 10, 0.01, (str(number),), 100 + 10 * number, number))
    listener(Throttled(identity, 0, "pause", 0.5))
    listener(Throttled(identity, 0, "replicationLag", 2.0))
    listener(ReplicationLagObserved(identity, 0, 12.0))
    listener(RetryScheduled(identity, 0, "connection", 1, 0.5, 5, f"could not connect: {DSN}"))
    listener(RunFinished(identity, 0, "failed", 300, 20, error="gave up"))

    lines = json_lines(stream)
    events = [line["event"] for line in lines]
    assert events == ["run resumed", "progress", "progress", "throttled", "batch failed, retrying", "run failed"]
    assert all(line["namespace"] == "shop" and line["name"] == "customers-inactive" for line in lines)
    assert lines[2]["total_rows_updated"] == 300 and lines[2]["last_key"] == ["20"]
    assert lines[3]["reason"] == "replicationLag"
    assert lines[4]["level"] == "warning" and lines[4]["error_kind"] == "connection"
    assert lines[5]["level"] == "error" and lines[5]["error"] == "gave up"
    assert PASSWORD not in stream.getvalue()
