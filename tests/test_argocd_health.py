"""GitOps health rules: the Argo CD health check (Lua, run by a real Lua 5.1 interpreter, the
dialect of Argo CD's gopher-lua) and the Flux healthCheckExprs (CEL, run by cel-python)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

lupa = pytest.importorskip("lupa.lua51", reason="lupa (Lua runtime from PyPI) is a test dependency")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "charts" / "backfill-operator" / "argocd" / "health.lua"
PATCH = ROOT / "docs" / "argocd" / "argocd-cm-patch.yaml"
KEY = "resource.customizations.health.backfill.dev_Backfill"


def to_lua(runtime: Any, value: Any) -> Any:
    # Argo CD hands the object to Lua as nested tables: arrays 1-based, JSON numbers as numbers.
    if isinstance(value, dict):
        return runtime.table_from({k: to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([to_lua(runtime, v) for v in value])
    return value


def health(obj: dict[str, Any], script: str | None = None) -> tuple[str, str]:
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = to_lua(runtime, obj)
    result = runtime.execute(script or SCRIPT.read_text())
    return result["status"], result["message"]


def backfill(status: dict[str, Any] | None, generation: int = 3) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "backfill.dev/v1alpha1",
        "kind": "Backfill",
        "metadata": {"name": "customers-inactive", "namespace": "shop", "generation": generation},
        "spec": {"table": "customers", "set": {"status": "'inactive'"}},
    }
    if status is not None:
        obj["status"] = status
    return obj


def conditions(ready: str, reason: str, reconciling: str = "False", stalled: str = "False", message: str = "") -> list:
    return [
        {"type": "Ready", "status": ready, "reason": reason, "message": message, "observedGeneration": 3},
        {"type": "Reconciling", "status": reconciling, "reason": reason, "message": message, "observedGeneration": 3},
        {"type": "Stalled", "status": stalled, "reason": reason, "message": message, "observedGeneration": 3},
    ]


PROGRESS = {"rowsUpdated": 420_000, "batches": 84, "percent": 42, "rowsPerSecond": 85000, "eta": "1m30s",
            "batchSize": 5000, "throttleReason": ""}


@pytest.mark.parametrize(("status", "expected", "message_part"), [
    (None, "Progressing", "Waiting for the backfill operator"),
    ({"phase": "Pending", "observedGeneration": 3, "message": "Job created",
      "conditions": conditions("False", "Progressing", reconciling="True")}, "Progressing", "Job created"),
    ({"phase": "Running", "observedGeneration": 3, "message": "420000 rows updated", "progress": PROGRESS,
      "conditions": conditions("False", "Progressing", reconciling="True")}, "Progressing", "(42%, ETA 1m30s)"),
    ({"phase": "Paused", "observedGeneration": 3, "message": "Paused by spec.suspend", "progress": PROGRESS,
      "conditions": conditions("False", "Paused")}, "Suspended", "Paused by spec.suspend (42%"),
    ({"phase": "Succeeded", "observedGeneration": 3, "message": "999357 rows updated, 0 remaining",
      "conditions": conditions("True", "Succeeded")}, "Healthy", "999357 rows updated"),
    ({"phase": "Failed", "observedGeneration": 3, "message": "RetriesExhausted: lock timeout 11 times",
      "conditions": conditions("False", "Failed", stalled="True")}, "Degraded", "RetriesExhausted"),
    ({"phase": "Running", "observedGeneration": 3, "message": "running",
      "conditions": conditions("False", "ImmutableFieldChanged", stalled="True",
                               message="spec.table cannot change once a run started")},
     "Degraded", "spec.table cannot change"),
    ({"phase": "Pending", "observedGeneration": 3, "conditions": []}, "Progressing", "Backfill Pending"),
    ({"phase": "Weird", "observedGeneration": 3}, "Progressing", "Waiting for the backfill operator"),
], ids=["no-status", "pending", "running", "paused", "succeeded", "failed", "stalled", "pending-no-message", "unknown-phase"])
def test_every_phase_maps_to_the_argocd_health(status, expected, message_part):
    state, message = health(backfill(status))
    assert state == expected
    assert message_part in message


@pytest.mark.parametrize("phase", ["Succeeded", "Paused", "Running"])
def test_a_spec_the_operator_has_not_observed_yet_is_progressing(phase):
    status = {"phase": phase, "observedGeneration": 2, "conditions": conditions("True", phase)}
    state, message = health(backfill(status, generation=3))
    assert (state, message) == ("Progressing", "Waiting for the operator to observe generation 3")
    state, _ = health(backfill({"phase": phase}, generation=3))  # no observedGeneration at all
    assert state == "Progressing"


def test_failure_wins_over_a_newer_generation():
    status = {"phase": "Failed", "observedGeneration": 2, "message": "gave up"}
    assert health(backfill(status, generation=5)) == ("Degraded", "gave up")


def test_the_argocd_cm_patch_embeds_exactly_the_tested_script():
    patch = yaml.safe_load(PATCH.read_text())
    embedded = patch["data"][KEY]
    assert embedded.strip() == SCRIPT.read_text().strip()
    state, _ = health(backfill({"phase": "Succeeded", "observedGeneration": 3}), script=embedded)
    assert state == "Healthy"


@pytest.mark.parametrize(("phase", "stall", "expected"), [
    ("Pending", None, "Progressing"),
    ("Running", None, "Progressing"),
    ("Paused", None, "Suspended"),
    ("Succeeded", None, "Healthy"),
    ("Failed", ("RetriesExhausted", "shard 0: lock timeout 11 times"), "Degraded"),
    ("Pending", ("SecretNotFound", "Secret shop/shop-db not found"), "Degraded"),
    ("Running", ("ImmutableFieldChanged", "spec.where cannot change"), "Degraded"),
])
def test_conditions_as_the_operator_writes_them(phase, stall, expected):
    """Status built by the operator's own condition code, not by hand."""
    from backfill_api import conditions as conditions_mod
    from backfill_api import status as status_mod

    stall_obj = status_mod.Stall(*stall) if stall else None
    message = stall[1] if stall else f"{phase.lower()} message"
    conditions = conditions_mod.merge_conditions(
        None, status_mod.phase_conditions(phase, message, stall_obj), now="2026-11-28T00:00:00Z", generation=3)
    state, got = health(backfill({"phase": phase, "observedGeneration": 3, "message": message, "conditions": conditions}))
    assert state == expected
    assert message in got


