"""The controller's decisions: from what is observed to what to do (PURE, no I/O).

Level-triggered: every call looks at the whole picture (Backfill, its Jobs, the shard reports)
and returns the full desired status plus the Jobs to create or delete. Running it twice in a
row, or after an operator restart, changes nothing: Job names are deterministic and an existing
Job is adopted, never duplicated.

``reconcile`` is four steps, each a small pure function: the spec's validity (``_check_spec``),
each shard's view (``view_shards``), the phase with its Job plan (``_decide``), then the status
(``_status``) and the events (``events_for``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from backfill_api.conditions import merge_conditions
from backfill_api.manifest import describe_validation_error
from backfill_api.model import BackfillSpec
from backfill_api.specdiff import (
    APPLIED_SPEC_ANNOTATION,
    changed_fields,
    decode_applied,
    describe_change,
    effective_spec,
    encode_applied,
    immutable_view,
)
from backfill_api.status import (
    BackfillStatus,
    Phase,
    Progress,
    ShardState,
    Stall,
    StallReason,
    ThrottleReason,
    aggregate_progress,
    for_merge_patch,
    phase_conditions,
    stored_form,
)

from . import jobs as jobs_mod

STALE_REPORT_SECONDS = 300
"""A running worker reports at least on every batch, retry or throttle; silence this long is news."""


@dataclass(frozen=True)
class SecretCheck:
    ok: bool
    reason: StallReason | None = None
    message: str = ""


@dataclass(frozen=True)
class Observed:
    name: str
    namespace: str
    uid: str
    generation: int | None
    raw_spec: Mapping[str, Any]
    annotations: Mapping[str, str]
    status: Mapping[str, Any]
    jobs: Sequence[Mapping[str, Any]]
    now: str
    secret: SecretCheck | None = None
    """None: not looked up yet (only needed before creating Jobs)."""
    job_conflict: str = ""
    """Set when a Job of the planned name exists but belongs to someone else."""
    job_rejected: str = ""
    """Set when the API server refused to create a planned Job (its answer)."""
    pods: Sequence[Mapping[str, Any]] = ()
    """The worker pods, read only when a Job counts failed ones (``jobs.has_failed_pods``)."""
    server: jobs_mod.ServerCapabilities = jobs_mod.BASELINE
    """What the API server's Job API supports (from its version)."""


@dataclass(frozen=True)
class EventSpec:
    type: str  # Normal | Warning
    reason: str
    message: str
    key: str = ""
    """Set for an event about one fact (e.g. one pod's OOM kill) that every pass sees again:
    posted once per key (the Event's name is derived from it)."""


@dataclass(frozen=True)
class Plan:
    needs_secret: bool = False
    """Look the Secret up and call ``reconcile`` again with ``Observed.secret`` set."""
    create_jobs: list[dict[str, Any]] = field(default_factory=list)
    delete_jobs: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    events: list[EventSpec] = field(default_factory=list)


def _validate(raw: Mapping[str, Any]) -> tuple[BackfillSpec | None, str]:
    try:
        return BackfillSpec.model_validate(dict(raw)), ""
    except ValidationError as error:
        problems = [f"spec.{line}" for line in describe_validation_error(error)]
        return None, "invalid spec: " + "; ".join(problems)


def current_jobs(observed: Observed) -> dict[int, Mapping[str, Any]]:
    """The newest owned Job of each shard."""
    newest: dict[int, Mapping[str, Any]] = {}
    for job in observed.jobs:
        if not jobs_mod.owned_by(job, observed.uid):
            continue
        shard, run = jobs_mod.job_shard(job), jobs_mod.job_run(job)
        if shard is None or run is None:
            continue
        if shard not in newest or run > (jobs_mod.job_run(newest[shard]) or 0):
            newest[shard] = job
    return newest


def _name(job: Mapping[str, Any]) -> str:
    return str(job.get("metadata", {}).get("name", ""))


@dataclass(frozen=True)
class SpecCheck:
    """The spec the workers run (``None`` when invalid) and what is wrong with it, if anything."""

    spec: BackfillSpec | None
    stall: Stall | None


def _check_spec(raw_spec: Mapping[str, Any], applied: Mapping[str, Any] | None) -> SpecCheck:
    """Both the edited spec and the one workers run (applied immutable fields) must validate."""
    raw, raw_problem = _validate(raw_spec)
    spec, problem = _validate(effective_spec(raw_spec, applied)) if applied else (raw, raw_problem)
    if spec is None or raw is None:
        return SpecCheck(None, Stall(StallReason.INVALID_SPEC, problem or raw_problem))
    if applied is not None:
        changed = changed_fields(applied, immutable_view(raw))
        if changed:
            return SpecCheck(spec, Stall(StallReason.IMMUTABLE_FIELD_CHANGED, describe_change(changed)))
    return SpecCheck(spec, None)


