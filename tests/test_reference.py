"""docs/reference.md is generated from the models and must be current (like the CRD)."""

from __future__ import annotations

from pathlib import Path

from backfill_api.reference import render_reference
from backfill_api.status import StallReason

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference.md"


def test_committed_reference_equals_generated():
    assert REFERENCE.read_text() == render_reference(), "run: python -m backfill_api.reference > docs/reference.md"


def test_reference_lists_every_field_column_and_reason():
    text = render_reference()
    for needle in ("`spec.batch.targetDuration` | duration | `\"200ms\"`", "`spec.limits.maxRowsPerSecond`",
                   "`status.shards.<key>.etaSeconds`", "`status.conditions[].reason`", "| ETA | `.status.progress.eta`"):
        assert needle in text
    assert all(f"`{reason.value}`" in text for reason in StallReason)
    assert "| `ManifestError` | 2 | `InvalidSpec` |" in text
