"""Immutable-field rules (PURE).

Which rows change and how (``IMMUTABLE_SPEC_FIELDS``) must not change once a run started:
that would break exactly-once. On the first launch the operator records those fields in the
``backfill.dev/applied-spec`` annotation; an edit to them later is reported (Stalled,
ImmutableFieldChanged) and ignored: workers always run with the recorded values, so even a
restarted worker pod keeps doing the original change. Reverting the edit clears the condition.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .model import IMMUTABLE_SPEC_FIELDS, BackfillSpec

APPLIED_SPEC_ANNOTATION = "backfill.dev/applied-spec"


def immutable_view(spec: BackfillSpec) -> dict[str, Any]:
    """The immutable fields in canonical JSON form (defaults filled in, camelCase)."""
    # Not ``include=``: it takes Python names, and some fields' names differ (``copy_``, ``from_``).
    dumped = spec.model_dump(mode="json", by_alias=True)
    return {field: dumped.get(field) for field in IMMUTABLE_SPEC_FIELDS}


def encode_applied(view: Mapping[str, Any]) -> str:
    return json.dumps(view, sort_keys=True, separators=(",", ":"))


def decode_applied(annotations: Mapping[str, str] | None) -> dict[str, Any] | None:
    """The recorded immutable fields, or None when nothing was launched yet (or unreadable)."""
    raw = (annotations or {}).get(APPLIED_SPEC_ANNOTATION)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def changed_fields(applied: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    return [field for field in IMMUTABLE_SPEC_FIELDS if applied.get(field) != current.get(field)]


def effective_spec(raw_spec: Mapping[str, Any], applied: Mapping[str, Any] | None) -> dict[str, Any]:
    """The spec a worker must run: live tunables from ``raw_spec``, the change itself from ``applied``."""
    spec = dict(raw_spec)
    if applied:
        for field in IMMUTABLE_SPEC_FIELDS:
            if applied.get(field) is None:
                spec.pop(field, None)
            else:
                spec[field] = applied[field]
    return spec


def describe_change(fields: list[str]) -> str:
    names = ", ".join(f"spec.{f}" for f in fields)
    return (
        f"{names} changed after the run started and {'is' if len(fields) == 1 else 'are'} immutable: "
        "the operator keeps running the original values; revert the edit, or create a new Backfill for a new change"
    )
