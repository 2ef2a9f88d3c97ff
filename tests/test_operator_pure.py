"""Unit tests of the operator's pure modules: Jobs, conditions, status, spec diff, reconcile."""

from __future__ import annotations

import json
from typing import Any

import pytest

from backfill_api.conditions import Condition, merge_conditions
from backfill_api.model import BackfillSpec
from backfill_api.specdiff import (
    APPLIED_SPEC_ANNOTATION,
    changed_fields,
    decode_applied,
    effective_spec,
    encode_applied,
    immutable_view,
)
from backfill_api.status import (
    BackfillStatus,
    Phase,
    ShardState,
    ShardStatus,
    StallReason,
    aggregate_progress,
    error_reasons,
    format_eta,
)
from backfill_operator import jobs
from backfill_operator.reconcile import Observed, SecretCheck, reconcile, status_patch

UID = "0f0e0d0c-1111-2222-3333-444455556666"
SPEC: dict[str, Any] = {
    "database": {"dsnSecretRef": {"name": "shop-db", "key": "dsn"}},
    "table": "public.customers",
    "set": {"status": "'inactive'"},
    "where": "status IS NULL",
}


def spec(**changes: Any) -> BackfillSpec:
    return BackfillSpec.model_validate({**SPEC, **changes})


# -- jobs ------------------------------------------------------------------------------------


def test_job_is_rendered_with_owner_labels_and_secret_ref_only():
    job = jobs.render_job(name="customers-inactive", namespace="shop", uid=UID, spec=spec(), shard=0, run=1)
    meta = job["metadata"]
    assert meta["name"] == "customers-inactive-s0-r1"
    assert meta["ownerReferences"] == [{
        "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "name": "customers-inactive",
        "uid": UID, "controller": True, "blockOwnerDeletion": True,
    }]
    assert meta["labels"]["backfill.dev/name"] == "customers-inactive"
    assert meta["labels"]["backfill.dev/shard"] == "0"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "backfill-operator"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 6
    container = pod["containers"][0]
    assert container["command"] == ["backfill"]
    assert container["args"] == ["worker", "--namespace", "shop", "--name", "customers-inactive", "--shard", "0"]
    dsn_env = next(e for e in container["env"] if e["name"] == "BACKFILL_DSN")
    assert dsn_env == {"name": "BACKFILL_DSN", "valueFrom": {"secretKeyRef": {"name": "shop-db", "key": "dsn"}}}
    assert all("value" not in e for e in container["env"] if e["name"] == "BACKFILL_DSN")
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["serviceAccountName"] == "backfill-worker"


def test_job_takes_pod_settings_from_spec_worker():
    worker = {
        "image": "registry.example/backfill:1.2", "serviceAccountName": "shop-backfill",
        "resources": {"limits": {"cpu": "2"}}, "nodeSelector": {"pool": "batch"},
        "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 4242}, "backoffLimit": 2, "activeDeadlineSeconds": 3600,
    }
    job = jobs.render_job(name="b", namespace="ns", uid=UID, spec=spec(worker=worker), shard=3, run=7)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.example/backfill:1.2"
    assert container["resources"] == {"limits": {"cpu": "2"}}
    assert container["securityContext"] == {"runAsNonRoot": True, "runAsUser": 4242}
    assert pod["serviceAccountName"] == "shop-backfill"
    assert pod["nodeSelector"] == {"pool": "batch"}
    assert pod["tolerations"] == [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}]
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["activeDeadlineSeconds"] == 3600
    assert job["metadata"]["name"] == "b-s3-r7"


def test_job_without_secret_ref_is_refused_with_the_field():
    with pytest.raises(ValueError, match="spec.database.dsnSecretRef"):
        jobs.render_job(name="b", namespace="ns", uid=UID, spec=spec(database={}), shard=0, run=1)


def test_long_names_are_truncated_and_hashed_deterministically():
    long = "a" * 240
    name = jobs.job_name(long, 12, 345)
    assert len(name) <= 63 and name.endswith("-s12-r345")
    assert name == jobs.job_name(long, 12, 345)
    assert jobs.job_name("a" * 239 + "b", 12, 345) != name
    labels = jobs.job_labels(long, 0, 1)
    assert all(len(v) <= 63 for v in labels.values())


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ({}, "pending"),
        ({"active": 1}, "running"),
        ({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}, "succeeded"),
        ({"failed": 7, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}, "failed"),
    ],
)
def test_job_state(status, state):
    assert jobs.job_state({"status": status}) == state


# -- conditions / status -----------------------------------------------------------------------


