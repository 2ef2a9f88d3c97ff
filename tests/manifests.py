"""The one factory for Backfill manifests in tests: a document, and the file ``backfill run`` reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from backfill_api.model import API_GROUP, API_VERSION, KIND


def backfill_document(name: str = "backfill", namespace: str = "default", **spec: Any) -> dict[str, Any]:
    """A ``Backfill`` as ``kubectl apply`` or ``backfill run`` takes it; ``spec`` as given."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def write_manifest(directory: Path, document: dict[str, Any], name: str = "backfill.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path
