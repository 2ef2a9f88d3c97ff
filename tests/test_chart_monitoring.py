"""The chart's alert rules and Grafana dashboard only use metrics and labels that really exist.

Every PromQL expression is parsed (promql-parser); every metric it selects must be one the worker
(``WorkerMetrics``) or the operator (``OperatorMetrics``) exports, and every label it groups or
matches by must be a label of those metrics. A renamed metric breaks this test, not a dashboard.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

promql = pytest.importorskip("promql_parser", reason="promql-parser is a test dependency")

import helm_binary  # noqa: E402

from backfill_worker.observe.events import BatchCommitted, ReplicationLagObserved, RetryScheduled, RunStarted, Throttled  # noqa: E402
from backfill_worker.observe.worker_metrics import WorkerMetrics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "backfill-operator"
DASHBOARD = CHART / "dashboards" / "backfill-operator.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Grafana replaces these before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


@pytest.fixture(scope="module")
def helm() -> Path:
    return helm_binary.helm_or_skip()


def exported_metrics() -> dict[str, set[str]]:
    """Sample name -> label names, from real registries fed with real events."""
    worker = WorkerMetrics(process_metrics=False)
    identity = "shop/bf"
    worker(RunStarted(identity, 0, 1, resumed=False, rows_updated=0, estimated_keys=10, keys_done=0))
    worker(BatchCommitted(identity, 0, 1, 1, 1, 1, 1, 0.01, ("1",), 1, 1))
    worker(Throttled(identity, 0, "pause", 0.1))
    worker(ReplicationLagObserved(identity, 0, 1.0))
    worker(RetryScheduled(identity, 0, "deadlock", 1, 0.1, 1, "x"))
    registries = [worker.registry]
    try:
        from backfill_operator.metrics import OperatorMetrics

        operator = OperatorMetrics()
        operator.reconciles.labels("ok").inc()
        operator.errors.labels("api").inc()
        operator.jobs_created.inc()
        registries.append(operator.registry)
    except ImportError:  # the operator issue's module; its metrics are then simply unknown
        pass
    found: dict[str, set[str]] = {}
    for registry in registries:
        for family in registry.collect():
            for sample in family.samples:
                found.setdefault(sample.name, set()).update(sample.labels)
    return found


def selected(expression: str) -> tuple[set[str], set[str]]:
    """Metric names selected and label names used (by/without, on/ignoring, matchers)."""
    for variable, value in GRAFANA_VARIABLES.items():
        expression = expression.replace(variable, value)
    tree = promql.parse(expression)
    metrics: set[str] = set()
    labels: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql.VectorSelector):
            metrics.add(node.name)
            labels.update(m.name for m in node.matchers.matchers)
        elif isinstance(node, promql.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)
        elif isinstance(node, promql.BinaryExpr) and node.modifier is not None and node.modifier.matching is not None:
            labels.update(node.modifier.matching.labels)

    promql.walk(tree, visit)
    return metrics, labels


def check(expression: str, exported: dict[str, set[str]], where: str) -> None:
    metrics, labels = selected(expression)
    assert metrics, f"{where}: selects no metric"
    allowed = {"le"}
    for metric in metrics:
        assert metric in exported, f"{where}: {metric} is not exported by the worker or the operator"
        allowed |= exported[metric]
    assert labels <= allowed, f"{where}: labels {sorted(labels - allowed)} do not exist on {sorted(metrics)}"


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = [(f"panel {p['title']!r}", t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict) and (match := re.fullmatch(r"label_values\((.*), (\w+)\)", query["query"])):
            found.append((f"variable {variable['name']}", match[1]))
    return found


def test_dashboard_queries_use_exported_metrics_and_labels():
    exported = exported_metrics()
    queries = dashboard_expressions()
    assert len(queries) >= 10
    for where, expression in queries:
        check(expression, exported, where)
    # The variables the panels filter on are defined.
    dashboard = json.loads(DASHBOARD.read_text())
    names = {v["name"] for v in dashboard["templating"]["list"]}
    for _, expression in queries:
        assert set(re.findall(r"\$(\w+)", expression)) - {"__rate_interval"} <= names


def test_a_broken_query_is_caught():
    exported = exported_metrics()
    with pytest.raises(AssertionError, match="not exported"):
        check("rate(backfill_rows_total[5m])", exported, "typo")
    with pytest.raises(AssertionError, match="do not exist"):
        check("sum by (table) (backfill_batch_size)", exported, "label")


def rendered(helm: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [str(helm), "template", "bf", str(CHART), "--namespace", "backfill-system",
         "--set", "metrics.prometheusRule.enabled=true", "--set", "metrics.grafanaDashboard.enabled=true",
         "--set", "metrics.grafanaDashboard.namespace=monitoring"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_alert_rules_use_exported_metrics_and_labels(helm):
    (rule,) = [d for d in rendered(helm) if d["kind"] == "PrometheusRule"]
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert {a["alert"] for a in alerts} >= {"BackfillFailed", "BackfillNoProgress", "BackfillRetrying", "BackfillLongBatches"}
    exported = exported_metrics()
    for alert in alerts:
        check(alert["expr"], exported, f"alert {alert['alert']}")
        assert alert["annotations"]["summary"] and alert["labels"]["severity"]


def test_dashboard_configmap_carries_the_dashboard_for_the_sidecar(helm):
    (config_map,) = [d for d in rendered(helm) if d["kind"] == "ConfigMap"]
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["backfill-operator.json"]) == json.loads(DASHBOARD.read_text())
