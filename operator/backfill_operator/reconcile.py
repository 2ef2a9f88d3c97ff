"""The controller's decisions: from what is observed to what to do (PURE, no I/O).

Level-triggered: every call looks at the whole picture (Backfill, its Jobs, the shard reports)
and returns the full desired status plus the Jobs to create or delete. Running it twice in a
row, or after an operator restart, changes nothing: Job names are deterministic and an existing
Job is adopted, never duplicated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from backfill_api.model import BackfillSpec
from backfill_api.manifest import describe_validation_error

from . import jobs as jobs_mod
from backfill_api.conditions import STALLED, find, merge_conditions
from backfill_api.specdiff import (
    APPLIED_SPEC_ANNOTATION,
    changed_fields,
    decode_applied,
    describe_change,
    effective_spec,
    encode_applied,
    immutable_view,
)
from backfill_api.status import Stall, aggregate_progress, for_merge_patch, phase_conditions, stored_form

STALE_REPORT_SECONDS = 300
"""A running worker reports at least on every batch, retry or throttle; silence this long is news."""

# Worker error reasons that no retry can fix: fail at once instead of burning backoffLimit.
PERMANENT_WORKER_REASONS = frozenset({"InvalidSpec", "ValidationFailed", "CheckpointMismatch", "CheckpointUnavailable"})


@dataclass(frozen=True)
class SecretCheck:
    ok: bool
    reason: str = ""
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


@dataclass(frozen=True)
class EventSpec:
    type: str  # Normal | Warning
    reason: str
    message: str


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


def reconcile(observed: Observed, defaults: jobs_mod.WorkerDefaults = jobs_mod.DEFAULT_WORKER) -> Plan:
    status = observed.status or {}
    previous_phase = status.get("phase")
    shards: Mapping[str, Mapping[str, Any]] = status.get("shards") or {}
    run = int(status.get("run") or 0)
    current = current_jobs(observed)
    run = max([run, *(jobs_mod.job_run(j) or 0 for j in current.values())])
    applied = decode_applied(observed.annotations)
    launched = applied is not None or bool(current)

    raw_spec, raw_problem = _validate(observed.raw_spec)
    spec, problem = _validate(effective_spec(observed.raw_spec, applied)) if applied else (raw_spec, raw_problem)

    create: list[dict[str, Any]] = []
    delete: list[str] = []
    annotations: dict[str, str] = {}
    events: list[EventSpec] = []
    stall: Stall | None = None
    failed_message = ""
    stale: list[str] = []
    extra: dict[str, Any] = {}

    if spec is None or raw_spec is None:
        stall = Stall("InvalidSpec", problem or raw_problem)
        phase = previous_phase if launched and previous_phase else "Failed"
    else:
        if applied is not None:
            changed = changed_fields(applied, immutable_view(raw_spec))
            if changed:
                stall = Stall("ImmutableFieldChanged", describe_change(changed))
        parallelism = spec.parallelism
        previous_stall = find(status.get("conditions"), STALLED) or {}
        run_failed = previous_phase == "Failed" and previous_stall.get("reason") not in (
            "InvalidSpec", "SecretNotFound", "SecretKeyNotFound", "JobNameTaken", None,
        )
        if previous_phase == "Succeeded":
            phase = "Succeeded"
        elif spec.suspend:
            phase = "Paused"
            # Deleting works on every version (Job.spec.suspend is 1.21+); the worker's SIGTERM
            # handling ends the current batch and the checkpoint makes the pause lossless. Failed
            # Jobs go too, so that resuming retries their shards.
            delete = [_name(j) for j in current.values() if jobs_mod.job_state(j) != "succeeded"]
        elif run_failed and previous_phase == "Failed":
            phase = "Failed"  # terminal for this run: set suspend true then false to retry
            failed_message = status.get("message") or "the run failed"
            stall = stall or Stall(str(previous_stall.get("reason") or "Failed"), failed_message)
        else:
            needs_job: list[int] = []
            failures: list[str] = []
            failure_reason = "JobFailed"
            running = False
            for shard in range(parallelism):
                report = shards.get(str(shard)) or {}
                job = current.get(shard)
                if report.get("state") == "done":
                    continue
                if job is None:
                    needs_job.append(shard)
                    continue
                state = jobs_mod.job_state(job)
                same_run = report.get("run") in (None, jobs_mod.job_run(job))
                if state == "failed":
                    failures.append(f"shard {shard}: {report.get('lastError') or jobs_mod.job_failure_message(job)}")
                    failure_reason = str(report.get("lastErrorReason") or failure_reason) if same_run else failure_reason
                elif (
                    report.get("state") == "failed"
                    and same_run
                    and report.get("lastErrorReason") in PERMANENT_WORKER_REASONS
                ):
                    failures.append(f"shard {shard}: {report.get('lastError') or report.get('lastErrorReason')}")
                    failure_reason = str(report["lastErrorReason"])
                    delete.append(_name(job))  # no retry can fix it: stop the Job's pod retries
                elif state == "succeeded":
                    needs_job.append(shard)  # exited without finishing (e.g. SIGTERM on a node drain)
                else:
                    # Running means a worker reports work; an active Job may still be an
                    # unscheduled Pod (image pull, no capacity), which is Pending to a human.
                    running = running or (report.get("state") == "running" and same_run)
                    silent = _seconds_between(report.get("updatedAt"), observed.now)
                    if report.get("state") == "running" and same_run and silent is not None and silent > STALE_REPORT_SECONDS:
                        # Whole minutes: the message (and so the status) changes once a minute, not every pass.
                        stale.append(f"shard {shard}: no report for {int(silent // 60)} min")
            if failures:
                phase = "Failed"
                failed_message = "; ".join(failures)
                stall = Stall(failure_reason, failed_message)
            elif not needs_job and all((shards.get(str(i)) or {}).get("state") == "done" for i in range(parallelism)):
                phase = "Succeeded"
            elif needs_job:
                if observed.secret is None:
                    return Plan(needs_secret=True)
                if not observed.secret.ok:
                    stall = Stall(observed.secret.reason, observed.secret.message)
                    phase = "Running" if running else "Pending"
                elif observed.job_conflict:
                    stall = Stall("JobNameTaken", observed.job_conflict)
                    phase = "Running" if running else "Pending"
                else:
                    run += 1
                    for shard in needs_job:
                        create.append(jobs_mod.render_job(
                            name=observed.name, namespace=observed.namespace, uid=observed.uid,
                            spec=spec, shard=shard, run=run, defaults=defaults,
                        ))
                    if applied is None:
                        annotations[APPLIED_SPEC_ANNOTATION] = encode_applied(immutable_view(spec))
                    phase = "Running" if running else "Pending"
            else:
                phase = "Running" if running else "Pending"
        progress = aggregate_progress(shards, parallelism, succeeded=phase == "Succeeded")
        extra["progress"] = progress
        names = {s: _name(j) for s, j in current.items()}
        names.update({jobs_mod.job_shard(j) or 0: _name(j) for j in create})
        extra["jobNames"] = [names[s] for s in sorted(names)]

    message = _message(phase, stall, failed_message, extra.get("progress"))
    if phase == "Running" and stall is None and stale:
        message += " (" + "; ".join(stale) + ": worker stuck or gone? see its pod)"
    conditions = merge_conditions(
        status.get("conditions"), phase_conditions(phase, message, stall),
        now=observed.now, generation=observed.generation,
    )
    new_status: dict[str, Any] = {
        "phase": phase,
        "observedGeneration": observed.generation,
        "message": message,
        "conditions": conditions,
        "run": run,
        **extra,
    }
    if create and not status.get("startedAt"):
        new_status["startedAt"] = observed.now
    if phase in ("Succeeded", "Failed") and launched and not status.get("completedAt"):
        new_status["completedAt"] = observed.now
    if phase not in ("Succeeded", "Failed") and status.get("completedAt"):
        new_status["completedAt"] = None  # resumed after a failure

    if phase != previous_phase:
        events.append(EventSpec("Warning" if phase == "Failed" else "Normal", phase, message))
    previous_reason = (find(status.get("conditions"), STALLED) or {}).get("reason") if (find(status.get("conditions"), STALLED) or {}).get("status") == "True" else None
    if stall is not None and stall.reason != previous_reason and phase != "Failed":
        events.append(EventSpec("Warning", stall.reason, stall.message))
    if stall is None and previous_reason in ("ImmutableFieldChanged", "SecretNotFound", "SecretKeyNotFound", "InvalidSpec", "JobNameTaken"):
        events.append(EventSpec("Normal", "Resolved", f"{previous_reason} no longer applies"))
    events += [EventSpec("Normal", "JobCreated", f"created worker Job {_name(j)}") for j in create]
    events += [EventSpec("Normal", "JobDeleted", f"deleted worker Job {name} ({'suspended' if phase == 'Paused' else 'stopped'})") for name in delete]
    return Plan(create_jobs=create, delete_jobs=delete, status=new_status, annotations=annotations, events=events)


def _seconds_between(earlier: Any, later: str) -> float | None:
    try:
        start = datetime.fromisoformat(str(earlier).replace("Z", "+00:00"))
        end = datetime.fromisoformat(later.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (end - start).total_seconds()


def _message(phase: str, stall: Stall | None, failed: str, progress: Mapping[str, Any] | None) -> str:
    if phase == "Failed":
        return failed or (stall.message if stall else "failed")
    if stall is not None:
        return stall.message
    if phase == "Succeeded":
        return f"done: {progress['rowsUpdated'] if progress else 0} rows updated"
    if phase == "Paused":
        return "suspended at a batch boundary: set spec.suspend to false to resume from the checkpoint"
    if phase == "Running" and progress:
        eta = f", ETA {progress['eta']}" if progress.get("eta") else ""
        return f"{progress['percent']}% done, {progress['rowsUpdated']} rows updated{eta}"
    return "waiting for the worker Job to start"


def status_patch(previous: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch turning ``previous`` into ``desired`` for the keys the operator owns.

    ``status.shards`` is the workers' and never touched here. Empty when nothing changed, so a
    quiet Backfill costs no writes. Empty strings travel as deletions (see ``for_merge_patch``).
    """
    changed = {key: value for key, value in desired.items() if stored_form(previous.get(key)) != stored_form(value)}
    return for_merge_patch(changed)
