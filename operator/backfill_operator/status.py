"""Status computation: progress aggregated over shards, and the conditions of a phase (PURE)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from backfill_worker.durations import format_duration

from .conditions import READY, RECONCILING, STALLED, Condition

PHASES = ("Pending", "Running", "Paused", "Succeeded", "Failed")


@dataclass(frozen=True)
class Stall:
    """Why the operator cannot make the Backfill converge (kstatus ``Stalled=True``)."""

    reason: str
    message: str


def format_eta(seconds: float | None) -> str:
    """``"1m30s"``; ``""`` when unknown. Rounded to whole seconds: a human reads it."""
    if seconds is None or seconds < 0:
        return ""
    return format_duration(timedelta(seconds=round(seconds)))


def _number(value: Any, default: float = 0.0) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def aggregate_progress(shards: Mapping[str, Mapping[str, Any]], parallelism: int, *, succeeded: bool = False) -> dict[str, Any]:
    """``status.progress`` from ``status.shards``: sums, a key-weighted percent, the slowest ETA.

    Shards that have not reported yet count as 0 % done. The batch size shown is the largest
    current one (the biggest transaction in flight).
    """
    reports = [shards.get(str(i)) or {} for i in range(parallelism)]
    active = [r for r in reports if r.get("state") == "running"]
    estimated = [_number(r.get("estimatedKeys"), -1) for r in reports]
    if all(e > 0 for e in estimated):
        done_keys = sum(
            e if r.get("state") == "done" else min(e, _number(r.get("keysDone"))) for r, e in zip(reports, estimated, strict=True)
        )
        percent = 100.0 * done_keys / sum(estimated)
    else:
        percent = sum(100.0 if r.get("state") == "done" else _number(r.get("percent")) for r in reports) / parallelism
    etas = [_number(r.get("etaSeconds"), -1) for r in reports if r.get("state") != "done"]
    eta = "" if any(e < 0 for e in etas) or not etas else format_eta(max(etas))
    if succeeded:
        percent, eta = 100.0, ""
    throttle = next((str(r["throttleReason"]) for r in active if r.get("throttleReason")), "")
    # The most throttled running shard's application-impact state (the one holding the run back).
    impacts = [r["impact"] for r in active if isinstance(r.get("impact"), Mapping)]
    impact = min(impacts, key=lambda i: _number(i.get("dutyPercent"), 100.0)) if impacts else None
    return {
        "rowsUpdated": int(sum(_number(r.get("rowsUpdated")) for r in reports)),
        "batches": int(sum(_number(r.get("batches")) for r in reports)),
        "percent": max(0, min(100, int(percent))),
        "rowsPerSecond": round(sum(_number(r.get("rowsPerSecond")) for r in active), 1),
        "eta": eta,
        "batchSize": int(max((_number(r.get("batchSize")) for r in reports), default=0)),
        "throttleReason": throttle,
        "impact": dict(impact) if impact is not None else None,
    }


def phase_conditions(phase: str, message: str, stall: Stall | None) -> list[Condition]:
    """The kstatus triple for a phase; a stall (if any) takes ``Stalled`` and ``Ready``'s reason."""
    if stall is not None:
        return [
            Condition(READY, "False", stall.reason, stall.message),
            Condition(RECONCILING, "False", stall.reason, "waiting for the spec or the cluster to be fixed"),
            Condition(STALLED, "True", stall.reason, stall.message),
        ]
    if phase == "Succeeded":
        return [
            Condition(READY, "True", "Succeeded", message),
            Condition(RECONCILING, "False", "Succeeded", "done"),
            Condition(STALLED, "False", "Succeeded", "done"),
        ]
    if phase == "Paused":
        # Reconciling stays True: a paused backfill is unfinished work, and kstatus (Flux
        # `wait: true`, `dependsOn`) must keep dependents waiting rather than read it as Current.
        return [
            Condition(READY, "False", "Suspended", message),
            Condition(RECONCILING, "True", "Suspended", "spec.suspend is true: resumes from the checkpoint when false"),
            Condition(STALLED, "False", "Suspended", "spec.suspend is true"),
        ]
    if phase == "Failed":  # a stall always accompanies Failed; kept for completeness
        return [
            Condition(READY, "False", "Failed", message),
            Condition(RECONCILING, "False", "Failed", message),
            Condition(STALLED, "True", "Failed", message),
        ]
    reason = "Progressing" if phase == "Running" else "Pending"
    return [
        Condition(READY, "False", reason, message),
        Condition(RECONCILING, "True", reason, message),
        Condition(STALLED, "False", reason, message),
    ]


def for_merge_patch(value: Any, *, in_list: bool = False) -> Any:
    """The wire form of a status merge patch: an empty string means "absent".

    Some API servers (seen on a 1.20 build) turn ``""`` inside a JSON merge patch into ``null``
    and then reject it against the schema's ``type: string``. So an empty value is sent as
    ``null`` (which deletes the key, as RFC 7386 says), or left out inside list items (where
    ``null`` would be a value). Readers treat a missing field as empty.
    """
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if item == "":
                if not in_list:
                    out[key] = None
            else:
                out[key] = for_merge_patch(item, in_list=in_list)
        return out
    if isinstance(value, list):
        return [for_merge_patch(item, in_list=True) for item in value]
    return value


def stored_form(value: Any) -> Any:
    """What the server keeps after such a patch: no empty strings, no nulls (for comparisons)."""
    if isinstance(value, dict):
        return {k: stored_form(v) for k, v in value.items() if v not in ("", None)}
    if isinstance(value, list):
        return [stored_form(v) for v in value]
    return value