@dataclass
class ShardsView:
    """What the shards need, folded from their reports and their newest Jobs."""

    needs_job: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    failure_reason: StallReason = StallReason.JOB_FAILED
    running: bool = False
    stale: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    """Jobs to delete: their worker failed for a reason no retry can fix."""
    oom: list[tuple[int, jobs_mod.OomKill]] = field(default_factory=list)
    """Worker pods of the current Jobs killed for their memory limit, by shard."""
    retrying: list[str] = field(default_factory=list)
    """Why a shard's Job is retrying (an OOM kill), for the message."""

    @property
    def phase(self) -> Phase:
        """Running means a worker reports work; an active Job may still be an unscheduled Pod."""
        return Phase.RUNNING if self.running else Phase.PENDING


def view_shards(
    parallelism: int, status: BackfillStatus, current: Mapping[int, Mapping[str, Any]], now: str,
    pods: Sequence[Mapping[str, Any]] = (),
) -> ShardsView:
    view = ShardsView()
    for shard in range(parallelism):
        report = status.shard(shard)
        job = current.get(shard)
        if report.state == ShardState.DONE:
            continue
        if job is None:
            view.needs_job.append(shard)
            continue
        state = jobs_mod.job_state(job)
        same_run = report.run in (None, jobs_mod.job_run(job))
        worker_reason = StallReason.of_worker(report.last_error_reason) if report.last_error_reason else None
        kills = jobs_mod.oom_kills(pods, job)
        view.oom += [(shard, kill) for kill in kills]
        # A worker that exited with its own error says why; an OOM-killed one cannot (SIGKILL).
        worker_said = same_run and report.state == ShardState.FAILED and worker_reason is not None
        if state == "failed":
            if kills and not worker_said:
                view.failures.append(f"shard {shard}: {jobs_mod.oom_message(kills[-1])}")
                view.failure_reason = StallReason.OOM_KILLED
            else:
                view.failures.append(f"shard {shard}: {report.last_error or jobs_mod.job_failure_message(job)}")
                if same_run and worker_reason is not None:
                    view.failure_reason = worker_reason
        elif report.state == ShardState.FAILED and same_run and worker_reason is not None and worker_reason.permanent:
            view.failures.append(f"shard {shard}: {report.last_error or report.last_error_reason}")
            view.failure_reason = worker_reason
            if not jobs_mod.fails_itself_on_permanent_error(job):
                view.stop.append(_name(job))  # no retry can fix it: stop the Job's pod retries
        elif state == "succeeded":
            view.needs_job.append(shard)  # exited without finishing (e.g. SIGTERM on a node drain)
        elif report.state == ShardState.RUNNING and same_run:
            view.running = True
            silent = _seconds_between(report.updated_at, now)
            if silent is not None and silent > STALE_REPORT_SECONDS:
                # Whole minutes: the message (and so the status) changes once a minute, not every pass.
                view.stale.append(f"shard {shard}: no report for {int(silent // 60)} min")
        if kills and state in ("pending", "running"):
            view.retrying.append(f"shard {shard}: {jobs_mod.oom_message(kills[-1])}; its Job retries it")
    return view


@dataclass(frozen=True)
class Decision:
    phase: Phase
    stall: Stall | None = None
    failed_message: str = ""
    launch: list[int] = field(default_factory=list)
    """Shards to start a new run's Job for."""
    delete: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    needs_secret: bool = False
    oom: list[tuple[int, jobs_mod.OomKill]] = field(default_factory=list)
    retrying: list[str] = field(default_factory=list)


