"""Install the generated Backfill CRD on a test API server and wait until it serves."""

from __future__ import annotations

from backfill_api.crd import CRD_NAME, build_crd
from backfill_api.kubeapi import KubeApi
from kube_support.waiting import eventually

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def install_crd(admin: KubeApi) -> None:
    """Create the CRD from ``build_crd()`` and wait for its ``Established`` condition."""
    admin.create(CRDS, build_crd())
    eventually(
        lambda: any(
            c["type"] == "Established" and c["status"] == "True"
            for c in admin.get(f"{CRDS}/{CRD_NAME}")["status"]["conditions"]
        ),
        "CRD established",
    )
