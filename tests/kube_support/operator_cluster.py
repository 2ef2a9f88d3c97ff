"""A real control plane made ready for the operator: CRD, operator RBAC, namespaces with a DSN Secret."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
from test_kube_real_apiserver import OPERATOR_NS, create

from backfill_api.kubeapi import KubeApi, core_path
from backfill_operator import rbac
from kube_support.control_plane import ControlPlane, missing_assets
from kube_support.crd_install import install_crd

ASSETS = os.environ.get("KUBEBUILDER_ASSETS")
SLOW_REAL_SERVER = [
    pytest.mark.kube,
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(missing_assets(ASSETS) is not None, reason=str(missing_assets(ASSETS))),
]
"""``pytestmark`` of the operator's slow real-server tests (skipped, with the reason, without binaries)."""

DSN = "postgresql://app@db.invalid/shop"
"""Never connected to: these tests run no worker. The Secret ``db`` only has to exist."""


def prepare(
    plane: ControlPlane, home: Path, namespaces: Iterable[str], *,
    operator_docs: Sequence[dict[str, Any]] | None = None, worker_rbac: bool = False,
) -> KubeApi:
    """The admin client, after: the CRD; namespace ``backfill-system`` with ``operator_docs``
    (default: deploy/'s ServiceAccount, ClusterRole and binding); each namespace with Secret
    ``db`` (and the worker's ServiceAccount and Role when ``worker_rbac``: the Job controller
    admits worker pods only then)."""
    admin = KubeApi.from_environment(str(plane.write_kubeconfig(home / "admin")))
    install_crd(admin)
    admin.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NS}})
    for doc in operator_docs if operator_docs is not None else rbac.operator_manifests(OPERATOR_NS, "unused")[:3]:
        create(admin, doc)
    for ns in namespaces:
        admin.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        for doc in rbac.worker_manifests(ns) if worker_rbac else []:
            create(admin, doc)
        admin.create(core_path(ns, "secrets"), {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "namespace": ns},
                                                "stringData": {"dsn": DSN}})
    return admin