# -- Flux: the healthCheckExprs (CEL) documented in docs/flux/README.md ----------------------------

FLUX_DOC = ROOT / "docs" / "flux" / "README.md"


def flux_expressions() -> dict[str, str]:
    import re

    documents = [d for block in re.findall(r"```yaml\n(.*?)```", FLUX_DOC.read_text(), flags=re.S)
                 for d in yaml.safe_load_all(block)]
    for document in documents:
        checks = (document.get("spec") or {}).get("healthCheckExprs") if isinstance(document, dict) else None
        if checks:
            (check,) = [c for c in checks if c["kind"] == "Backfill"]
            assert check["apiVersion"] == "backfill.dev/v1alpha1"
            return {k: check[k] for k in ("inProgress", "failed", "current")}
    raise AssertionError("docs/flux/README.md has no healthCheckExprs block for Backfill")


def flux_status(obj: dict[str, Any]) -> str:
    """What Flux concludes: the first of inProgress, failed, current that is true (else InProgress)."""
    celpy = pytest.importorskip("celpy", reason="cel-python is a test dependency")
    env = celpy.Environment()
    activation = {key: celpy.json_to_cel(value) for key, value in obj.items()}
    for state, expression in flux_expressions().items():
        if env.program(env.compile(expression)).evaluate(activation):
            return state
    return "inProgress"


@pytest.mark.parametrize(("status", "generation", "expected"), [
    (None, 1, "inProgress"),
    ({}, 1, "inProgress"),
    ({"phase": "Pending", "observedGeneration": 1}, 1, "inProgress"),
    ({"phase": "Running", "observedGeneration": 1}, 1, "inProgress"),
    ({"phase": "Paused", "observedGeneration": 1}, 1, "inProgress"),  # a paused backfill must hold dependents
    ({"phase": "Succeeded", "observedGeneration": 1}, 2, "inProgress"),  # newer spec not yet observed
    ({"phase": "Succeeded", "observedGeneration": 2}, 2, "current"),
    ({"phase": "Failed", "observedGeneration": 2}, 2, "failed"),
])
def test_flux_health_expressions_gate_on_succeeded_only(status, generation, expected):
    assert flux_status(backfill(status, generation=generation)) == expected
