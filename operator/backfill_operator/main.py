"""``backfill operator``: run the kopf controller programmatically.

kopf runs standalone (no kopf peering). With ``election`` set (the chart's default, two
replicas) only the holder of a ``coordination.k8s.io`` Lease reconciles; the other replicas
watch and keep their caches warm, and take over when the Lease lapses (``election.py``).
Without it, run exactly one replica. Two active instances would not corrupt data anyway (Job
names are deterministic, a second create gets 409 and adopts; the engine's advisory lock lets
one worker per shard run), but they would write status twice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import kopf

from backfill_api.kubeapi import KubeApi
from backfill_api.serving import MetricsServer, serve

from .election import ElectionSettings, LeaderElector
from .jobs import WorkerDefaults
from .kopf_handlers import Controller, register
from .metrics import OperatorMetrics

log = logging.getLogger("backfill.operator")


def connection_info(api: KubeApi) -> kopf.ConnectionInfo:
    """kopf's credentials from the same configuration our own client uses (one source)."""
    c = api.configuration
    if c.refresh_api_key_hook is not None:
        # In-cluster ServiceAccount tokens rotate; kopf calls this again on a 401.
        c.refresh_api_key_hook(c)
    token = (c.api_key or {}).get("authorization") or (c.api_key or {}).get("BearerToken")
    if token and token.lower().startswith("bearer "):
        token = token[7:]
    return kopf.ConnectionInfo(
        server=c.host,
        ca_path=c.ssl_ca_cert or None,
        insecure=not c.verify_ssl if c.host.startswith("https") else None,
        certificate_path=c.cert_file or None,
        private_key_path=c.key_file or None,
        token=token or None,
    )


@dataclass
class OperatorConfig:
    namespaces: tuple[str, ...] = ()
    """Watch only these namespaces; empty: all namespaces."""
    liveness: str | None = None
    """kopf's liveness endpoint, e.g. ``http://0.0.0.0:8080/healthz``."""
    metrics_port: int | None = 9090
    kubeconfig: str | None = None
    server: str | None = None
    """An unauthenticated API URL (tests against kmock)."""
    resync_seconds: float = 3.0
    defaults: WorkerDefaults = field(default_factory=WorkerDefaults)
    election: ElectionSettings | None = None
    """Leader election on a Lease; None: this instance is always active (one replica only)."""


def build(config: OperatorConfig) -> tuple[kopf.OperatorRegistry, Controller]:
    api = KubeApi.from_environment(config.kubeconfig, server=config.server)
    registry = kopf.OperatorRegistry()
    controller = Controller(api, defaults=config.defaults, metrics=OperatorMetrics())
    register(registry, controller, resync_seconds=config.resync_seconds, namespaces=config.namespaces)
    if config.election is not None:
        elect(registry, controller, LeaderElector(api, config.election))
    else:
        controller.metrics.leader.set(1)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(api)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False  # our Events are explicit; kopf's would echo exception texts
        if config.namespaces:
            # Exact namespace names: nothing to scan for. Namespaced RBAC may not list namespaces
            # (and the CRD must be installed before the operator starts; the Helm chart does).
            settings.scanning.disabled = True
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330

    return registry, controller


def elect(registry: kopf.OperatorRegistry, controller: Controller, elector: LeaderElector) -> None:
    """Gate the controller on the Lease; release it on a graceful stop (fast handover)."""
    controller.active = elector.is_leader
    # Read at each scrape, the same verdict that gates writes: a round stuck on a slow API (or a
    # starved thread) must not leave the gauge at 1 once the renew deadline has passed.
    controller.metrics.leader.set_function(lambda: 1.0 if elector.is_leader() else 0.0)

    @kopf.on.startup(registry=registry)
    def start_election(**_: Any) -> None:
        threading.Thread(target=elector.run, name="leader-election", daemon=True).start()

    @kopf.on.cleanup(registry=registry)
    def release_lease(**_: Any) -> None:
        controller.stop()  # no new pass may start once the Lease is handed over
        elector.release()


def run_operator(
    config: OperatorConfig,
    *,
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
) -> None:
    """Block until ``stop_flag`` is set (or SIGTERM/SIGINT when run in the main thread)."""
    registry, controller = build(config)
    metrics_server: MetricsServer | None = None
    if config.metrics_port is not None:
        metrics_server = serve(config.metrics_port, controller.metrics.registry)
    try:
        asyncio.run(kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=not config.namespaces,
            namespaces=list(config.namespaces),
            liveness_endpoint=config.liveness,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        ))
    finally:
        controller.stop()
        if metrics_server is not None:
            metrics_server.close()
        controller.api.close()