def _decide(
    observed: Observed, status: BackfillStatus, spec: BackfillSpec, stall: Stall | None,
    current: Mapping[int, Mapping[str, Any]],
) -> Decision:
    """The phase of a Backfill with a valid spec, and which Jobs to start or stop."""
    previous_stalled = status.condition("Stalled")
    previous_reason = StallReason.of_worker(previous_stalled.reason) if previous_stalled and previous_stalled.reason else None
    if status.phase is Phase.SUCCEEDED:
        return Decision(Phase.SUCCEEDED, stall)
    if spec.suspend:
        # Deleting works on every version (Job.spec.suspend is 1.21+); the worker's SIGTERM
        # handling ends the current batch and the checkpoint makes the pause lossless. Failed
        # Jobs go too, so that resuming retries their shards.
        delete = [_name(j) for j in current.values() if jobs_mod.job_state(j) != "succeeded"]
        return Decision(Phase.PAUSED, stall, delete=delete)
    if status.phase is Phase.FAILED and previous_reason is not None and not previous_reason.recoverable:
        # Terminal for this run: set suspend true then false to retry.
        message = status.message or "the run failed"
        return Decision(Phase.FAILED, stall or Stall(previous_reason, message), failed_message=message)
    view = view_shards(spec.parallelism, status, current, observed.now, observed.pods)
    if view.failures:
        message = "; ".join(view.failures)
        return Decision(Phase.FAILED, Stall(view.failure_reason, message), failed_message=message, delete=view.stop, oom=view.oom)
    if not view.needs_job and all(status.shard(i).state == ShardState.DONE for i in range(spec.parallelism)):
        return Decision(Phase.SUCCEEDED, stall, delete=view.stop)
    if view.needs_job:
        if observed.secret is None:
            return Decision(view.phase, needs_secret=True)
        if not observed.secret.ok:
            reason = observed.secret.reason or StallReason.SECRET_NOT_FOUND
            return Decision(view.phase, Stall(reason, observed.secret.message), delete=view.stop)
        if observed.job_conflict:
            return Decision(view.phase, Stall(StallReason.JOB_NAME_TAKEN, observed.job_conflict), delete=view.stop)
        if observed.job_rejected:
            return Decision(view.phase, Stall(StallReason.JOB_REJECTED, observed.job_rejected), delete=view.stop)
        return Decision(view.phase, stall, launch=view.needs_job, delete=view.stop, stale=view.stale,
                        oom=view.oom, retrying=view.retrying)
    return Decision(view.phase, stall, delete=view.stop, stale=view.stale, oom=view.oom, retrying=view.retrying)


def reconcile(observed: Observed, defaults: jobs_mod.WorkerDefaults = jobs_mod.DEFAULT_WORKER) -> Plan:
    status = BackfillStatus.parse(observed.status)
    current = current_jobs(observed)
    run = max([status.run, *(jobs_mod.job_run(j) or 0 for j in current.values())])
    applied = decode_applied(observed.annotations)
    launched = applied is not None or bool(current)
    checked = _check_spec(observed.raw_spec, applied)

    progress: Progress | None = None
    job_names: list[str] | None = None
    create: list[dict[str, Any]] = []
    annotations: dict[str, str] = {}
    if checked.spec is None:
        decision = Decision(status.phase if launched and status.phase else Phase.FAILED, checked.stall)
    else:
        decision = _decide(observed, status, checked.spec, checked.stall, current)
        if decision.needs_secret:
            return Plan(needs_secret=True)
        if decision.launch:
            run += 1
            create = [
                jobs_mod.render_job(
                    name=observed.name, namespace=observed.namespace, uid=observed.uid,
                    spec=checked.spec, shard=shard, run=run, defaults=defaults, capabilities=observed.server,
                )
                for shard in decision.launch
            ]
            if applied is None:
                annotations[APPLIED_SPEC_ANNOTATION] = encode_applied(immutable_view(checked.spec))
        progress = aggregate_progress(
            status.shards, checked.spec.parallelism, succeeded=decision.phase is Phase.SUCCEEDED,
        )
        if decision.phase in (Phase.FAILED, Phase.PAUSED):
            # Nothing runs: no rate and no time left (a killed worker's last report still has its ETA).
            progress = progress.model_copy(update={"eta": "", "rows_per_second": 0.0})
        names = {s: _name(j) for s, j in current.items()}
        names.update({jobs_mod.job_shard(j) or 0: _name(j) for j in create})
        job_names = [names[s] for s in sorted(names)]

    new_status = _status(observed, status, decision, run=run, progress=progress, job_names=job_names,
                         launched=launched, created=bool(create))
    events = events_for(status, new_status, decision.stall, create=create, delete=decision.delete, oom=decision.oom)
    return Plan(
        create_jobs=create, delete_jobs=decision.delete, status=new_status.to_wire(),
        annotations=annotations, events=events,
    )