def test_transition_time_is_kept_while_status_holds():
    first = merge_conditions(None, [Condition("Ready", "False", "Pending")], now="t1", generation=1)
    same = merge_conditions(first, [Condition("Ready", "False", "Progressing", "42%")], now="t2", generation=2)
    flipped = merge_conditions(same, [Condition("Ready", "True", "Succeeded")], now="t3", generation=2)
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["reason"] == "Progressing"
    assert same[0]["observedGeneration"] == 2
    assert flipped[0]["lastTransitionTime"] == "t3"


@pytest.mark.parametrize(("seconds", "text"), [(None, ""), (0, "0"), (90, "1m30s"), (3725.4, "1h2m5s")])
def test_eta_format(seconds, text):
    assert format_eta(seconds) == text


def test_progress_aggregates_shards_by_estimated_keys():
    shards = {
        "0": {"state": "done", "rowsUpdated": 100, "batches": 2, "estimatedKeys": 100, "keysDone": 100, "batchSize": 50},
        "1": {"state": "running", "rowsUpdated": 50, "batches": 1, "estimatedKeys": 300, "keysDone": 100,
              "rowsPerSecond": 25.0, "etaSeconds": 8, "batchSize": 80, "throttleReason": "maxRowsPerSecond"},
    }
    progress = aggregate_progress(shards, 2).to_wire()
    assert progress == {
        "rowsUpdated": 150, "batches": 3, "percent": 50, "rowsPerSecond": 25.0, "eta": "8s",
        "batchSize": 80, "throttleReason": "maxRowsPerSecond", "impact": None, "nextWindowStart": None,
    }
    assert aggregate_progress({}, 3).percent == 0 and aggregate_progress({}, 3).eta == ""
    assert aggregate_progress(shards, 2, succeeded=True).percent == 100


def test_progress_shows_the_most_throttled_running_shards_impact():
    gentle = {"summary": "duty 20% (throughput 1.10)", "dutyPercent": 20.0, "limitedBy": "throughput"}
    eager = {"summary": "duty 90%", "dutyPercent": 90.0, "limitedBy": ""}
    shards = {
        "0": {"state": "running", "impact": eager},
        "1": {"state": "running", "impact": gentle},
        "2": {"state": "done", "impact": {"summary": "duty 5%", "dutyPercent": 5.0}},
    }
    assert aggregate_progress(shards, 3).to_wire()["impact"] == gentle
    assert aggregate_progress({"0": {"state": "done", "impact": gentle}}, 1).impact is None


# -- spec diff -------------------------------------------------------------------------------


def test_immutable_view_normalises_defaults_and_detects_changes():
    base = immutable_view(spec())
    assert base == immutable_view(spec(key=None, parallelism=1))
    assert changed_fields(base, immutable_view(spec(batch={"size": 5000}))) == []
    assert changed_fields(base, immutable_view(spec(table="public.other", where="true"))) == ["table", "where"]
    annotations = {APPLIED_SPEC_ANNOTATION: encode_applied(base)}
    assert decode_applied(annotations) == base
    assert decode_applied({APPLIED_SPEC_ANNOTATION: "{not json"}) is None


def test_effective_spec_keeps_the_applied_change_and_live_tunables():
    applied = immutable_view(spec())
    edited = {**SPEC, "table": "public.other", "batch": {"size": 5000}}
    effective = BackfillSpec.model_validate(effective_spec(edited, applied))
    assert effective.table == "public.customers" and effective.batch.size == 5000


# -- reconcile ---------------------------------------------------------------------------------


def observe(*, raw_spec=None, status=None, jobs_=(), annotations=None, secret=None, generation=1, job_conflict="") -> Observed:
    return Observed(
        name="bf", namespace="ns", uid=UID, generation=generation, raw_spec=raw_spec or SPEC,
        annotations=annotations or {}, status=status or {}, jobs=list(jobs_), now="2026-11-28T00:00:00Z", secret=secret,
        job_conflict=job_conflict,
    )


def job(shard: int, run: int, status: dict | None = None) -> dict:
    rendered = jobs.render_job(name="bf", namespace="ns", uid=UID, spec=spec(), shard=shard, run=run)
    rendered["status"] = status or {}
    return rendered


def cond(plan, type_):
    return next(c for c in plan.status["conditions"] if c["type"] == type_)


