"""kstatus conditions (``Ready``, ``Reconciling``, ``Stalled``) as a first-class type (PURE).

kstatus (used by Flux, kubectl wait and others) reads a resource as: ``Stalled=True`` -> failed,
``Reconciling=True`` -> in progress, ``Ready=True`` with ``observedGeneration`` current -> ready.
``lastTransitionTime`` changes only when ``status`` flips, as the API conventions require.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]
READY, RECONCILING, STALLED = "Ready", "Reconciling", "Stalled"


@dataclass(frozen=True)
class Condition:
    type: str
    status: ConditionStatus
    reason: str
    message: str = ""

    def to_dict(self, *, now: str, generation: int | None, previous: Mapping[str, Any] | None) -> dict[str, Any]:
        unchanged = previous is not None and previous.get("status") == self.status
        since = previous.get("lastTransitionTime") if unchanged and previous else None
        out: dict[str, Any] = {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": since or now,
        }
        if generation is not None:
            out["observedGeneration"] = generation
        return out


def merge_conditions(
    previous: Iterable[Mapping[str, Any]] | None,
    desired: Iterable[Condition],
    *,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """The full conditions list: desired ones rendered, keeping transition times that still hold."""
    by_type = {c.get("type"): c for c in (previous or ()) if isinstance(c, Mapping)}
    return [c.to_dict(now=now, generation=generation, previous=by_type.get(c.type)) for c in desired]


def find(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or () if c.get("type") == type_), None)


def is_true(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> bool:
    found = find(conditions, type_)
    return bool(found and found.get("status") == "True")