def _status(
    observed: Observed, previous: BackfillStatus, decision: Decision, *, run: int,
    progress: Progress | None, job_names: list[str] | None, launched: bool, created: bool,
) -> BackfillStatus:
    """The operator's part of the status (``shards`` is the workers')."""
    phase, stall = decision.phase, decision.stall
    message = _message(phase, stall, decision.failed_message, progress)
    if phase is Phase.RUNNING and stall is None and decision.stale:
        message += " (" + "; ".join(decision.stale) + ": worker stuck or gone? see its pod)"
    if phase in (Phase.RUNNING, Phase.PENDING) and stall is None and decision.retrying:
        message += " (" + "; ".join(decision.retrying) + ")"
    conditions = merge_conditions(
        [c.to_wire() for c in previous.conditions], phase_conditions(phase, message, stall),
        now=observed.now, generation=observed.generation,
    )
    fields: dict[str, Any] = {
        "phase": phase, "observed_generation": observed.generation, "message": message,
        "conditions": conditions, "run": run,
    }
    if progress is not None:
        fields["progress"] = progress
    if job_names is not None:
        fields["job_names"] = job_names
    if created and not previous.started_at:
        fields["started_at"] = observed.now
    finished = phase in (Phase.SUCCEEDED, Phase.FAILED)
    if finished and launched and not previous.completed_at:
        fields["completed_at"] = observed.now
    if not finished and previous.completed_at:
        fields["completed_at"] = None  # resumed after a failure
    return BackfillStatus(**fields)


def events_for(
    previous: BackfillStatus, desired: BackfillStatus, stall: Stall | None, *,
    create: Sequence[Mapping[str, Any]], delete: Sequence[str], oom: Sequence[tuple[int, jobs_mod.OomKill]] = (),
) -> list[EventSpec]:
    """Events for what changed: the phase, a new stall, a resolved stall, Jobs created or deleted,
    and one ``OOMKilled`` Warning per OOM-killed worker pod (keyed: posted once, however many
    passes see the pod)."""
    phase = desired.phase or Phase.PENDING
    events: list[EventSpec] = []
    if phase != previous.phase:
        events.append(EventSpec("Warning" if phase is Phase.FAILED else "Normal", phase.value, desired.message))
    previous_reason = previous.stall_reason()
    if stall is not None and stall.reason != previous_reason and phase is not Phase.FAILED:
        events.append(EventSpec("Warning", stall.reason.value, stall.message))
    if stall is None and previous_reason is not None and previous_reason.recoverable:
        events.append(EventSpec("Normal", "Resolved", f"{previous_reason.value} no longer applies"))
    events += [EventSpec("Normal", "JobCreated", f"created worker Job {_name(j)}") for j in create]
    why = "suspended" if phase is Phase.PAUSED else "stopped"
    events += [EventSpec("Normal", "JobDeleted", f"deleted worker Job {name} ({why})") for name in delete]
    events += [
        EventSpec("Warning", StallReason.OOM_KILLED.value, f"shard {shard}: {jobs_mod.oom_message(kill)}", key=f"oom-{kill.uid}")
        for shard, kill in oom
    ]
    return events


def _seconds_between(earlier: Any, later: str) -> float | None:
    try:
        start = datetime.fromisoformat(str(earlier).replace("Z", "+00:00"))
        end = datetime.fromisoformat(later.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (end - start).total_seconds()


def _message(phase: Phase, stall: Stall | None, failed: str, progress: Progress | None) -> str:
    if phase is Phase.FAILED:
        return failed or (stall.message if stall else "failed")
    if stall is not None:
        return stall.message
    if phase is Phase.SUCCEEDED:
        return f"done: {progress.rows_updated if progress else 0} rows updated"
    if phase is Phase.PAUSED:
        return "suspended at a batch boundary: set spec.suspend to false to resume from the checkpoint"
    if phase is Phase.RUNNING and progress:
        if progress.throttle_reason == ThrottleReason.WINDOW:
            # Still Running (not stalled): the worker waits at a batch boundary and keeps reporting.
            opens = f" opens at {progress.next_window_start}" if progress.next_window_start else " opens later"
            return (f"{progress.percent}% done, {progress.rows_updated} rows updated; "
                    f"outside the run window (spec.schedule): the next{opens}")
        eta = f", ETA {progress.eta}" if progress.eta else ""
        return f"{progress.percent}% done, {progress.rows_updated} rows updated{eta}"
    return "waiting for the worker Job to start"


def status_patch(previous: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch turning ``previous`` into ``desired`` for the keys the operator owns.

    ``status.shards`` is the workers' and never touched here. Empty when nothing changed, so a
    quiet Backfill costs no writes. Empty strings travel as deletions (see ``for_merge_patch``).
    """
    changed = {key: value for key, value in desired.items() if stored_form(previous.get(key)) != stored_form(value)}
    patch: dict[str, Any] = for_merge_patch(changed)
    return patch