def test_new_backfill_asks_for_the_secret_then_creates_one_job_per_shard():
    assert reconcile(observe()).needs_secret
    plan = reconcile(observe(raw_spec={**SPEC, "parallelism": 2}, secret=SecretCheck(True)))
    assert [j["metadata"]["name"] for j in plan.create_jobs] == ["bf-s0-r1", "bf-s1-r1"]
    assert plan.status["phase"] == "Pending" and plan.status["run"] == 1
    assert plan.status["jobNames"] == ["bf-s0-r1", "bf-s1-r1"]
    assert json.loads(plan.annotations[APPLIED_SPEC_ANNOTATION])["parallelism"] == 2
    assert cond(plan, "Reconciling")["status"] == "True" and cond(plan, "Ready")["status"] == "False"
    assert {e.reason for e in plan.events} >= {"Pending", "JobCreated"}


def test_missing_secret_stalls_without_jobs():
    plan = reconcile(observe(secret=SecretCheck(False, "SecretNotFound", "Secret ns/shop-db not found")))
    assert not plan.create_jobs
    assert cond(plan, "Stalled") == {**cond(plan, "Stalled"), "status": "True", "reason": "SecretNotFound"}
    assert any(e.type == "Warning" and e.reason == "SecretNotFound" for e in plan.events)


def test_existing_job_is_followed_not_duplicated():
    applied = {APPLIED_SPEC_ANNOTATION: encode_applied(immutable_view(spec()))}
    status = {"phase": "Pending", "run": 1, "shards": {"0": {"state": "running", "rowsUpdated": 10, "run": 1}}}
    plan = reconcile(observe(status=status, annotations=applied, jobs_=[job(0, 1, {"active": 1})]))
    assert not plan.needs_secret and not plan.create_jobs
    assert plan.status["phase"] == "Running" and plan.status["progress"]["rowsUpdated"] == 10
    # the same picture again after an operator restart (status lost): still no new Job
    again = reconcile(observe(status={}, annotations=applied, jobs_=[job(0, 1, {"active": 1})]))
    assert not again.create_jobs and again.status["run"] == 1
    assert again.status["phase"] == "Pending", "an active Job whose worker has not reported is not Running yet"


def test_all_shards_done_is_succeeded_and_ready():
    status = {"phase": "Running", "run": 1, "shards": {"0": {"state": "done", "rowsUpdated": 99, "run": 1}}}
    plan = reconcile(observe(status=status, jobs_=[job(0, 1, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})]))
    assert plan.status["phase"] == "Succeeded" and plan.status["completedAt"]
    assert cond(plan, "Ready")["status"] == "True" and cond(plan, "Stalled")["status"] == "False"
    assert plan.status["progress"]["percent"] == 100


def test_failed_job_fails_with_the_workers_last_error():
    status = {"phase": "Running", "run": 1, "shards": {"0": {"state": "failed", "lastError": "boom", "lastErrorReason": "RetriesExhausted", "run": 1}}}
    failed_job = job(0, 1, {"failed": 7, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]})
    plan = reconcile(observe(status=status, jobs_=[failed_job]))
    assert plan.status["phase"] == "Failed" and "boom" in plan.status["message"]
    assert cond(plan, "Stalled")["reason"] == "RetriesExhausted"
    assert any(e.type == "Warning" and e.reason == "Failed" for e in plan.events)
    # terminal: the next pass neither retries nor changes anything
    again = reconcile(observe(status={**status, **plan.status}, jobs_=[failed_job]))
    assert again.status["phase"] == "Failed" and not again.create_jobs and status_patch({**status, **plan.status}, again.status) == {}


def test_permanent_worker_error_fails_fast_and_stops_the_job():
    status = {"phase": "Running", "run": 1, "shards": {"0": {"state": "failed", "lastError": "spec.set.nope: column does not exist", "lastErrorReason": "ValidationFailed", "run": 1}}}
    plan = reconcile(observe(status=status, jobs_=[job(0, 1, {"active": 1})]))
    assert plan.status["phase"] == "Failed" and plan.delete_jobs == ["bf-s0-r1"]


def test_suspend_deletes_jobs_and_resume_starts_the_next_run():
    status = {"phase": "Running", "run": 1, "shards": {"0": {"state": "running", "run": 1}}}
    running = [job(0, 1, {"active": 1})]
    paused = reconcile(observe(raw_spec={**SPEC, "suspend": True}, status=status, jobs_=running))
    assert paused.status["phase"] == "Paused" and paused.delete_jobs == ["bf-s0-r1"]
    assert cond(paused, "Ready")["reason"] == "Suspended"
    # kstatus reads Reconciling=True as InProgress: Flux's wait/dependsOn hold while paused.
    assert cond(paused, "Reconciling")["status"] == "True"
    assert cond(paused, "Stalled")["status"] == "False"
    resumed = reconcile(observe(status={**status, **paused.status}, secret=SecretCheck(True)))
    assert [j["metadata"]["name"] for j in resumed.create_jobs] == ["bf-s0-r2"]
    assert resumed.status["phase"] == "Pending", "the stale report of run 1 does not make run 2 Running"
    reporting = {**status, **resumed.status, "shards": {"0": {"state": "running", "run": 2}}}
    assert reconcile(observe(status=reporting, jobs_=[job(0, 2, {"active": 1})])).status["phase"] == "Running"


