"""The layering of the packages, read from the source (every import, also lazy ones in functions).

``backfill_api`` is the contract and imports no other package of ours; ``backfill_worker`` and
``backfill_operator`` import it and never each other; only ``backfill_cli`` knows both.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "backfill_api": ROOT / "worker" / "backfill_api",
    "backfill_worker": ROOT / "worker" / "backfill_worker",
    "backfill_operator": ROOT / "operator" / "backfill_operator",
    "backfill_cli": ROOT / "worker" / "backfill_cli",
}
ALLOWED = {
    "backfill_api": set(),
    "backfill_worker": {"backfill_api"},
    "backfill_operator": {"backfill_api"},
    "backfill_cli": {"backfill_api", "backfill_worker", "backfill_operator"},
}


def imported_packages(source: str) -> set[str]:
    """Top-level names of our packages that ``source`` imports (relative imports stay inside)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & set(PACKAGES)
    return found


def test_the_reader_sees_absolute_lazy_and_relative_imports():
    source = "import backfill_api.model\nfrom .x import y\ndef f():\n    from backfill_operator import jobs\n"
    assert imported_packages(source) == {"backfill_api", "backfill_operator"}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_package_imports_only_the_layers_below_it(package: str):
    modules = sorted(PACKAGES[package].glob("*.py"))
    assert modules, f"no modules found for {package} under {PACKAGES[package]}"
    violations = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path.read_text()) - ALLOWED[package] - {package})
        for path in modules
    }
    assert {path: bad for path, bad in violations.items() if bad} == {}
