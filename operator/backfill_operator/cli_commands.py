"""The in-cluster commands of the ``backfill`` CLI: ``crd``, ``worker`` and ``operator``.

Registered on the main typer app by ``backfill_worker/cli.py`` (one line), so that the local
CLI stays importable without anything Kubernetes-specific being loaded for ``run``/``plan``.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

LogFormatOption = Annotated[str, typer.Option("--log-format", envvar="BACKFILL_LOG_FORMAT", help="text or json.")]
KubeconfigOption = Annotated[
    Optional[str],
    typer.Option("--kubeconfig", envvar="KUBECONFIG", help="Outside a cluster: the kubeconfig to use (default: in-cluster)."),
]


def crd() -> None:
    """Print the Backfill CustomResourceDefinition (YAML), generated from the API model."""
    from .crd import render_crd_yaml  # noqa: PLC0415

    sys.stdout.write(render_crd_yaml())


def worker(
    namespace: Annotated[str, typer.Option("--namespace", help="Namespace of the Backfill.")],
    name: Annotated[str, typer.Option("--name", help="Name of the Backfill.")],
    shard: Annotated[int, typer.Option("--shard", min=0, help="Shard index this worker runs.")] = 0,
    metrics_port: Annotated[int, typer.Option("--metrics-port", help="Prometheus /metrics port; 0 disables.")] = 9090,
    log_format: LogFormatOption = "json",
    kubeconfig: KubeconfigOption = None,
) -> None:
    """Run one shard of a Backfill in-cluster (what the operator's Jobs run). DSN from $BACKFILL_DSN."""
    from backfill_worker.kube_worker import run_worker  # noqa: PLC0415
    from backfill_worker.kubeapi import KubeApi  # noqa: PLC0415
    from backfill_worker.logs import LogListener, configure_logging  # noqa: PLC0415
    from backfill_worker.metrics import WorkerMetrics, serve  # noqa: PLC0415
    from backfill_worker.secrets import register_dsn  # noqa: PLC0415

    from .jobs import DSN_ENV, RUN_ENV  # noqa: PLC0415

    configure_logging(log_format if log_format in ("text", "json") else "json", "INFO",  # type: ignore[arg-type]
                      fields={"namespace": namespace, "name": name, "shard": shard})
    dsn = os.environ.get(DSN_ENV)
    if not dsn:
        typer.echo(f"error: ${DSN_ENV} is not set: the Job injects it from spec.database.dsnSecretRef", err=True)
        raise typer.Exit(4)
    register_dsn(dsn)
    run = int(os.environ[RUN_ENV]) if os.environ.get(RUN_ENV, "").isdigit() else None
    metrics = WorkerMetrics()
    server = serve(metrics_port, metrics.registry) if metrics_port else None
    api = KubeApi.from_environment(kubeconfig)
    try:
        code = run_worker(api, namespace, name, shard, dsn, run=run, listeners=(metrics, LogListener()))
    finally:
        api.close()
        if server is not None:
            server.close()
    raise typer.Exit(code)


def operator(
    namespace: Annotated[Optional[str], typer.Option("--namespace", help="Watch only this namespace (default: all).")] = None,
    liveness: Annotated[Optional[str], typer.Option("--liveness", help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz.")] = None,
    metrics_port: Annotated[int, typer.Option("--metrics-port", help="Prometheus /metrics port; 0 disables.")] = 9090,
    worker_image: Annotated[
        Optional[str], typer.Option("--worker-image", envvar="BACKFILL_WORKER_IMAGE", help="Default worker image.")
    ] = None,
    worker_service_account: Annotated[
        str, typer.Option("--worker-service-account", envvar="BACKFILL_WORKER_SERVICE_ACCOUNT",
                          help="Default ServiceAccount of worker pods ('' for the namespace default).")
    ] = "backfill-worker",
    resync_seconds: Annotated[float, typer.Option("--resync-seconds", min=0.2, help="How often Jobs and shard progress are folded into status.")] = 3.0,
    log_format: LogFormatOption = "json",
    kubeconfig: KubeconfigOption = None,
) -> None:
    """Run the operator (kopf, standalone: deploy exactly one replica with strategy Recreate)."""
    from backfill_worker.logs import configure_logging  # noqa: PLC0415

    from .jobs import WorkerDefaults  # noqa: PLC0415
    from .main import OperatorConfig, run_operator  # noqa: PLC0415

    configure_logging(log_format if log_format in ("text", "json") else "json", "INFO")  # type: ignore[arg-type]
    defaults = WorkerDefaults(service_account_name=worker_service_account or None)
    if worker_image:
        defaults = WorkerDefaults(image=worker_image, service_account_name=worker_service_account or None)
    run_operator(OperatorConfig(
        namespace=namespace, liveness=liveness, metrics_port=metrics_port or None,
        kubeconfig=kubeconfig, resync_seconds=resync_seconds, defaults=defaults,
    ))


def register(app: typer.Typer) -> None:
    app.command("crd")(crd)
    app.command("worker")(worker)
    app.command("operator")(operator)
