"""The in-cluster commands of the ``backfill`` CLI: ``crd``, ``worker`` and ``operator``.

Registered on the main typer app by ``backfill_cli/app.py`` (one line), so that the local
CLI stays importable without anything Kubernetes-specific being loaded for ``run``/``plan``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from backfill_operator.jobs import WorkerDefaults
KubeconfigOption = Annotated[
    str | None,
    typer.Option("--kubeconfig", envvar="KUBECONFIG", help="Outside a cluster: the kubeconfig to use (default: in-cluster)."),
]


def crd() -> None:
    """Print the Backfill CustomResourceDefinition (YAML), generated from the API model."""
    from backfill_api.crd import render_crd_yaml

    sys.stdout.write(render_crd_yaml())


def worker(
    namespace: Annotated[str, typer.Option("--namespace", help="Namespace of the Backfill.")],
    name: Annotated[str, typer.Option("--name", help="Name of the Backfill.")],
    shard: Annotated[int, typer.Option("--shard", min=0, help="Shard index this worker runs.")] = 0,
    kubeconfig: KubeconfigOption = None,
) -> None:
    """Run one shard of a Backfill in-cluster (what the operator's Jobs run). DSN from $BACKFILL_DSN.

    Logging and /metrics come from the root options (the Job sets BACKFILL_LOG_FORMAT=json,
    BACKFILL_LOG_LEVEL=INFO and BACKFILL_METRICS_PORT=9090).
    """
    from backfill_api.kubeapi import KubeApi, KubeApiError
    from backfill_operator.jobs import DSN_ENV, RUN_ENV
    from backfill_worker.kube.worker import run_worker
    from backfill_worker.observe.logs import LogListener, bind_backfill
    from backfill_worker.observe.worker_metrics import process_listener
    from backfill_worker.sql.secrets import register_dsn

    bind_backfill(f"{namespace}/{name}", shard)
    dsn = os.environ.get(DSN_ENV)
    if not dsn:
        typer.echo(f"error: ${DSN_ENV} is not set: the Job injects it from spec.database.dsnSecretRef", err=True)
        raise typer.Exit(4)
    register_dsn(dsn)
    run = int(os.environ[RUN_ENV]) if os.environ.get(RUN_ENV, "").isdigit() else None
    metrics = process_listener()
    listeners = (LogListener(), *((metrics,) if metrics is not None else ()))
    api = KubeApi.from_environment(kubeconfig)
    try:
        code = run_worker(api, namespace, name, shard, dsn, run=run, listeners=listeners)
    except KubeApiError as error:  # e.g. the Backfill is gone, or RBAC denies the read: no traceback
        typer.echo(f"error: cannot read Backfill {namespace}/{name}: {error}", err=True)
        code = 1
    finally:
        api.close()
    raise typer.Exit(code)


def _json_env(variable: str) -> dict[str, Any] | None:
    raw = os.environ.get(variable)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        raise typer.BadParameter(f"${variable} is not valid JSON") from None
    return value if isinstance(value, dict) and value else None


def worker_defaults(service_account: str | None, image: str | None) -> WorkerDefaults:
    """Operator-wide worker defaults; the Helm chart passes them as BACKFILL_WORKER_* env vars."""
    from backfill_operator.jobs import WorkerDefaults

    overrides: dict[str, Any] = {"service_account_name": service_account or None}
    if image:
        overrides["image"] = image
    if policy := os.environ.get("BACKFILL_WORKER_IMAGE_PULL_POLICY"):
        overrides["image_pull_policy"] = policy
    for variable, field in (
        ("BACKFILL_WORKER_RESOURCES", "resources"),
        ("BACKFILL_WORKER_SECURITY_CONTEXT", "security_context"),
        ("BACKFILL_WORKER_POD_SECURITY_CONTEXT", "pod_security_context"),
    ):
        if (value := _json_env(variable)) is not None:
            overrides[field] = value
    return WorkerDefaults(**overrides)


def operator(
    namespace: Annotated[
        list[str] | None, typer.Option("--namespace", help="Watch only these namespaces (repeatable; default: all).")
    ] = None,
    liveness: Annotated[str | None, typer.Option("--liveness", help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz.")] = None,
    metrics_port: Annotated[int, typer.Option("--metrics-port", help="Operator Prometheus /metrics port; 0 disables.")] = 9090,
    worker_image: Annotated[
        str | None, typer.Option("--worker-image", envvar="BACKFILL_WORKER_IMAGE", help="Default worker image.")
    ] = None,
    worker_service_account: Annotated[
        str, typer.Option("--worker-service-account", envvar="BACKFILL_WORKER_SERVICE_ACCOUNT",
                          help="Default ServiceAccount of worker pods ('' for the namespace default).")
    ] = "backfill-worker",
    resync_seconds: Annotated[float, typer.Option("--resync-seconds", min=0.2, help="How often Jobs and shard progress are folded into status.")] = 3.0,
    leader_elect: Annotated[bool, typer.Option(
        "--leader-elect/--no-leader-elect", envvar="BACKFILL_LEADER_ELECT",
        help="Only the holder of a Lease reconciles (run two or more replicas); off: run exactly one.")] = False,
    leader_elect_namespace: Annotated[str | None, typer.Option(
        "--leader-elect-namespace", envvar="POD_NAMESPACE", help="Namespace of the Lease (default: the pod's).")] = None,
    leader_elect_lease_name: Annotated[str, typer.Option("--leader-elect-lease-name", help="Name of the Lease.")] = "backfill-operator",
    lease_duration: Annotated[float, typer.Option(
        "--leader-elect-lease-duration", help="Seconds a standby waits on an unrenewed Lease before taking over.")] = 15.0,
    renew_deadline: Annotated[float, typer.Option(
        "--leader-elect-renew-deadline", help="Seconds the leader keeps acting without a successful renewal.")] = 10.0,
    retry_period: Annotated[float, typer.Option(
        "--leader-elect-retry-period", help="Seconds between election rounds (renewals, standby reads).")] = 2.0,
    kubeconfig: KubeconfigOption = None,
) -> None:
    """Run the operator (kopf, standalone). With --leader-elect, run two or more replicas; without, exactly one."""
    import logging

    from backfill_operator.election import ElectionSettings, default_namespace
    from backfill_operator.main import OperatorConfig, run_operator

    try:
        election = ElectionSettings(
            namespace=leader_elect_namespace or default_namespace(), name=leader_elect_lease_name,
            lease_duration=lease_duration, renew_deadline=renew_deadline, retry_period=retry_period,
        ) if leader_elect else None
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None

    logging.getLogger("backfill.operator").setLevel(logging.INFO)
    run_operator(OperatorConfig(
        namespaces=tuple(namespace or ()), liveness=liveness, metrics_port=metrics_port or None,
        kubeconfig=kubeconfig, resync_seconds=resync_seconds,
        defaults=worker_defaults(worker_service_account, worker_image), election=election,
    ))


def register(app: typer.Typer) -> None:
    app.command("crd")(crd)
    app.command("worker")(worker)
    app.command("operator")(operator)
