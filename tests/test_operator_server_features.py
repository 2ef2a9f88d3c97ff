"""The operator's decisions that depend on the API server and on the worker pods (PURE):
server version -> Job manifest (``podFailurePolicy`` on 1.26+, 1.20's Job unchanged), and an
OOM-killed worker pod -> what the status and the events say."""

from __future__ import annotations

from typing import Any

import pytest

from backfill_api.model import BackfillSpec
from backfill_api.status import StallReason, error_classes
from backfill_operator import jobs
from backfill_operator.reconcile import Observed, SecretCheck, reconcile

UID = "0f0e0d0c-1111-2222-3333-444455556666"
SPEC: dict[str, Any] = {
    "database": {"dsnSecretRef": {"name": "shop-db", "key": "dsn"}},
    "table": "public.customers",
    "set": {"status": "'inactive'"},
}
V1_20 = {"major": "1", "minor": "20", "gitVersion": "v1.20.2"}
V1_37 = {"major": "1", "minor": "37", "gitVersion": "v1.37.2"}
MODERN = jobs.server_capabilities(V1_37)


@pytest.mark.parametrize(
    ("version", "pod_failure_policy"),
    [
        (V1_20, False),
        ({"major": "1", "minor": "25"}, False),  # alpha, off by default
        ({"major": "1", "minor": "26+"}, True),  # cloud providers' "26+"
        (V1_37, True),
        ({"gitVersion": "v1.30.0-gke.1"}, True),  # no major/minor: from gitVersion
        ({"major": "2", "minor": "0"}, True),
        ({}, False),
        (None, False),
        ({"major": "one", "minor": "x", "gitVersion": "unknown"}, False),
    ],
)
def test_server_capabilities_from_the_version(version, pod_failure_policy):
    assert jobs.server_capabilities(version).pod_failure_policy is pod_failure_policy


def render(capabilities: jobs.ServerCapabilities = jobs.BASELINE, shard: int = 0, run: int = 1) -> dict[str, Any]:
    return jobs.render_job(name="bf", namespace="ns", uid=UID, spec=BackfillSpec.model_validate(SPEC),
                           shard=shard, run=run, capabilities=capabilities)


def test_the_1_20_job_is_unchanged_and_1_26_adds_only_the_pod_failure_policy():
    plain, modern = render(jobs.server_capabilities(V1_20)), render(MODERN)
    assert "podFailurePolicy" not in plain["spec"]
    policy = modern["spec"].pop("podFailurePolicy")
    assert modern == plain, "apart from the policy, both versions get the same Job"
    fail, ignore = policy["rules"]
    assert fail == {"action": "FailJob", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [2]}}
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert plain["spec"]["template"]["spec"]["restartPolicy"] == "Never", "podFailurePolicy requires Never"
    assert [c["name"] for c in plain["spec"]["template"]["spec"]["containers"]] == ["worker"]


def test_fail_job_exit_codes_are_exactly_the_permanent_errors():
    codes = jobs.permanent_exit_codes()
    assert codes == [2]
    for cls in error_classes():
        permanent = StallReason.of_worker(cls.reason).permanent
        assert (cls.exit_code in codes) is permanent, f"{cls.__name__} exits {cls.exit_code}"


def test_a_stored_job_fails_itself_only_if_the_server_kept_the_policy():
    assert jobs.fails_itself_on_permanent_error(render(MODERN))
    assert not jobs.fails_itself_on_permanent_error(render())  # 1.20, or a 1.2x server with the gate off
    wrong = render(MODERN)
    wrong["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] = [3]
    assert not jobs.fails_itself_on_permanent_error(wrong)


def observe(*, jobs_: list[dict[str, Any]], status: dict[str, Any] | None = None, pods: list[dict[str, Any]] | None = None,
            server: jobs.ServerCapabilities = jobs.BASELINE, raw_spec: dict[str, Any] | None = None) -> Observed:
    return Observed(
        name="bf", namespace="ns", uid=UID, generation=1, raw_spec=raw_spec or SPEC, annotations={},
        status=status or {}, jobs=jobs_, now="2026-12-02T00:00:00Z", secret=SecretCheck(True),
        pods=pods or [], server=server,
    )


@pytest.mark.parametrize(("version", "expected"), [(V1_20, False), (V1_37, True)])
def test_reconcile_renders_the_jobs_for_the_server_it_talks_to(version, expected):
    plan = reconcile(observe(jobs_=[], raw_spec={**SPEC, "parallelism": 2}, server=jobs.server_capabilities(version)))
    assert len(plan.create_jobs) == 2
    assert all(("podFailurePolicy" in j["spec"]) is expected for j in plan.create_jobs)


PERMANENT = {"phase": "Running", "run": 1, "shards": {"0": {
    "state": "failed", "lastError": "spec.set.nope: column does not exist", "lastErrorReason": "ValidationFailed", "run": 1}}}


def test_a_permanent_error_leaves_a_job_with_the_policy_to_fail_itself():
    with_policy = {**render(MODERN), "status": {"active": 1}}
    plan = reconcile(observe(jobs_=[with_policy], status=PERMANENT, server=MODERN))
    assert plan.status["phase"] == "Failed" and "spec.set.nope" in plan.status["message"]
    assert plan.delete_jobs == [], "the Job fails itself; its pod and logs stay"
    # A plain Job (1.20, or the gate off) is still stopped by the operator, as before.
    plain = {**render(), "status": {"active": 1}}
    assert reconcile(observe(jobs_=[plain], status=PERMANENT, server=MODERN)).delete_jobs == ["bf-s0-r1"]


def pod(name: str, *, shard: int = 0, run: int = 1, reason: str = "OOMKilled", last: bool = False,
        limit: str | None = "20Mi", created: str = "2026-12-02T00:00:01Z") -> dict[str, Any]:
    terminated = {"terminated": {"exitCode": 137, "reason": reason}}
    resources = {"limits": {"memory": limit}} if limit else {}
    return {
        "metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": created,
                     "labels": jobs.job_labels("bf", shard, run)},
        "spec": {"containers": [{"name": "worker", "resources": resources}]},
        "status": {"phase": "Failed" if not last else "Running", "containerStatuses": [
            {"name": "worker", "state": {"running": {}} if last else terminated, "lastState": terminated if last else {}}]},
    }


