"""The kubectl plugin's pure parts: exit codes, status tables, throttle explanations, merged logs,
403 messages, the plan pod and the redacted report (no cluster: tests/test_kubectl_plugin_kube.py
runs the commands against a real kube-apiserver, tests/e2e/test_kubectl_plugin_e2e.py on a kubelet)."""

from __future__ import annotations

import base64
import io
import tarfile
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml

from backfill_api.model import BackfillSpec
from backfill_api.specdiff import APPLIED_SPEC_ANNOTATION, encode_applied, immutable_view
from backfill_api.status import BackfillStatus, Phase
from backfill_kubectl import plan_pod, report, view
from backfill_kubectl.view import Exit
from backfill_operator.jobs import DSN_ENV, render_job

NOW = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)


def backfill(phase: str | None = None, *, generation: int = 1, observed: int | None = 1, shards: dict[str, Any] | None = None,
             progress: dict[str, Any] | None = None, spec: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"metadata": {"name": "orders", "namespace": "shop", "generation": generation,
                                         "creationTimestamp": (NOW - timedelta(minutes=5)).isoformat()},
                            "spec": {"table": "orders", "set": {"a": "1"}, "parallelism": 2, **(spec or {})}, "status": dict(status)}
    if phase is not None:
        body["status"]["phase"] = phase
    if observed is not None:
        body["status"]["observedGeneration"] = observed
    if shards is not None:
        body["status"]["shards"] = shards
    if progress is not None:
        body["status"]["progress"] = progress
    return body


# -- exit codes and waiting -----------------------------------------------------------------------


@pytest.mark.parametrize(("phase", "code"), [
    ("Succeeded", Exit.SUCCEEDED), ("Failed", Exit.FAILED), ("Paused", Exit.PAUSED), ("Running", Exit.IN_PROGRESS),
    ("Pending", Exit.IN_PROGRESS), (None, Exit.IN_PROGRESS),
])
def test_status_exit_code_from_the_phase(phase, code):
    assert view.phase_exit(view.observed_phase(backfill(phase))) is code


def test_exit_codes_are_distinct_and_documented():
    assert len({int(e) for e in Exit}) == len(Exit)
    for code in Exit:
        assert f"{int(code)} " in view.EXIT_CODES_HELP


def test_a_phase_from_an_older_generation_is_not_trusted():
    stale = backfill("Failed", generation=3, observed=2)
    assert view.observed_phase(stale) is None
    assert view.wait_outcome(stale, Phase.PAUSED) is None  # right after `retry` patched suspend: keep waiting
    assert view.wait_outcome(backfill("Paused", generation=3, observed=3), Phase.PAUSED) is Exit.SUCCEEDED


@pytest.mark.parametrize(("phase", "target", "outcome"), [
    ("Succeeded", Phase.SUCCEEDED, Exit.SUCCEEDED),
    ("Failed", Phase.SUCCEEDED, Exit.FAILED),
    ("Failed", Phase.FAILED, Exit.SUCCEEDED),
    ("Succeeded", Phase.FAILED, Exit.OTHER_END),
    ("Succeeded", Phase.PAUSED, Exit.OTHER_END),
    ("Running", Phase.SUCCEEDED, None),
    ("Paused", Phase.SUCCEEDED, None),
    ("Running", Phase.RUNNING, Exit.SUCCEEDED),
])
def test_wait_outcome(phase, target, outcome):
    assert view.wait_outcome(backfill(phase), target) is outcome


def test_retry_applies_only_to_a_failed_backfill():
    assert view.retry_refusal(backfill("Failed")) is None
    assert "kubectl backfill resume orders" in (view.retry_refusal(backfill("Paused")) or "")
    assert "Running, not Failed" in (view.retry_refusal(backfill("Running")) or "")


# -- tables -----------------------------------------------------------------------------------------


def test_shard_rows_show_each_shard_with_its_progress_and_throttle():
    status = BackfillStatus.parse(backfill("Running", shards={
        "0": {"state": "running", "rowsUpdated": 120, "batches": 6, "batchSize": 20, "rowsPerSecond": 50.5, "percent": 40,
              "estimatedKeys": 300, "keysDone": 120, "lastKey": ["120"], "etaSeconds": 90, "throttleReason": "maxRowsPerSecond", "run": 2},
        "1": {"state": "done", "rowsUpdated": 300, "batches": 15, "percent": 99, "run": 1},
    })["status"])
    rows = view.shard_rows(status, 2)
    assert rows[0] == ["0", "running", "40%", "120/300", "120", "120", "6", "20", "50.5/s", "1m30s", "maxRowsPerSecond", "2", "-"]
    assert rows[1][:3] == ["1", "done", "100%"]
    assert len(view.shard_rows(BackfillStatus(), 3)) == 3  # shards that never reported show as pending
    assert view.shard_rows(BackfillStatus(), 3)[2][1] == "pending"