def test_job_completed_without_done_shard_is_relaunched():
    status = {"phase": "Running", "run": 1, "shards": {"0": {"state": "paused", "run": 1}}}
    done_job = job(0, 1, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
    plan = reconcile(observe(status=status, jobs_=[done_job], secret=SecretCheck(True)))
    assert [j["metadata"]["name"] for j in plan.create_jobs] == ["bf-s0-r2"]


def test_immutable_change_stalls_keeps_running_and_reverting_clears_it():
    applied = {APPLIED_SPEC_ANNOTATION: encode_applied(immutable_view(spec()))}
    status = {"phase": "Running", "run": 1, "shards": {"0": {"state": "running", "run": 1}}}
    running = [job(0, 1, {"active": 1})]
    changed = reconcile(observe(raw_spec={**SPEC, "where": "true"}, status=status, annotations=applied, jobs_=running, generation=2))
    assert changed.status["phase"] == "Running" and not changed.delete_jobs and not changed.create_jobs
    stalled = cond(changed, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "ImmutableFieldChanged" and "spec.where" in stalled["message"]
    assert any(e.reason == "ImmutableFieldChanged" for e in changed.events)
    reverted = reconcile(observe(status={**status, **changed.status}, annotations=applied, jobs_=running, generation=3))
    assert cond(reverted, "Stalled")["status"] == "False" and cond(reverted, "Reconciling")["status"] == "True"
    assert any(e.reason == "Resolved" for e in reverted.events)


def test_invalid_spec_fails_with_the_field_and_recovers_when_fixed():
    plan = reconcile(observe(raw_spec={**SPEC, "batch": {"size": 0}}))
    assert plan.status["phase"] == "Failed" and "spec.batch.size" in plan.status["message"]
    assert cond(plan, "Stalled")["reason"] == "InvalidSpec"
    fixed = reconcile(observe(status=plan.status, secret=SecretCheck(True)))
    assert fixed.create_jobs and fixed.status["phase"] == "Pending"


def test_status_patch_is_empty_when_nothing_changed():
    status = {"phase": "Running", "run": 1, "shards": {"0": {"state": "running", "run": 1}}}
    applied = {APPLIED_SPEC_ANNOTATION: encode_applied(immutable_view(spec()))}
    first = reconcile(observe(status=status, annotations=applied, jobs_=[job(0, 1, {"active": 1})]))
    second = reconcile(observe(status={**status, **first.status}, annotations=applied, jobs_=[job(0, 1, {"active": 1})]))
    assert status_patch({**status, **first.status}, second.status) == {} and not second.events


def test_empty_strings_travel_as_deletions_and_compare_as_absent():
    from backfill_api.status import for_merge_patch

    patch = {"message": "", "progress": {"eta": "", "rowsUpdated": 1}, "conditions": [{"type": "Ready", "message": ""}]}
    assert for_merge_patch(patch) == {"message": None, "progress": {"eta": None, "rowsUpdated": 1}, "conditions": [{"type": "Ready"}]}
    stored = {"progress": {"rowsUpdated": 1}, "conditions": [{"type": "Ready"}]}
    assert status_patch(stored, {"progress": {"eta": "", "rowsUpdated": 1}, "conditions": [{"type": "Ready", "message": ""}]}) == {}


def test_a_foreign_job_of_the_same_name_stalls_instead_of_being_adopted():
    plan = reconcile(observe(secret=SecretCheck(True), job_conflict="Job ns/bf-s0-r1 exists and does not belong to this Backfill"))
    assert not plan.create_jobs and cond(plan, "Stalled")["reason"] == "JobNameTaken"
    assert plan.status["phase"] == "Pending"


def test_worker_defaults_come_from_the_charts_environment(monkeypatch):
    from backfill_cli.cluster import worker_defaults

    monkeypatch.setenv("BACKFILL_WORKER_IMAGE_PULL_POLICY", "Always")
    monkeypatch.setenv("BACKFILL_WORKER_RESOURCES", '{"limits": {"memory": "1Gi"}}')
    monkeypatch.setenv("BACKFILL_WORKER_SECURITY_CONTEXT", '{"runAsNonRoot": true, "readOnlyRootFilesystem": true}')
    monkeypatch.setenv("BACKFILL_WORKER_POD_SECURITY_CONTEXT", "{}")
    defaults = worker_defaults("team-worker", "registry.example/bf:2")
    job = jobs.render_job(name="bf", namespace="ns", uid=UID, spec=spec(), shard=0, run=1, defaults=defaults)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.example/bf:2" and container["imagePullPolicy"] == "Always"
    assert container["resources"] == {"limits": {"memory": "1Gi"}}
    assert container["securityContext"] == {"runAsNonRoot": True, "readOnlyRootFilesystem": True}
    assert pod["securityContext"] == jobs.DEFAULT_POD_SECURITY_CONTEXT  # "{}" keeps the safe default
    assert pod["serviceAccountName"] == "team-worker"
    assert "serviceAccountName" not in jobs.render_job(
        name="bf", namespace="ns", uid=UID, spec=spec(), shard=0, run=1, defaults=worker_defaults("", None)
    )["spec"]["template"]["spec"]


def test_a_silent_running_worker_is_pointed_out_in_the_message():
    fresh = {"phase": "Running", "run": 1, "shards": {"0": {"state": "running", "run": 1, "updatedAt": "2026-11-27T23:59:58Z"}}}
    silent = {"phase": "Running", "run": 1, "shards": {"0": {"state": "running", "run": 1, "updatedAt": "2026-11-27T23:50:00Z"}}}
    running_job = [job(0, 1, {"active": 1})]
    assert "no report" not in reconcile(observe(status=fresh, jobs_=running_job)).status["message"]
    message = reconcile(observe(status=silent, jobs_=running_job)).status["message"]
    assert "shard 0: no report for 10 min" in message


# -- stall reasons and the typed status ----------------------------------------------------------


@pytest.mark.parametrize("reason", [r for r in StallReason if r.recoverable])
def test_every_recoverable_stall_posts_resolved_once_fixed(reason):
    """The handlers' Secret findings (SecretRefMissing, SecretForbidden) used to clear silently."""
    stalled = reconcile(observe(secret=SecretCheck(False, reason, f"{reason} for the test")))
    assert cond(stalled, "Stalled") == {**cond(stalled, "Stalled"), "status": "True", "reason": reason.value}
    fixed = reconcile(observe(status=stalled.status, secret=SecretCheck(True)))
    assert cond(fixed, "Stalled")["status"] == "False"
    assert [e.message for e in fixed.events if e.reason == "Resolved"] == [f"{reason.value} no longer applies"]


def test_a_failed_run_posts_no_resolved_and_stays_failed():
    status = {"phase": "Failed", "message": "shard 0: gave up", "run": 1,
              "conditions": [{"type": "Stalled", "status": "True", "reason": "RetriesExhausted"}]}
    plan = reconcile(observe(status=status, secret=SecretCheck(True)))
    assert plan.status["phase"] == "Failed" and not plan.create_jobs
    assert not [e for e in plan.events if e.reason == "Resolved"]


def test_stall_reasons_cover_every_worker_error_and_the_secret_checks():
    assert error_reasons() <= {r.value for r in StallReason}
    assert {r for r in StallReason if r.permanent} == {
        StallReason.INVALID_SPEC, StallReason.VALIDATION_FAILED,
        StallReason.CHECKPOINT_MISMATCH, StallReason.CHECKPOINT_UNAVAILABLE,
    }
    assert not StallReason.RETRIES_EXHAUSTED.recoverable and StallReason.SECRET_FORBIDDEN.recoverable
    assert StallReason.of_worker("SomethingNewer") is StallReason.ERROR


def test_typed_status_reads_what_it_writes_and_tolerates_garbage():
    wire = {"phase": "Running", "run": 2, "shards": {"0": {"state": "running", "rowsUpdated": 5, "etaSeconds": 1.5}},
            "conditions": [{"type": "Stalled", "status": "True", "reason": "SecretNotFound"}], "addedLater": 1}
    status = BackfillStatus.parse(wire)
    assert status.phase is Phase.RUNNING and status.shard(0).state is ShardState.RUNNING
    assert status.shard(1) == ShardStatus() and status.stall_reason() is StallReason.SECRET_NOT_FOUND
    assert status.to_wire() == {k: v for k, v in wire.items() if k != "addedLater"}
    assert BackfillStatus.parse({"run": "not a number"}) == BackfillStatus() == BackfillStatus.parse(None)