def test_oom_kills_are_read_from_the_jobs_own_pods():
    job = render(run=2)
    pods = [pod("b", run=2, created="2026-12-02T00:00:09Z"), pod("a", run=2, created="2026-12-02T00:00:01Z"),
            pod("other-run", run=1), pod("other-shard", shard=1, run=2), pod("error", run=2, reason="Error"),
            pod("restarted", run=2, last=True, created="2026-12-02T00:00:10Z")]
    kills = jobs.oom_kills(pods, job)
    assert [k.pod for k in kills] == ["a", "b", "restarted"]
    assert kills[0] == jobs.OomKill("a", "uid-a", "20Mi")
    assert "no memory limit set" in jobs.oom_message(jobs.oom_kills([pod("n", limit=None)], render())[0])
    assert not jobs.has_failed_pods([{"status": {"active": 1}}, {}])
    assert jobs.has_failed_pods([{"status": {"active": 1}}, {"status": {"failed": 1}}])


RUNNING = {"phase": "Running", "run": 1, "shards": {"0": {
    "state": "running", "run": 1, "updatedAt": "2026-12-02T00:00:00Z", "etaSeconds": 3, "rowsPerSecond": 90}}}
FAILED_JOB = {"failed": 2, "conditions": [
    {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}


def test_an_oom_killed_worker_is_named_while_its_job_retries():
    job = {**render(), "status": {"failed": 1, "active": 1}}
    plan = reconcile(observe(jobs_=[job], status=RUNNING, pods=[pod("p1")]))
    assert plan.status["phase"] == "Running"
    assert "worker pod p1 was OOMKilled" in plan.status["message"] and "20Mi" in plan.status["message"]
    assert "spec.worker.resources.limits.memory" in plan.status["message"] and "retries" in plan.status["message"]
    (event,) = [e for e in plan.events if e.reason == "OOMKilled"]
    assert event.type == "Warning" and event.key == "oom-uid-p1" and "p1" in event.message


def test_a_job_failed_by_oom_kills_fails_the_backfill_with_reason_oomkilled():
    job = {**render(), "status": FAILED_JOB}
    plan = reconcile(observe(jobs_=[job], status=RUNNING, pods=[pod("p1"), pod("p2", created="2026-12-02T00:00:20Z")]))
    assert plan.status["phase"] == "Failed"
    message = plan.status["message"]
    assert message.startswith("shard 0: worker pod p2 was OOMKilled") and "20Mi" in message, message
    conditions = {c["type"]: c for c in plan.status["conditions"]}
    assert conditions["Stalled"]["status"] == "True" and conditions["Stalled"]["reason"] == "OOMKilled"
    assert conditions["Ready"]["reason"] == "OOMKilled"
    assert {e.key for e in plan.events if e.reason == "OOMKilled"} == {"oom-uid-p1", "oom-uid-p2"}
    assert not plan.status["progress"].get("eta") and plan.status["progress"]["rowsPerSecond"] == 0
    assert any(e.type == "Warning" and e.reason == "Failed" and "OOMKilled" in e.message for e in plan.events)
    # Terminal (not recoverable): the next pass keeps it, without reading pods again.
    again = reconcile(observe(jobs_=[job], status={**RUNNING, **plan.status}))
    assert again.status["phase"] == "Failed" and again.status["message"] == message and not again.create_jobs
    assert not StallReason.OOM_KILLED.recoverable and not StallReason.OOM_KILLED.permanent


def test_the_workers_own_error_wins_over_an_earlier_oom_kill():
    status = {"phase": "Running", "run": 1, "shards": {"0": {
        "state": "failed", "lastError": "batch kept failing", "lastErrorReason": "RetriesExhausted", "run": 1}}}
    plan = reconcile(observe(jobs_=[{**render(), "status": FAILED_JOB}], status=status, pods=[pod("p1")]))
    assert plan.status["phase"] == "Failed" and "batch kept failing" in plan.status["message"]
    assert {c["type"]: c for c in plan.status["conditions"]}["Stalled"]["reason"] == "RetriesExhausted"


def test_a_job_the_server_refuses_stalls_until_fixed():
    refused = "the API server refused worker Job ns/bf-s0-r1: Kubernetes API 422 Invalid: ...; fix spec.worker"
    observed = observe(jobs_=[])
    plan = reconcile(Observed(**{**observed.__dict__, "job_rejected": refused}))
    assert plan.status["phase"] == "Pending" and plan.status["message"] == refused
    stalled = {c["type"]: c for c in plan.status["conditions"]}["Stalled"]
    assert stalled["status"] == "True" and stalled["reason"] == "JobRejected"
    assert any(e.type == "Warning" and e.reason == "JobRejected" for e in plan.events)
    assert StallReason.JOB_REJECTED.recoverable
    fixed = reconcile(observe(jobs_=[], status=plan.status))
    assert fixed.create_jobs and any(e.reason == "Resolved" for e in fixed.events)
