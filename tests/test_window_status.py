"""A run paused by a window or a health throttle, as the status, the operator and the metrics see it:
still Running (never stalled or failed), ``throttleReason`` and ``nextWindowStart`` shown, time
waited accounted, and schedule edits applied live by the in-cluster worker."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from backfill_api.crd import PRINTER_COLUMNS
from backfill_api.model import BackfillSpec
from backfill_api.status import Phase, ShardStatus, ThrottleReason, aggregate_progress
from backfill_operator import jobs
from backfill_operator.reconcile import Observed, reconcile
from backfill_worker.kube.worker import KubeControl, shard_status
from backfill_worker.observe.events import BatchCommitted, HealthObserved, RunFinished, RunStarted, Throttled
from backfill_worker.observe.run_progress import ShardProgress
from backfill_worker.observe.worker_metrics import WorkerMetrics

UID = "0f0e0d0c-1111-2222-3333-444455556666"
SPEC: dict[str, Any] = {
    "database": {"dsnSecretRef": {"name": "db", "key": "dsn"}}, "table": "items", "set": {"n": "n + 1"},
    "schedule": {"timeZone": "Europe/Berlin", "windows": [{"start": "22:00", "end": "06:00"}]},
}
OPENS = datetime(2026, 11, 28, 21, 0, tzinfo=UTC)
IDENTITY = "ns/bf"


def batch(reason: str = "") -> BatchCommitted:
    return BatchCommitted(IDENTITY, 0, 1, 10, 10, 10, 10, 0.01, ("10",), 10, 1, throttle_reason=reason)


def waiting_progress() -> ShardProgress:
    progress = ShardProgress(0)
    progress.apply(RunStarted(IDENTITY, 0, 1, False, 0, 100, 0), 0.0)
    progress.apply(batch(), 1.0)
    progress.apply(Throttled(IDENTITY, 0, ThrottleReason.WINDOW, 30.0, OPENS), 2.0)
    progress.apply(Throttled(IDENTITY, 0, ThrottleReason.WINDOW, 30.0, OPENS), 32.0)
    return progress


def test_shard_status_shows_the_window_wait_and_the_time_waited() -> None:
    report = shard_status(waiting_progress(), run=1)
    assert report.throttle_reason == "window"
    assert report.next_window_start == "2026-11-28T21:00:00Z"
    assert report.throttled_seconds == {"window": 60.0}
    progress = waiting_progress()
    progress.apply(batch(ThrottleReason.WINDOW), 40.0)  # the window opened: the next batch ran
    progress.apply(Throttled(IDENTITY, 0, ThrottleReason.HEALTH_QUERY, 1.0), 41.0)
    again = shard_status(progress, run=1)
    assert again.next_window_start is None and again.throttle_reason == "healthQuery"
    assert again.throttled_seconds == {"healthQuery": 1.0, "window": 60.0}
    progress.apply(RunFinished(IDENTITY, 0, "done", 10, 1), 50.0)
    assert shard_status(progress, run=1).throttle_reason == ""


def test_progress_carries_the_earliest_next_window_of_running_shards() -> None:
    shards = {
        "0": ShardStatus(state="running", throttle_reason="window", next_window_start="2026-11-28T21:00:00Z"),
        "1": ShardStatus(state="running", throttle_reason="window", next_window_start="2026-11-28T20:00:00Z"),
        "2": ShardStatus(state="done", next_window_start="2026-11-28T19:00:00Z"),  # not running: ignored
    }
    progress = aggregate_progress(shards, 3)
    assert progress.next_window_start == "2026-11-28T20:00:00Z" and progress.throttle_reason == "window"
    running = aggregate_progress({"0": ShardStatus(state="running")}, 1)
    assert running.to_wire()["nextWindowStart"] is None  # sent as a deletion once inside again


def observed(status: dict[str, Any], now: str) -> Observed:
    rendered = jobs.render_job(name="bf", namespace="ns", uid=UID, spec=BackfillSpec.model_validate(SPEC), shard=0, run=1)
    rendered["status"] = {"active": 1}
    return Observed(name="bf", namespace="ns", uid=UID, generation=1, raw_spec=SPEC, annotations={},
                    status=status, jobs=[rendered], now=now)


def test_operator_keeps_a_window_paused_run_running_and_says_when_it_resumes() -> None:
    report = shard_status(waiting_progress(), run=1).to_wire()
    report["updatedAt"] = "2026-11-28T12:00:00Z"  # the worker's heartbeat (every wait is reported)
    status = {"phase": "Running", "run": 1, "shards": {"0": report}}
    plan = reconcile(observed(status, now="2026-11-28T12:00:20Z"))
    assert plan.status["phase"] == Phase.RUNNING
    stalled = next(c for c in plan.status["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "False"
    assert "outside the run window (spec.schedule): the next opens at 2026-11-28T21:00:00Z" in plan.status["message"]
    assert plan.status["progress"]["throttleReason"] == "window"
    assert plan.status["progress"]["nextWindowStart"] == "2026-11-28T21:00:00Z"
    assert not plan.create_jobs and not plan.delete_jobs


def test_printer_columns_show_throttle_and_next_window_in_wide_output() -> None:
    columns = {c["name"]: c for c in PRINTER_COLUMNS}
    assert columns["Throttle"]["jsonPath"] == ".status.progress.throttleReason" and columns["Throttle"]["priority"] == 1
    assert columns["Next-Window"]["jsonPath"] == ".status.progress.nextWindowStart"
    assert columns["Next-Window"]["priority"] == 1


def test_kube_control_applies_schedule_edits_live() -> None:
    control = KubeControl(api=None, namespace="ns", name="bf", uid="u1")  # type: ignore[arg-type]  (no polling)
    control.observe({"metadata": {"uid": "u1"}, "spec": SPEC})
    tuning = control.tuning()
    assert tuning is not None and tuning.schedule is not None and tuning.schedule.time_zone == "Europe/Berlin"
    control.observe({"metadata": {"uid": "u1"}, "spec": {**SPEC, "schedule": {"timeZone": "Nowhere/Else", "windows": []}}})
    kept = control.tuning()
    assert kept is not None and kept.schedule == tuning.schedule  # invalid edit: the last good tuning stays
    control.observe({"metadata": {"uid": "u1"}, "spec": {k: v for k, v in SPEC.items() if k != "schedule"}})
    removed = control.tuning()
    assert removed is not None and removed.schedule is None
    assert control.stop_reason() is None


def test_schedule_and_health_limits_are_not_part_of_the_fingerprint() -> None:
    base = BackfillSpec.model_validate({k: v for k, v in SPEC.items() if k != "schedule"})
    tuned = BackfillSpec.model_validate({**SPEC, "limits": {"health": {"query": "SELECT false"}, "maxWalBytesPerSecond": 5}})
    assert base.fingerprint() == tuned.fingerprint()


def test_metrics_export_throttle_state_health_looks_and_next_window() -> None:
    metrics = WorkerMetrics(process_metrics=False)
    labels = {"namespace": "ns", "name": "bf", "shard": "0"}
    metrics(Throttled(IDENTITY, 0, ThrottleReason.WINDOW, 30.0, OPENS))
    get = metrics.registry.get_sample_value
    assert get("backfill_throttled", {**labels, "reason": "window"}) == 1.0
    assert get("backfill_throttled", {**labels, "reason": "healthQuery"}) == 0.0
    assert get("backfill_throttled_seconds_total", {**labels, "reason": "window"}) == 30.0
    assert get("backfill_next_window_start_timestamp_seconds", labels) == OPENS.timestamp()
    metrics(HealthObserved(IDENTITY, 0, wal_bytes_per_second=1234.0, active_backends=3, lock_waits=None, query_value=1.0))
    assert get("backfill_health_wal_bytes_per_second", labels) == 1234.0
    assert get("backfill_health_active_backends", labels) == 3.0
    assert get("backfill_health_query_value", labels) == 1.0
    assert get("backfill_health_lock_waits", labels) is None  # never measured: no series
    metrics(batch(ThrottleReason.WINDOW))
    assert get("backfill_throttled", {**labels, "reason": "window"}) == 0.0
    next_start = get("backfill_next_window_start_timestamp_seconds", labels)
    assert next_start is not None and math.isnan(next_start)  # inside a window now
    other = {"namespace": "ns", "name": "plain", "shard": "0"}
    metrics(Throttled("ns/plain", 0, ThrottleReason.PAUSE, 0.1))
    assert get("backfill_next_window_start_timestamp_seconds", other) is None  # no schedule: no series


def test_run_progress_shows_the_earliest_next_window_and_clears_it_when_running() -> None:
    from backfill_worker.observe.run_progress import RunProgress

    run = RunProgress()
    run.apply(Throttled(IDENTITY, 0, ThrottleReason.WINDOW, 30.0, OPENS), 0.0)
    run.apply(Throttled(IDENTITY, 1, ThrottleReason.WINDOW, 30.0, OPENS.replace(hour=20)), 0.0)
    assert run.next_window_start == OPENS.replace(hour=20) and run.throttle_reason == "window"
    run.apply(batch(ThrottleReason.WINDOW), 1.0)
    run.apply(BatchCommitted(IDENTITY, 1, 1, 10, 10, 10, 10, 0.01, ("20",), 10, 1), 1.0)
    assert run.next_window_start is None


def test_crd_gives_schedule_no_default_so_an_omitted_one_stays_absent() -> None:
    from backfill_api.crd import spec_schema

    properties = spec_schema()["properties"]
    # A `default: {}` would make the API server reject the CRD (windows is required) or fill in
    # an invalid schedule; the other sections keep theirs so their nested defaults show.
    assert "default" not in properties["schedule"] and properties["schedule"]["required"] == ["windows"]
    assert properties["limits"]["default"] == {}
    assert "default" not in properties["limits"]["properties"]["health"]