def test_throttle_lines_say_what_waits_and_why():
    status = BackfillStatus.parse(backfill("Running", shards={
        "0": {"state": "running", "throttleReason": "window", "nextWindowStart": "2026-12-07T22:00:00Z",
              "throttledSeconds": {"window": 125.0, "pause": 0.2}},
        "1": {"state": "running", "batchSize": 500, "throttleReason": "",
              "impact": {"summary": "duty 35% (throughput 1.10)", "limitedBy": "throughput", "pressure": 0.93, "pauseMs": 120,
                         "batchTargetMs": 20, "throughputRatio": 0.91, "applicationPresent": True}},
    })["status"])
    first, second, impact = view.throttle_lines(status, 2)
    assert first.startswith("shard 0: waiting — spec.schedule: outside every run window; the next window opens at 2026-12-07T22:00:00Z")
    assert "window 2m5s" in first and "pause" not in first.split("waited:")[1]
    assert second == "shard 1: not waiting (batch size 500)"
    assert "limited by throughput" in impact and "pause 120 ms" in impact and "throughput ratio 0.91" in impact
    assert view.throttle_lines(BackfillStatus.parse(backfill("Succeeded", shards={"0": {"state": "done"}})["status"]), 1) == []


def test_every_throttle_reason_has_an_explanation():
    from backfill_api.status import ThrottleReason

    assert set(view.THROTTLE_WHY) == set(ThrottleReason)


def test_list_rows_with_and_without_namespaces():
    items = [backfill("Running", progress={"percent": 40, "rowsUpdated": 420, "rowsPerSecond": 50, "eta": "1m", "throttleReason": "pause"},
                      shards={"1": {"state": "done"}}, message="40% done")]
    row = view.list_rows(items, NOW)[0]
    assert row == ["orders", "Running", "40%", "420", "50/s", "1m", "1/2", "pause", "5m", "40% done"]
    assert view.list_rows(items, NOW, namespaces=True)[0][:2] == ["shop", "orders"]


def test_last_events_are_the_newest_oldest_first():
    events = [{"type": "Normal", "reason": f"R{i}", "message": str(i), "lastTimestamp": (NOW - timedelta(seconds=100 - i)).isoformat()}
              for i in range(15)]
    rows = view.event_rows(list(reversed(events)), NOW, limit=3)
    assert [r[2] for r in rows] == ["R12", "R13", "R14"]
    assert rows[-1][0] == "86s"


