"""GitOps health by the real code: every phase's status, as the operator's own condition code
writes it, evaluated by Flux's kstatus (sigs.k8s.io/cli-utils) and by Argo CD's Lua runtime
(gopher-lua) running charts/backfill-operator/argocd/health.lua, from the Go program in
tests/e2e/gitops/; both must agree with the "Status and conditions" table of docs/operations.md.

Needs ``go`` and the Go module proxy (the program is built once, cached under the e2e home).
Runs in the e2e invocation (skipped, like the rest of tests/e2e, without BACKFILL_E2E_KUBECONFIG).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from e2e_support import ROOT

from backfill_api.conditions import merge_conditions
from backfill_api.status import Stall, phase_conditions

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PROGRAM = Path(__file__).resolve().parent / "gitops"
SCRIPT = ROOT / "charts" / "backfill-operator" / "argocd" / "health.lua"
GENERATION = 3

# (phase, stall, generation the operator observed) -> what README says Flux (kstatus) and Argo CD
# (health.lua) make of it: "Stalled -> failed/degraded, Reconciling -> in progress, Ready with a
# current observedGeneration -> done"; Argo CD: Progressing, Suspended, Healthy, Degraded.
CASES: list[tuple[str, tuple[str, str] | None, int, str, str]] = [
    ("Pending", None, GENERATION, "InProgress", "Progressing"),
    ("Running", None, GENERATION, "InProgress", "Progressing"),
    ("Paused", None, GENERATION, "InProgress", "Suspended"),
    ("Succeeded", None, GENERATION, "Current", "Healthy"),
    ("Failed", ("RetriesExhausted", "shard 0: lock timeout 11 times"), GENERATION, "Failed", "Degraded"),
    ("Pending", ("SecretNotFound", "Secret shop/shop-db not found"), GENERATION, "Failed", "Degraded"),
    ("Running", ("ImmutableFieldChanged", "spec.where cannot change"), GENERATION, "Failed", "Degraded"),
    ("Succeeded", None, GENERATION - 1, "InProgress", "Progressing"),  # a newer spec not yet observed
]


def readme_condition_table() -> dict[str, dict[str, str]]:
    """phase -> {Ready, Reconciling, Stalled} -> "True"/"False", from the table in docs/operations.md."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("\n## Status and conditions\n", 1)[1].split("\n## ", 1)[0]
    table: dict[str, dict[str, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and (m := re.fullmatch(r"`(\w+)`", cells[0])):
            table[m.group(1)] = {
                kind: "True" if re.match(r"\W*True", cell) else "False"
                for kind, cell in zip(("Ready", "Reconciling", "Stalled"), cells[2:5], strict=True)
            }
    return table


def backfill(phase: str, stall: tuple[str, str] | None, observed: int) -> dict[str, Any]:
    message = stall[1] if stall else f"{phase.lower()} message"
    conditions = merge_conditions(
        None, phase_conditions(phase, message, Stall(*stall) if stall else None),
        now="2026-11-28T00:00:00Z", generation=observed,
    )
    return {
        "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill",
        "metadata": {"name": "customers-inactive", "namespace": "shop", "generation": GENERATION},
        "spec": {"table": "public.customers", "set": {"status": "'inactive'"}},
        "status": {"phase": phase, "observedGeneration": observed, "message": message, "conditions": conditions},
    }


@pytest.fixture(scope="module")
def gitops_health(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.skip("no `go` toolchain: the kstatus/gopher-lua program cannot be built")
    cache = Path(os.environ.get("BACKFILL_E2E_HOME") or Path.home() / ".cache" / "backfill-e2e") / "gitops"
    cache.mkdir(parents=True, exist_ok=True)
    binary = cache / "gitops-health"
    env = {**os.environ, "GOFLAGS": "-mod=readonly -buildvcs=false", "CGO_ENABLED": "0"}
    result = subprocess.run([go, "build", "-o", str(binary), "."], cwd=PROGRAM, env=env,
                            capture_output=True, text=True, timeout=540, check=False)
    assert result.returncode == 0, f"go build of tests/e2e/gitops failed: {result.stderr[-2000:]}"
    return binary


def test_readme_table_is_what_the_operator_writes() -> None:
    table = readme_condition_table()
    assert set(table) == {"Pending", "Running", "Paused", "Succeeded", "Failed"}
    for phase, expected in table.items():
        stall = ("RetriesExhausted", "failed") if phase == "Failed" else None
        got = {c["type"]: c["status"] for c in backfill(phase, stall, GENERATION)["status"]["conditions"]}
        assert got == expected, phase


def test_kstatus_and_argocd_lua_agree_with_the_readme(gitops_health: Path) -> None:
    objects = [backfill(phase, stall, observed) for phase, stall, observed, _, _ in CASES]
    result = subprocess.run([str(gitops_health), str(SCRIPT)], input=json.dumps(objects),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    verdicts = json.loads(result.stdout)
    for (phase, stall, observed, kstatus, argo), verdict in zip(CASES, verdicts, strict=True):
        case = f"{phase} stall={stall and stall[0]} observedGeneration={observed}"
        assert verdict["kstatus"] == kstatus, f"{case}: kstatus says {verdict}"
        assert verdict["argo"] == argo, f"{case}: Argo CD says {verdict}"
