"""``backfill worker``: one shard of a Backfill, in-cluster.

Reads its Backfill from the API (the change itself from the operator's ``applied-spec``
annotation, so an edited immutable field never changes a running backfill), runs the engine on
its shard, and:

* steers the engine through a :class:`KubeControl` that polls the spec every ~2 s:
  ``spec.suspend`` stops at the next batch boundary, ``spec.batch``/``spec.limits`` re-tune live;
* mirrors progress into ``status.shards.<shard>`` (and ``status.progress`` when it is the only
  shard) through a :class:`StatusReporter`: at most one merge patch per interval, plus a final one.

The database checkpoint stays the source of truth; the status is its mirror. In
``checkpoint.mode: atLeastOnce`` the status *is* the progress store (:class:`StatusProgressStore`).
Exit codes: 0 done or paused (suspend, SIGTERM), otherwise the error's documented code.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from backfill_api.errors import AlreadyRunning, BackfillError, ManifestError
from backfill_api.kubeapi import KubeApi, KubeApiError, backfill_path
from backfill_api.manifest import parse_backfill
from backfill_api.model import (
    API_GROUP,
    API_VERSION,
    KIND,
    Backfill,
    BatchSpec,
    CheckpointMode,
    LimitsSpec,
    ScheduleSpec,
)
from backfill_api.specdiff import decode_applied, effective_spec
from backfill_api.status import (
    BackfillStatus,
    EstimateStatus,
    ImpactStatus,
    ShardState,
    ShardStatus,
    aggregate_progress,
    for_merge_patch,
)
from backfill_worker.checkpoints.checkpoint import ShardCheckpoint
from backfill_worker.observe.events import Event, ImpactObserved, RunFinished, Tuning
from backfill_worker.observe.run_progress import ShardProgress
from backfill_worker.run.engine import run_backfill
from backfill_worker.run.signals import stop_on_signals
from backfill_worker.sql.secrets import redact, secrets_of

if TYPE_CHECKING:
    from backfill_worker.plan.planner import Plan

log = logging.getLogger("backfill.worker")

POLL_SECONDS = 2.0
PATCH_INTERVAL_SECONDS = 2.0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rfc3339(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if moment is not None else None


def load_backfill(api: KubeApi, namespace: str, name: str) -> tuple[Backfill, dict[str, Any]]:
    """The Backfill as the worker must run it, and the raw object it came from."""
    obj = api.get(backfill_path(namespace, name))
    meta = obj.get("metadata") or {}
    spec = effective_spec(obj.get("spec") or {}, decode_applied(meta.get("annotations")))
    document = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "generation") if k in meta},
        "spec": spec,
    }
    return parse_backfill(document, source=f"Backfill {namespace}/{name}"), obj


class KubeControl:
    """The engine's ``RunControl``, fed by a thread that polls the Backfill's spec."""

    def __init__(self, api: KubeApi, namespace: str, name: str, uid: str | None, *, poll_seconds: float = POLL_SECONDS):
        self._api, self._namespace, self._name, self._uid = api, namespace, name, uid
        self._poll = poll_seconds
        self._stop_reason: str | None = None
        self._tuning: Tuning | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backfill-spec-poller", daemon=True)

    def start(self) -> KubeControl:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()

    def request_stop(self, reason: str) -> None:
        self._stop_reason = self._stop_reason or reason

    def stop_reason(self) -> str | None:
        return self._stop_reason

    def tuning(self) -> Tuning | None:
        return self._tuning

    def observe(self, obj: Mapping[str, Any]) -> None:
        """Fold one read of the Backfill into the control (pure apart from the two fields)."""
        if self._uid and (obj.get("metadata") or {}).get("uid") not in (None, self._uid):
            self.request_stop("deleted")  # a new object of the same name: not ours to continue
            return
        spec = obj.get("spec") or {}
        if spec.get("suspend") is True:
            self.request_stop("suspended")
        try:
            schedule = spec.get("schedule")
            self._tuning = Tuning(
                batch=BatchSpec.model_validate(spec.get("batch") or {}),
                limits=LimitsSpec.model_validate(spec.get("limits") or {}),
                schedule=ScheduleSpec.model_validate(schedule) if schedule is not None else None,
            )
        except ValidationError as error:  # keep the last good tuning; the operator reports the spec
            log.warning("ignoring invalid live tuning of %s/%s: %s", self._namespace, self._name, error.error_count())

    def _run(self) -> None:
        while not self._closed.wait(self._poll):
            try:
                self.observe(self._api.get(backfill_path(self._namespace, self._name)))
            except KubeApiError as error:
                if error.status == 404:
                    self.request_stop("deleted")
                else:
                    log.warning("could not read Backfill %s/%s: %s", self._namespace, self._name, error)
            except Exception as error:  # noqa: BLE001 - network trouble: keep running, try again next poll
                log.warning("could not read Backfill %s/%s: %s", self._namespace, self._name, type(error).__name__)


def impact_status(impact: ImpactObserved) -> ImpactStatus:
    """``status.shards.<i>.impact``: what the application-impact throttle does and why (PURE)."""
    return ImpactStatus(
        summary=impact.summary,
        application_present=impact.present,
        duty_percent=round(impact.duty * 100, 1),
        pressure=round(impact.pressure, 2),
        limited_by=impact.limited_by,
        pause_ms=round(impact.pause_seconds * 1000, 1),
        batch_target_ms=round(impact.batch_target_seconds * 1000, 1),
        throughput_ratio=round(impact.throughput_ratio, 3) if impact.throughput_ratio is not None else None,
        app_transactions_per_second=round(impact.app_write_rate, 1),
        baseline_transactions_per_second=round(impact.baseline_write_rate, 1),
        active_sessions=round(impact.active_sessions, 2),
        lock_waiters=impact.lock_waiters,
        wal_bytes_per_second=round(impact.wal_bytes_per_second),
        statement_ms=round(impact.statement_ms, 3) if impact.statement_ms is not None else None,
        lock_wait_ms=round(impact.lock_wait_seconds * 1000, 1) if impact.lock_wait_seconds is not None else None,
        lock_yields=impact.lock_yields,
    )


def shard_status(
    progress: ShardProgress, *, run: int | None, error_reason: str = "", secrets: Sequence[str] = ()
) -> ShardStatus:
    """``status.shards.<i>`` from the folded events (PURE). ``None`` values delete the key (merge patch)."""
    eta = progress.eta_seconds
    running = progress.state == ShardState.RUNNING
    return ShardStatus(
        state=ShardState(progress.state),
        last_key=list(progress.last_key) if progress.last_key else None,
        rows_updated=progress.rows_updated,
        batches=progress.batches,
        batch_size=progress.batch_size,
        rows_per_second=round(progress.rate.rows_per_second(), 1) if running else 0.0,
        percent=progress.percent,
        eta_seconds=round(eta, 1) if eta is not None else None,
        estimated_keys=progress.estimated_keys,
        keys_done=progress.keys_done,
        throttle_reason=progress.throttle_reason,
        next_window_start=_rfc3339(progress.next_window_start),
        throttled_seconds={reason: round(seconds, 1) for reason, seconds in sorted(progress.throttled_seconds.items())},
        impact=impact_status(progress.impact) if progress.impact is not None else None,
        last_error=redact(progress.error, secrets) if progress.error else "",
        last_error_reason=error_reason,
        remaining_matches=progress.remaining_matches,
        updated_at=_now(),
        **({"run": run} if run is not None else {}),
    )


class StatusReporter:
    """Engine listener mirroring one shard into the Backfill's status, at a bounded rate.

    The listener only updates memory (the engine must not wait on the API); a thread sends at
    most one merge patch per ``interval`` when something changed; ``close()`` sends the last one.
    """

    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        name: str,
        shard: int,
        *,
        parallelism: int,
        run: int | None,
        secrets: list[str],
        interval: float = PATCH_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api, self._namespace, self._name, self._shard = api, namespace, name, shard
        self._parallelism, self._run, self._secrets = parallelism, run, secrets
        self._interval, self._clock = interval, clock
        self.progress = ShardProgress(shard)
        self._error_reason = ""
        self._dirty = False
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="backfill-status-reporter", daemon=True)
        self.patches_sent = 0

    def start(self) -> StatusReporter:
        self._thread.start()
        return self

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.progress.apply(event, self._clock())
            self._dirty = True

    def fail(self, error: BackfillError) -> None:
        with self._lock:
            self.progress.state = ShardState.FAILED
            self.progress.error = str(error)
            self._error_reason = error.reason
            self._dirty = True

    def _loop(self) -> None:
        while not self._closed.wait(self._interval):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            shard = shard_status(self.progress, run=self._run, error_reason=self._error_reason, secrets=self._secrets)
            self._dirty = False
        patch: dict[str, Any] = {"shards": {str(self._shard): shard.to_wire()}}
        if self._parallelism == 1:
            progress = aggregate_progress({str(self._shard): shard}, 1, succeeded=shard.state == ShardState.DONE)
            patch["progress"] = progress.to_wire()
        try:
            self._api.merge_patch(backfill_path(self._namespace, self._name, status=True), {"status": for_merge_patch(patch)})
            self.patches_sent += 1
        except Exception as error:  # noqa: BLE001 - the next flush carries the newest state anyway
            with self._lock:
                self._dirty = True
            log.warning("could not patch status of %s/%s: %s", self._namespace, self._name, type(error).__name__)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=10)
        self.flush()


class StatusProgressStore:
    """``ProgressStore`` for ``checkpoint.mode: atLeastOnce``: ``status.shards.<i>.checkpoint``.

    Saved synchronously after each committed batch (that is what bounds the replay to one batch).
    Stored as one JSON string: replaced atomically, and merge-patch ``null``s cannot drop its keys.
    """

    def __init__(self, api: KubeApi, namespace: str, name: str) -> None:
        self._api, self._namespace, self._name = api, namespace, name

    def load(self, shard: int) -> ShardCheckpoint | None:
        obj = self._api.get(backfill_path(self._namespace, self._name))
        data = BackfillStatus.parse(obj.get("status")).shard(shard).checkpoint
        return ShardCheckpoint.from_json(json.loads(data)) if data else None

    def save(self, shard: int, state: ShardCheckpoint) -> None:
        report = ShardStatus(checkpoint=json.dumps(state.to_json(), sort_keys=True))
        body = {"status": {"shards": {str(shard): report.to_wire()}}}
        self._api.merge_patch(backfill_path(self._namespace, self._name, status=True), body)


def run_worker(
    api: KubeApi,
    namespace: str,
    name: str,
    shard: int,
    dsn: str,
    *,
    run: int | None = None,
    listeners: tuple[Callable[[Event], None], ...] = (),
    poll_seconds: float = POLL_SECONDS,
    patch_interval: float = PATCH_INTERVAL_SECONDS,
) -> int:
    """Run one shard; returns the process exit code."""
    secrets = secrets_of(dsn)
    try:
        backfill, obj = load_backfill(api, namespace, name)
    except ManifestError as error:
        _report_failure(api, namespace, name, shard, run, error, secrets)
        return error.exit_code
    spec = backfill.spec
    if not 0 <= shard < spec.parallelism:
        out_of_range = ManifestError(f"Backfill {namespace}/{name}", [f"--shard {shard}: spec.parallelism is {spec.parallelism}"])
        _report_failure(api, namespace, name, shard, run, out_of_range, secrets)
        return out_of_range.exit_code
    control = KubeControl(api, namespace, name, obj.get("metadata", {}).get("uid"), poll_seconds=poll_seconds)
    control.observe(obj)
    reporter = StatusReporter(
        api, namespace, name, shard, parallelism=spec.parallelism, run=run, secrets=secrets, interval=patch_interval,
    ).start()
    store = StatusProgressStore(api, namespace, name) if spec.checkpoint.mode == CheckpointMode.AT_LEAST_ONCE else None
    control.start()
    try:
        with stop_on_signals(control):
            if spec.dry_run:
                return _dry_run(api, namespace, name, backfill, dsn, reporter)
            if shard == 0 and BackfillStatus.parse(obj.get("status")).estimate is None:
                _write_estimate_before_first_batch(api, namespace, name, backfill, dsn, secrets)
            report = run_backfill(
                backfill, dsn, shards=[shard], listeners=(reporter, *listeners), control=control, at_least_once_store=store,
            )
        log.info("shard %d of %s/%s finished: %s, %d rows", shard, namespace, name, report.state, report.rows_updated)
        return 0
    except AlreadyRunning as error:
        # Another runner owns this shard (e.g. a duplicate pod): its state is not ours to report.
        log.error("shard %d of %s/%s: %s", shard, namespace, name, redact(str(error), secrets))
        return error.exit_code
    except BackfillError as error:
        reporter.fail(error)
        log.error("shard %d of %s/%s failed: %s", shard, namespace, name, redact(str(error), secrets))
        return error.exit_code
    finally:
        control.close()
        reporter.close()


def estimate_status(plan: Plan, measured_at: str) -> EstimateStatus | None:
    """``status.estimate`` from a plan (PURE); None when the plan could not sample a batch."""
    estimate = plan.estimate
    if estimate is None:
        return None
    return EstimateStatus(
        duration=estimate.duration, seconds=round(estimate.seconds or 0.0, 1), rows=estimate.rows,
        batches=estimate.batches, wal_bytes=estimate.wal_bytes, dead_tuples=estimate.dead_tuples,
        warnings=[warning.code for warning in plan.warnings], basis=estimate.basis, measured_at=measured_at,
    )


def _patch_estimate(api: KubeApi, namespace: str, name: str, plan: Plan) -> None:
    estimate = estimate_status(plan, _now())
    if estimate is None:
        return
    body = {"status": {"estimate": estimate.model_dump(by_alias=True, mode="json", exclude_none=True)}}
    api.merge_patch(backfill_path(namespace, name, status=True), body)
    log.info("estimate for %s/%s: %s, ~%d rows, warnings: %s", namespace, name, estimate.duration or "-",
             estimate.rows, ", ".join(estimate.warnings) or "none")


def _write_estimate_before_first_batch(
    api: KubeApi, namespace: str, name: str, backfill: Backfill, dsn: str, secrets: Sequence[str]
) -> None:
    """Plan (a timed, rolled-back sample batch) and write ``status.estimate`` once per Backfill.

    Best effort: a plan that fails here leaves the run to report the same problem itself.
    """
    from backfill_worker.plan.planner import plan_backfill

    try:
        _patch_estimate(api, namespace, name, plan_backfill(backfill, dsn))
    except Exception as error:  # noqa: BLE001 - the estimate never stops the run
        log.warning("no estimate for %s/%s: %s", namespace, name, redact(str(error), list(secrets))[:300])


def _dry_run(api: KubeApi, namespace: str, name: str, backfill: Backfill, dsn: str, reporter: StatusReporter) -> int:
    """``spec.dryRun``: validate and plan (a rolled-back sample batch); change nothing; report done."""
    from backfill_worker.plan.planner import plan_backfill

    plan = plan_backfill(backfill, dsn)
    try:
        _patch_estimate(api, namespace, name, plan)
    except Exception as error:  # noqa: BLE001 - the dry run's outcome is the plan, not the patch
        log.warning("could not write the estimate of %s/%s: %s", namespace, name, type(error).__name__)
    reporter(RunFinished(backfill.identity, reporter.progress.shard, ShardState.DONE, 0, 0, remaining_matches=plan.estimated_rows_to_change))
    log.info("dry run of %s: about %d rows would change", backfill.identity, plan.estimated_rows_to_change)
    return 0


def _report_failure(api: KubeApi, namespace: str, name: str, shard: int, run: int | None, error: BackfillError, secrets: list[str]) -> None:
    progress = ShardProgress(shard, state=ShardState.FAILED, error=str(error))
    try:
        shard_patch = shard_status(progress, run=run, error_reason=error.reason, secrets=secrets).to_wire()
        body = {"status": for_merge_patch({"shards": {str(shard): shard_patch}})}
        api.merge_patch(backfill_path(namespace, name, status=True), body)
    except Exception as patch_error:  # noqa: BLE001 - best effort: the Job's own failure still reaches the operator
        log.warning("could not report the failure of %s/%s: %s", namespace, name, type(patch_error).__name__)
