"""``kubectl backfill report``: one tar.gz for a bug report, with every secret masked.

What goes in is collected by ``app.py`` (the API calls); how it is laid out and redacted is
decided here (:func:`report_files`, PURE) so that the redaction can be tested on its own: each
file's text passes through :func:`~backfill_kubectl.view.redact_all` with the values of the
Backfill's DSN Secret (and the password inside the DSN), and anything shaped like a DSN password
is masked even when the Secret could not be read. The Secret itself is never included.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from .view import redact_all

ROOT = "backfill-report"


@dataclass
class Collected:
    """What the plugin read from the cluster for one Backfill (each part may be missing)."""

    backfill: Mapping[str, Any]
    status_text: str = ""
    events: Sequence[Mapping[str, Any]] = ()
    jobs: Sequence[Mapping[str, Any]] = ()
    pods: Sequence[Mapping[str, Any]] = ()
    worker_logs: Mapping[str, str] = field(default_factory=dict)
    """Pod name -> its log."""
    operator_logs: Mapping[str, str] = field(default_factory=dict)
    versions: Mapping[str, Any] = field(default_factory=dict)
    plan: str | None = None
    problems: list[str] = field(default_factory=list)
    """What could not be collected, and why (a 403, no operator pod found...)."""


def _clean(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``managedFields`` (noise; may quote field values of other managers)."""
    out = json.loads(json.dumps(obj))
    (out.get("metadata") or {}).pop("managedFields", None)
    return dict(out)


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False)


def report_files(collected: Collected, secrets: Sequence[str]) -> dict[str, bytes]:
    """The archive's files (path -> content), every one redacted."""
    backfill = _clean(collected.backfill)
    files: dict[str, str] = {
        "backfill.yaml": _yaml(backfill),
        "status.txt": collected.status_text,
        "events.yaml": _yaml([_clean(e) for e in collected.events]),
        "jobs.yaml": _yaml([_clean(j) for j in collected.jobs]),
        "pods.yaml": _yaml([_clean(p) for p in collected.pods]),
        "versions.json": json.dumps(dict(collected.versions), indent=2, sort_keys=True) + "\n",
    }
    for pod, text in sorted(collected.worker_logs.items()):
        files[f"logs/workers/{pod}.log"] = text
    for pod, text in sorted(collected.operator_logs.items()):
        files[f"logs/operator/{pod}.log"] = text
    if collected.plan is not None:
        files["plan.txt"] = collected.plan
    files["README.txt"] = (
        "kubectl backfill report: the Backfill, its status, Events, worker Jobs and pods, worker and operator logs,\n"
        "versions" + (", the plan" if collected.plan is not None else "") + ".\n"
        "Every value of the Backfill's DSN Secret and the password inside the DSN are replaced by ***,\n"
        "as is anything shaped like a password in a connection string. The Secret itself is not included.\n"
        + ("\nNot collected:\n" + "".join(f"- {p}\n" for p in collected.problems) if collected.problems else "")
    )
    return {path: redact_all(text, secrets).encode() for path, text in files.items()}


def write_archive(files: Mapping[str, bytes], destination: io.BufferedIOBase | Any) -> None:
    """A gzipped tar of ``files`` under ``backfill-report/``."""
    now = time.time()
    with tarfile.open(fileobj=destination, mode="w:gz") as archive:
        for path, content in files.items():
            info = tarfile.TarInfo(f"{ROOT}/{path}")
            info.size, info.mtime, info.mode = len(content), int(now), 0o644
            archive.addfile(info, io.BytesIO(content))
