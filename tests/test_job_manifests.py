"""The Job manifests built from the kubernetes client's typed models equal the dicts the operator
rendered before (tests/data/job_manifests.json, written by the dict-based renderer), for
representative specs: defaults, every spec.worker field, the 1.26+ podFailurePolicy, a long name
without a service account."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from job_manifest_cases import BASE, CASES, UID

from backfill_api.model import BackfillSpec
from backfill_operator import jobs

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
