"""What the API server itself enforces, on the cluster under test (1.20 and today's Kubernetes):
the CRD as the server stored it (every CEL rule accepted within the cost budget on >= 1.25),
each immutability rule enforced by the server, the status subresource, and the chart's RBAC.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from e2e_support import NS, RELEASE, RELEASE_NS, ROOT, Cluster, CommandFailed

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CRD_FILE = ROOT / "charts" / "backfill-operator" / "crds" / "backfill.dev_backfills.yaml"
NAME = "cel-probe"


def spec_schema(crd: dict[str, Any]) -> dict[str, Any]:
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return dict(version["schema"]["openAPIV3Schema"]["properties"]["spec"])


def probe_backfill() -> dict[str, Any]:
    # Its Secret does not exist: the operator only marks it Stalled (SecretNotFound), no Job runs.
    return {
        "apiVersion": "backfill.dev/v1alpha1",
        "kind": "Backfill",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "database": {"dsnSecretRef": {"name": "no-such-secret", "key": "dsn"}},
            "table": "public.t",
            "set": {"c": "1"},
            "where": "c IS NULL",
            "parallelism": 1,
            "checkpoint": {"schema": "backfill"},
        },
    }


# One edit per immutable field (all rules of the CRD), as a JSON merge patch of spec.
IMMUTABLE_EDITS: dict[str, dict[str, Any]] = {
    "database": {"database": {"dsnSecretRef": {"name": "other-secret"}}},
    "table": {"table": "public.other"},
    "walk": {"walk": "ctid"},
    "set": {"set": {"c": "2"}},
    # Another kind instead of set (null removes set: exactly one kind stays given).
    "delete": {"set": None, "delete": {}},
    "copy": {"set": None, "copy": {"table": "public.other", "onConflict": "doNothing"}},
    "from": {"from": [{"table": "public.other", "alias": "o", "condition": "o.id = t.id"}]},
    "handler": {"set": None, "handler": {"callable": "shop.backfills:fix"}},  # a handler instead of set (issue 11)
    "where": {"where": "c = 0"},
    "parallelism": {"parallelism": 2},
    "checkpoint": {"checkpoint": {"schema": "other"}},
}


@pytest.fixture
def probe(operator_release: Cluster) -> Any:
    operator_release.apply(probe_backfill())
    yield operator_release
    operator_release.kubectl("-n", NS, "delete", "bf", NAME, "--ignore-not-found", "--wait=true")


def test_crd_as_stored_by_the_server(operator_release: Cluster) -> None:
    cluster = operator_release
    stored = json.loads(cluster.kubectl("get", "crd", "backfills.backfill.dev", "-o", "json"))
    assert {c["type"]: c["status"] for c in stored["status"]["conditions"]}.get("Established") == "True"
    shipped = spec_schema(yaml.safe_load(CRD_FILE.read_text()))
    rules = [r["rule"] for r in spec_schema(stored).get("x-kubernetes-validations") or []]
    if cluster.server_minor() >= 25:
        # Accepted as shipped: none rejected for cost ("estimated rule cost exceeds budget").
        assert rules == [r["rule"] for r in shipped["x-kubernetes-validations"]]
        assert set(IMMUTABLE_EDITS) == {r.split("(self.", 1)[1].split(")", 1)[0] for r in rules}
    else:
        assert rules == [], "servers before 1.25 drop x-kubernetes-validations"


def test_every_immutability_rule_is_enforced_by_the_server(probe: Cluster) -> None:
    cluster = probe
    if cluster.server_minor() < 25:
        pytest.skip("CEL validation rules need Kubernetes >= 1.25 (the operator enforces immutability itself)")
    for field, edit in IMMUTABLE_EDITS.items():
        with pytest.raises(CommandFailed, match=f"spec.{field} is immutable"):
            cluster.patch_spec(NAME, edit)
    # Removing an optional field is an edit too.
    with pytest.raises(CommandFailed, match="spec.where is immutable"):
        cluster.kubectl("-n", NS, "patch", "bf", NAME, "--type=json", "-p", '[{"op": "remove", "path": "/spec/where"}]')
    # Fields that tune a run stay editable.
    cluster.patch_spec(NAME, {"batch": {"size": 500}, "limits": {"maxRowsPerSecond": 10}, "suspend": True})
    spec = cluster.get("bf", NAME)["spec"]
    assert spec["batch"]["size"] == 500 and spec["suspend"] is True and spec["table"] == "public.t"


def test_status_subresource(probe: Cluster) -> None:
    cluster = probe
    # The operator marks it Stalled (no Secret): its status writes go through the subresource.
    status = cluster.wait_until(
        lambda: (s := cluster.status(NAME)) and any(c["type"] == "Stalled" and c["status"] == "True"
                                                     for c in s.get("conditions") or []) and s,
        "Stalled=True (SecretNotFound) from the operator", timeout=120,
    )
    assert "no-such-secret" in status["message"] or "Secret" in status["message"]
    # A write to .status through the main resource is ignored; through /status it lands (the
    # server's response shows it; the operator may rewrite its own field right after).
    main = cluster.kubectl("-n", NS, "patch", "bf", NAME, "--type=merge", "-p", '{"status":{"run":99}}', "-o", "json")
    assert json.loads(main)["status"].get("run") != 99
    sub = cluster.kubectl("-n", NS, "patch", "bf", NAME, "--subresource=status", "--type=merge",
                          "-p", '{"status":{"run":99}}', "-o", "json")
    assert json.loads(sub)["status"]["run"] == 99


def can(cluster: Cluster, who: str, verb: str, resource: str, namespace: str = NS) -> bool:
    resource, _, sub = resource.partition("/")  # "x/status" alone would mean the object named status
    args = ["auth", "can-i", f"--as={who}", "-n", namespace, verb, resource] + ([f"--subresource={sub}"] if sub else [])
    out = cluster.kubectl(*args, check=False)
    return out.strip() == "yes"


def test_the_charts_rbac_on_the_server(operator_release: Cluster) -> None:
    cluster = operator_release
    operator_sa = f"system:serviceaccount:{RELEASE_NS}:{RELEASE}"
    worker_sa = f"system:serviceaccount:{NS}:backfill-worker"
    assert can(cluster, operator_sa, "create", "jobs.batch")
    assert can(cluster, operator_sa, "patch", "backfills.backfill.dev")
    assert can(cluster, operator_sa, "patch", "backfills.backfill.dev/status")
    assert can(cluster, operator_sa, "get", "secrets")
    assert not can(cluster, operator_sa, "list", "secrets"), "the operator reads one named Secret, never lists them"
    assert not can(cluster, operator_sa, "delete", "backfills.backfill.dev")
    assert can(cluster, operator_sa, "list", "pods"), "to name an OOM-killed worker"
    assert not can(cluster, operator_sa, "get", "pods/log") and not can(cluster, operator_sa, "delete", "pods")
    assert can(cluster, worker_sa, "patch", "backfills.backfill.dev/status")
    assert can(cluster, worker_sa, "get", "backfills.backfill.dev")
    assert not can(cluster, worker_sa, "patch", "backfills.backfill.dev"), "workers write status only"
    assert not can(cluster, worker_sa, "create", "jobs.batch")
    assert not can(cluster, worker_sa, "get", "secrets")
