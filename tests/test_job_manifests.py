"""The Job manifests built from the kubernetes client's typed models equal the dicts the operator
rendered before (tests/data/job_manifests.json, written by the dict-based renderer), for
representative specs: defaults, every spec.worker field, the 1.26+ podFailurePolicy, a long name
without a service account."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_operator_pure import SPEC as BASE
from test_operator_pure import UID

from backfill_api.model import BackfillSpec
from backfill_operator import jobs

CASES: dict[str, dict[str, Any]] = {
    "defaults": {"spec": {}, "name": "customers-inactive", "shard": 0, "run": 1},
    "every-worker-field": {
        "spec": {"worker": {
            "image": "registry.example/backfill:1.2", "imagePullPolicy": "Always", "serviceAccountName": "shop-backfill",
            "resources": {"requests": {"cpu": "250m"}, "limits": {"cpu": "2", "memory": "1Gi"}},
            "nodeSelector": {"pool": "batch"},
            "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"},
                            {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute", "tolerationSeconds": 30}],
            "securityContext": {"runAsNonRoot": True, "runAsUser": 4242, "capabilities": {"drop": ["ALL"]}},
            "podSecurityContext": {"runAsNonRoot": True, "fsGroup": 2000},
            "backoffLimit": 2, "activeDeadlineSeconds": 3600,
        }},
        "name": "b", "shard": 3, "run": 7,
    },
    "pod-failure-policy": {"spec": {"parallelism": 4}, "name": "bf", "shard": 2, "run": 3, "pod_failure_policy": True},
    "long-name-no-service-account": {
        "spec": {"worker": {"resources": {}}}, "name": "a-very-long-backfill-name-that-needs-to-be-truncated-" + "x" * 20,
        "shard": 11, "run": 120, "no_service_account": True,
    },
}

GOLDEN = json.loads((Path(__file__).parent / "data" / "job_manifests.json").read_text())


def render(case: dict) -> dict:
    defaults = jobs.WorkerDefaults(service_account_name=None) if case.get("no_service_account") else jobs.DEFAULT_WORKER
    capabilities = jobs.ServerCapabilities(pod_failure_policy=case.get("pod_failure_policy", False))
    return jobs.render_job(
        name=case["name"], namespace="shop", uid=UID, spec=BackfillSpec.model_validate({**BASE, **case["spec"]}),
        shard=case["shard"], run=case["run"], defaults=defaults, capabilities=capabilities,
    )


def test_every_case_has_its_golden_manifest():
    assert sorted(GOLDEN) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_typed_job_equals_the_dict_it_replaced(case: str):
    rendered = render(CASES[case])
    assert rendered == GOLDEN[case]
    assert json.loads(json.dumps(rendered)) == rendered  # plain JSON types only (no tuples, no models)


def test_the_pod_failure_policy_is_the_same_wire_form():
    assert jobs.pod_failure_policy() == GOLDEN["pod-failure-policy"]["spec"]["podFailurePolicy"]
