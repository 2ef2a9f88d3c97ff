"""deploy/: generated from rbac.py, valid Kubernetes objects, least privilege as specified."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from backfill_api.model import BackfillSpec
from backfill_operator import rbac
from backfill_operator.jobs import WorkerDefaults, render_job

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(rbac.DEPLOY_FILES))
def test_committed_deploy_files_equal_the_generated_ones(name):
    assert (ROOT / "deploy" / name).read_text() == rbac.render_deploy_file(name), "run: python -m backfill_operator.rbac deploy"


@pytest.mark.parametrize("version", ["1.25.0", kubernetes_validate.latest_version()])
def test_deploy_manifests_and_a_worker_job_are_valid_kubernetes_objects(version):
    docs = [d for name in rbac.DEPLOY_FILES for d in yaml.safe_load_all((ROOT / "deploy" / name).read_text())]
    spec = BackfillSpec.model_validate({"database": {"dsnSecretRef": {"name": "db"}}, "table": "t", "set": {"a": "1"}})
    docs.append(render_job(name="bf", namespace="ns", uid="u", spec=spec, shard=0, run=1, defaults=WorkerDefaults()))
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def _verbs(rules, group, resource):
    return {v for r in rules if group in r["apiGroups"] and resource in r["resources"] for v in r["verbs"]}


def test_least_privilege():
    op = rbac.OPERATOR_RULES
    assert _verbs(op, "", "secrets") == {"get"}, "the operator only checks that the DSN Secret exists"
    assert _verbs(op, "batch", "jobs") == {"get", "list", "watch", "create", "delete"}
    assert _verbs(op, "", "pods") == {"list"}, "pods are only listed, to name an OOM kill"
    assert "delete" not in _verbs(op, "backfill.dev", "backfills")
    worker = rbac.WORKER_RULES
    assert _verbs(worker, "backfill.dev", "backfills") == {"get", "list", "watch"}
    assert _verbs(worker, "backfill.dev", "backfills/status") == {"get", "patch"}
    assert not _verbs(worker, "", "secrets") and not _verbs(worker, "batch", "jobs")
    everything = [v for r in op + rbac.OPERATOR_CLUSTER_RULES + worker for v in r["verbs"]]
    assert "*" not in everything and all("*" not in r["resources"] for r in op + worker)


def test_operator_deployment_is_two_replicas_with_leader_election_and_liveness():
    docs = rbac.operator_manifests("x", "img")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    # A rollout surges a new pod before an old one goes: one replica stays up throughout.
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pod = deployment["spec"]["template"]["spec"]
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname" and term["labelSelector"]["matchLabels"] == rbac.SELECTOR
    container = pod["containers"][0]
    assert container["args"][:3] == ["operator", "--liveness", "http://0.0.0.0:8080/healthz"]
    assert "--leader-elect" in container["args"]
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in container["env"]
    role = next(d for d in docs if d["kind"] == "Role")
    assert role["metadata"]["namespace"] == "x" and _verbs(role["rules"], "coordination.k8s.io", "leases") == {"get", "create", "update"}
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"] and binding["subjects"][0]["name"] == rbac.OPERATOR_NAME
    pdb = rbac.disruption_budget("x")
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": rbac.SELECTOR}}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
