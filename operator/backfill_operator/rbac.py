"""Least-privilege RBAC rules as data (PURE): the one source for ``deploy/`` and the tests.

Operator: watch Backfills and write their status and the applied-spec annotation; create, read
and delete worker Jobs; post Events; read Secrets only to check the DSN Secret exists with its
key (the value is never read out); list worker pods (to name an OOM kill). kopf itself needs to
list/watch namespaces and CRDs when it runs cluster-wide (discovery of new namespaces and the CRD).
Worker: read its Backfill (spec polling) and patch its status (progress mirror).
"""

from __future__ import annotations

from typing import Any

from backfill_api.model import API_GROUP, PLURAL

Rule = dict[str, list[str]]

OPERATOR_RULES: list[Rule] = [
    {"apiGroups": [API_GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [API_GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch", "update"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "delete"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    # Only to say why a worker pod failed (OOMKilled): its container status is on the pod.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
]
"""Namespaced part: a Role per watched namespace, or a ClusterRole for all namespaces."""

OPERATOR_CLUSTER_RULES: list[Rule] = [
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
]
"""Only for cluster-wide mode (kopf's namespace and CRD scanning)."""

LEASE_RULES: list[Rule] = [
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
]
"""Leader election: a Role in the operator's own namespace (the Lease lives there)."""

WORKER_RULES: list[Rule] = [
    {"apiGroups": [API_GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [API_GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch"]},
]

OPERATOR_NAME = "backfill-operator"
WORKER_NAME = "backfill-worker"
LABELS = {"app.kubernetes.io/name": "backfill-operator", "app.kubernetes.io/part-of": "backfill-operator"}


def _meta(name: str, namespace: str | None = None, component: str = "operator") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {**LABELS, "app.kubernetes.io/component": component}}
    if namespace:
        meta["namespace"] = namespace
    return meta


def lease_manifests(namespace: str) -> list[dict[str, Any]]:
    """The leader-election Role and RoleBinding in the operator's namespace."""
    name = f"{OPERATOR_NAME}-leader-election"
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(name, namespace), "rules": LEASE_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(name, namespace),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_NAME, "namespace": namespace}]},
    ]


SELECTOR = {"app.kubernetes.io/name": "backfill-operator", "app.kubernetes.io/component": "operator"}


def operator_manifests(namespace: str, image: str) -> list[dict[str, Any]]:
    """Cluster-wide operator: ServiceAccount, ClusterRole(+Binding), two-replica Deployment with
    leader election, and its Lease Role(+Binding)."""
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(OPERATOR_NAME, namespace)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": _meta(OPERATOR_NAME),
         "rules": OPERATOR_RULES + OPERATOR_CLUSTER_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": _meta(OPERATOR_NAME),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": OPERATOR_NAME},
         "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_NAME, "namespace": namespace}]},
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(OPERATOR_NAME, namespace),
            "spec": {
                # Two replicas, one active (the Lease holder). A rollout adds the new pod before
                # removing an old one: the standby is warm when the leader goes.
                "replicas": 2,
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "selector": {"matchLabels": SELECTOR},
                "template": {
                    "metadata": {"labels": {**LABELS, "app.kubernetes.io/component": "operator"}},
                    "spec": {
                        "serviceAccountName": OPERATOR_NAME,
                        # Spread over nodes where it can: losing one node leaves a replica.
                        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                            "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                               "labelSelector": {"matchLabels": SELECTOR}}}]}},
                        # A graceful stop releases the Lease: the standby leads within a retry period.
                        "terminationGracePeriodSeconds": 30,
                        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
                        "containers": [{
                            "name": "operator",
                            "image": image,
                            "command": ["backfill"],
                            "args": ["operator", "--liveness", "http://0.0.0.0:8080/healthz", "--metrics-port", "9090",
                                     "--leader-elect"],
                            "env": [
                                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                                {"name": "BACKFILL_WORKER_IMAGE", "value": image},
                                {"name": "BACKFILL_LOG_FORMAT", "value": "json"},
                            ],
                            "ports": [{"name": "healthz", "containerPort": 8080}, {"name": "metrics", "containerPort": 9090}],
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "healthz"}, "periodSeconds": 20, "timeoutSeconds": 5},
                            # 1,000 Backfills: 223 MiB peak measured (docs/testing.md).
                            "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
                            "securityContext": {
                                "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                            },
                        }],
                    },
                },
            },
        },
        *lease_manifests(namespace),
    ]


def disruption_budget(namespace: str) -> dict[str, Any]:
    """A drain never takes both replicas at once (policy/v1: Kubernetes 1.21+, hence a file of its own)."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(OPERATOR_NAME, namespace),
            "spec": {"minAvailable": 1, "selector": {"matchLabels": SELECTOR}}}


def worker_manifests(namespace: str) -> list[dict[str, Any]]:
    """Per namespace that runs Backfills: the workers' ServiceAccount, Role and RoleBinding."""
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(WORKER_NAME, namespace, "worker")},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(WORKER_NAME, namespace, "worker"),
         "rules": WORKER_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(WORKER_NAME, namespace, "worker"),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": WORKER_NAME},
         "subjects": [{"kind": "ServiceAccount", "name": WORKER_NAME, "namespace": namespace}]},
    ]


DEFAULT_IMAGE = "ghcr.io/backfill-dev/backfill-operator:0.1.0"
DEPLOY_FILES = {
    "operator.yaml": lambda: operator_manifests("backfill-system", DEFAULT_IMAGE),
    "worker-rbac.yaml": lambda: worker_manifests("default"),
    "pdb.yaml": lambda: [disruption_budget("backfill-system")],
}


def render(documents: list[dict[str, Any]], header: str) -> str:
    import yaml

    return header + "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in documents)


def render_deploy_file(name: str) -> str:
    header = (
        "# Generated from operator/backfill_operator/rbac.py (python -m backfill_operator.rbac deploy/). Do not edit.\n"
        + ("# Namespace backfill-system must exist: kubectl create namespace backfill-system\n" if name == "operator.yaml"
           else "# Kubernetes 1.21+ (policy/v1): keeps one operator replica up during a node drain.\n" if name == "pdb.yaml"
           else "# One copy per namespace that runs Backfills: change `namespace: default`.\n")
    )
    return render(DEPLOY_FILES[name](), header)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "deploy")
    for file_name in DEPLOY_FILES:
        (target / file_name).write_text(render_deploy_file(file_name))