def test_pod_rows_name_the_shard_run_and_container_state():
    pod = {"metadata": {"name": "orders-s1-r2-abc", "labels": {"backfill.dev/shard": "1", "backfill.dev/run": "2"},
                        "creationTimestamp": (NOW - timedelta(hours=3)).isoformat()},
           "spec": {"nodeName": "node-1"},
           "status": {"phase": "Failed", "containerStatuses": [{"restartCount": 0, "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]}}
    assert view.pod_rows([pod], NOW) == [["orders-s1-r2-abc", "1", "2", "Failed", "terminated: OOMKilled (exit 137)", "0", "node-1", "3h"]]
    waiting = {**pod, "status": {"phase": "Pending", "containerStatuses": [{"state": {"waiting": {"reason": "ImagePullBackOff"}}}]}}
    assert view.container_state(waiting) == "waiting: ImagePullBackOff"


def test_status_document_carries_the_exit_code_for_ci():
    document = view.status_document(backfill("Failed", message="shard 0: boom"), [], [])
    assert (document["phase"], document["exitCode"], document["message"]) == ("Failed", 1, "shard 0: boom")
    yaml.safe_dump(document)  # serialisable as it is


# -- logs -----------------------------------------------------------------------------------------


def test_merge_logs_orders_by_kubelet_timestamp_and_prefixes_the_shard():
    merged = view.merge_logs({
        "[shard 0 run 1]": ["2026-12-07T12:00:01.000000001Z a", "2026-12-07T12:00:03.5Z c", "continued without stamp"],
        "[shard 1 run 1]": ["2026-12-07T12:00:02.123456789Z b", "2026-12-07T12:00:04Z d"],
    })
    assert [line.render() for line in merged] == [
        "[shard 0 run 1] a", "[shard 1 run 1] b", "[shard 0 run 1] c", "[shard 0 run 1] continued without stamp", "[shard 1 run 1] d",
    ]


def test_select_shard_by_label():
    pods = [{"metadata": {"name": n, "labels": {"backfill.dev/shard": s, "backfill.dev/run": "1"}}} for n, s in (("b", "1"), ("a", "0"))]
    assert [p["metadata"]["name"] for p in view.select_shard(pods, None)] == ["a", "b"]
    assert [p["metadata"]["name"] for p in view.select_shard(pods, 1)] == ["b"]
    assert view.shard_prefix(pods[0]) == "[shard 1 run 1]"


# -- errors ---------------------------------------------------------------------------------------


def test_forbidden_names_the_verb_the_resource_the_namespace_and_the_user():
    api = ('backfills.backfill.dev "orders" is forbidden: User "system:serviceaccount:shop:viewer" cannot patch resource '
           '"backfills" in API group "backfill.dev" in the namespace "shop"')
    message = view.describe_forbidden("get", "backfills.backfill.dev", "shop", api)
    assert message == ('permission denied: cannot patch backfills.backfill.dev in namespace "shop" as '
                       '"system:serviceaccount:shop:viewer"; ask for a RoleBinding granting "patch" on "backfills.backfill.dev"')
    # Without the server's wording, what the request was is said.
    assert view.describe_forbidden("list", "pods", "shop", "forbidden").startswith('permission denied: cannot list pods in namespace "shop"')
    assert "(cluster-wide)" in view.describe_forbidden("list", "backfills.backfill.dev", None, "")


# -- the plan pod -----------------------------------------------------------------------------------

SPEC = {"database": {"dsnSecretRef": {"name": "orders-db", "key": "dsn"}}, "table": "orders", "set": {"state": "'x'"},
        "worker": {"serviceAccountName": "custom-sa"}}


def test_the_plan_pod_is_the_worker_pod_running_plan_on_the_manifest():
    manifest = plan_pod.plan_manifest("orders", "shop", SPEC)
    pod = plan_pod.render_plan_pod(manifest, pod_name="orders-plan-x")
    worker = render_job(name="orders", namespace="shop", uid="u", spec=BackfillSpec.model_validate(SPEC), shard=0, run=1)
    worker_container = worker["spec"]["template"]["spec"]["containers"][0]
    container = pod["spec"]["containers"][0]
    assert container["args"] == ["plan", "/etc/backfill-plan/backfill.yaml"]
    assert container["image"] == worker_container["image"] and container["securityContext"] == worker_container["securityContext"]
    dsn = next(e for e in container["env"] if e["name"] == DSN_ENV)
    assert dsn == {"name": DSN_ENV, "valueFrom": {"secretKeyRef": {"name": "orders-db", "key": "dsn"}}}
    assert pod["spec"]["serviceAccountName"] == "custom-sa" and pod["spec"]["restartPolicy"] == "Never"
    assert "backfill.dev/name" not in pod["metadata"]["labels"]  # not a worker: `logs` and the operator ignore it
    item = pod["spec"]["volumes"][0]["downwardAPI"]["items"][0]
    assert item["fieldRef"]["fieldPath"] == f"metadata.annotations['{plan_pod.MANIFEST_ANNOTATION}']"
    shipped = yaml.safe_load(pod["metadata"]["annotations"][plan_pod.MANIFEST_ANNOTATION])
    assert shipped == {"apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": "orders", "namespace": "shop"}, "spec": SPEC}


def test_the_plan_uses_the_spec_the_workers_run():
    applied = {APPLIED_SPEC_ANNOTATION: encode_applied(immutable_view(BackfillSpec.model_validate(SPEC)))}
    edited = {**SPEC, "set": {"state": "'edited'"}}
    assert plan_pod.plan_manifest("orders", "shop", edited, applied)["spec"]["set"] == {"state": "'x'"}


def test_plan_pod_settings_follow_the_newest_worker_job():
    job = {"spec": {"template": {"spec": {"serviceAccountName": "chart-sa", "containers": [
        {"name": "worker", "image": "registry/backfill:1.2", "imagePullPolicy": "Never"}]}}}}
    defaults = plan_pod.defaults_from_job(job)
    assert (defaults.image, defaults.image_pull_policy, defaults.service_account_name) == ("registry/backfill:1.2", "Never", "chart-sa")
    assert plan_pod.defaults_from_job(None, "mine:1").image == "mine:1"
    spec = {k: v for k, v in SPEC.items() if k != "worker"}
    pod = plan_pod.render_plan_pod(plan_pod.plan_manifest("o", "shop", spec), defaults=defaults)
    assert pod["spec"]["serviceAccountName"] == "chart-sa" and pod["spec"]["containers"][0]["imagePullPolicy"] == "Never"


def test_an_invalid_spec_or_no_secret_ref_is_refused_before_any_pod():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        plan_pod.render_plan_pod(plan_pod.plan_manifest("o", "shop", {**SPEC, "batch": {"size": 0}}))
    with pytest.raises(ValueError, match="dsnSecretRef is required"):
        plan_pod.render_plan_pod(plan_pod.plan_manifest("o", "shop", {"table": "t", "set": {"a": "1"}}))


@pytest.mark.parametrize(("status", "outcome"), [
    ({"phase": "Pending"}, (False, None, "")),
    ({"phase": "Running", "containerStatuses": [{"state": {"running": {}}}]}, (False, None, "")),
    ({"phase": "Succeeded", "containerStatuses": [{"state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}, (True, 0, "Completed")),
    ({"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}, (True, 1, "Error")),
    ({"phase": "Pending", "containerStatuses": [{"state": {"waiting": {"reason": "CreateContainerConfigError",
                                                                       "message": 'secret "x" not found'}}}]},
     (True, None, 'CreateContainerConfigError: secret "x" not found')),
])
def test_plan_pod_outcome(status, outcome):
    assert plan_pod.pod_outcome({"status": status}) == outcome


# -- the report -----------------------------------------------------------------------------------

CANARY = "canary-Pw-7f3a9Q"


@pytest.mark.allow_secret_output
def test_report_redacts_the_secret_values_and_dsn_passwords_everywhere():
    dsn = f"postgresql://app:{CANARY}@db.shop:5432/orders"
    secret = {"data": {"dsn": base64.b64encode(dsn.encode()).decode(), "other": base64.b64encode(b"token-XYZ-123").decode()}}
    secrets = view.secret_values(secret)
    assert CANARY in secrets and dsn in secrets and "token-XYZ-123" in secrets
    leaky = f"connection to {dsn} failed; password={CANARY} ; token-XYZ-123"
    collected = report.Collected(
        backfill={**backfill("Failed", message=leaky), "metadata": {"name": "orders", "managedFields": [{"x": 1}]}},
        status_text=leaky, events=[{"message": leaky}], worker_logs={"orders-s0-r1-a": leaky},
        operator_logs={"op": f"kv dsn host=db password={CANARY}"}, versions={"plugin": "0.1.0"}, plan=leaky,
        problems=["Secret not readable"],
    )
    files = report.report_files(collected, secrets)
    assert {"backfill.yaml", "status.txt", "events.yaml", "logs/workers/orders-s0-r1-a.log", "logs/operator/op.log", "plan.txt",
            "versions.json", "README.txt"} <= set(files)
    buffer = io.BytesIO()
    report.write_archive(files, buffer)
    raw = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as archive:
        contents = b"".join(archive.extractfile(m).read() for m in archive.getmembers())  # type: ignore[union-attr]
    for value in (CANARY, "token-XYZ-123"):
        assert value.encode() not in contents
    assert b"***" in contents and b"managedFields" not in contents and b"Secret not readable" in contents
    # Without the Secret's values, a DSN-shaped password is still masked.
    assert CANARY.encode() not in report.report_files(collected, [])["logs/operator/op.log"]
    assert CANARY.encode() not in report.report_files(collected, [])["status.txt"]


def test_events_of_the_same_second_keep_the_order_they_were_stored_in():
    same = NOW.isoformat()
    events = [{"reason": r, "lastTimestamp": same, "metadata": {"resourceVersion": v}} for r, v in (("Running", "310"), ("Pending", "99"), ("JobCreated", "120"))]
    assert [e["reason"] for e in view.last_events(events)] == ["Pending", "JobCreated", "Running"]
