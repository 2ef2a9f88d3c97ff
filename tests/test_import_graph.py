"""The layering of the packages, read from the source (every import, also lazy ones in functions).

``backfill_api`` is the contract and imports no other package of ours; ``backfill_worker`` and
``backfill_operator`` import it and never each other; only ``backfill_cli`` knows both.
``backfill_django`` (the optional ``[django]`` extra) sits on top: it may use the contract, the
engine and the CLI's functions, never the operator directly; nothing of ours imports it (the engine
finds its runtime through the ``backfill_operator.handler_runtimes`` entry point group).

Inside the engine, the layers (subpackages of ``backfill_worker``) are ordered: each imports only
the layers before it in :data:`ENGINE_LAYERS` (and itself). No exceptions.

``backfill_kubectl`` (the kubectl plugin) uses the contract, the operator's ``jobs`` and the
engine's ``sql.secrets`` only.
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
    "backfill_django": ROOT / "worker" / "backfill_django",
    "backfill_kubectl": ROOT / "worker" / "backfill_kubectl",
}
ALLOWED = {
    "backfill_api": set(),
    "backfill_worker": {"backfill_api"},
    "backfill_operator": {"backfill_api"},
    "backfill_cli": {"backfill_api", "backfill_worker", "backfill_operator"},
    "backfill_django": {"backfill_api", "backfill_worker", "backfill_cli"},
    # The kubectl plugin: the contract, the operator's pure Job rendering (its plan pod is the
    # worker pod) and labels; from the engine only the redaction (a check below keeps it so).
    "backfill_kubectl": {"backfill_api", "backfill_operator", "backfill_worker"},
}
ENGINE_LAYERS = ("checkpoints", "sql", "observe", "throttles", "changes", "plan", "run", "kube")
"""backfill_worker's subpackages, lowest first (each one's ``__init__`` says what it holds)."""
KUBECTL_PLUGIN_USES = {"backfill_operator.jobs", "backfill_worker.sql.secrets"}
"""The only modules of the operator and the engine the plugin may import (no kopf, no psycopg engine)."""
ENGINE_SIDE = ("runtime.py", "queryset.py")
"""backfill_django modules the worker imports (in a worker image): the contract and the engine only."""


def imported_packages(source: str, *, lazy: bool | None = None) -> set[str]:
    """Top-level names of our packages that ``source`` imports (relative imports stay inside).

    ``lazy=None``: every import; ``False``: module-level ones only; ``True``: those inside a
    function (run only when called).
    """
    found: set[str] = set()
    tree = ast.parse(source)
    inside_functions = {
        id(node)
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(function)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if lazy is not None and (id(node) in inside_functions) != lazy:
            continue
        found |= {name.split(".")[0] for name in names} & set(PACKAGES)
    return found


def test_the_reader_sees_absolute_lazy_and_relative_imports():
    source = "import backfill_api.model\nfrom .x import y\ndef f():\n    from backfill_operator import jobs\n"
    assert imported_packages(source) == {"backfill_api", "backfill_operator"}
    assert imported_packages(source, lazy=False) == {"backfill_api"}
    assert imported_packages(source, lazy=True) == {"backfill_operator"}


def modules_of(package: str) -> list[Path]:
    modules = sorted(PACKAGES[package].rglob("*.py"))
    assert modules, f"no modules found for {package} under {PACKAGES[package]}"
    return modules


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_package_imports_only_the_layers_below_it(package: str):
    violations = {}
    for path in modules_of(package):
        source = path.read_text()
        found = imported_packages(source) - ALLOWED[package] - {package}
        if found:
            violations[str(path.relative_to(ROOT))] = sorted(found)
    assert violations == {}


def imported_modules(source: str, package: str) -> set[str]:
    """Dotted names of ``package``'s modules that ``source`` imports (every import, also lazy;
    ``from package.layer import module`` gives ``package.layer.module``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == package}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "engine modules import each other by absolute name"
            if node.module and node.module.split(".")[0] == package:
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def layer_of(module: str) -> str | None:
    """``backfill_worker.sql.statements`` -> ``sql``; None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_engine_is_its_layers_and_nothing_else():
    root = PACKAGES["backfill_worker"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(ENGINE_LAYERS)
    assert [p.name for p in root.glob("*.py")] == ["__init__.py"], "every engine module lives in a layer"
    for layer in ENGINE_LAYERS:
        doc = ast.get_docstring(ast.parse((root / layer / "__init__.py").read_text()))
        assert doc and "imports" in doc, f"backfill_worker/{layer}/__init__.py must say what it holds and may import"


def test_no_engine_layer_imports_a_layer_above_it():
    root = PACKAGES["backfill_worker"]
    upward = {}
    for path in modules_of("backfill_worker"):
        relative = path.relative_to(root)
        own = relative.parts[0] if len(relative.parts) > 1 else None
        rank = ENGINE_LAYERS.index(own) if own else -1
        for module in imported_modules(path.read_text(), "backfill_worker"):
            layer = layer_of(module)
            if layer is not None and ENGINE_LAYERS.index(layer) > rank:
                upward.setdefault(str(relative), []).append(module)
    assert upward == {}


def test_the_layer_check_sees_an_upward_import():
    source = "from backfill_worker.run import engine\ndef f():\n    from backfill_worker.kube.worker import run_worker\n"
    assert {layer_of(m) for m in imported_modules(source, "backfill_worker")} == {"run", "kube"}


def test_the_django_modules_the_worker_loads_need_neither_the_cli_nor_the_operator():
    for name in ENGINE_SIDE:
        source = (PACKAGES["backfill_django"] / name).read_text()
        assert imported_packages(source) <= {"backfill_api", "backfill_worker", "backfill_django"}, name


def test_the_kubectl_plugin_uses_only_the_operators_jobs_and_the_engines_redaction():
    used: set[str] = set()
    for path in modules_of("backfill_kubectl"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                used.add(node.module)
            elif isinstance(node, ast.Import):
                used |= {alias.name for alias in node.names}
    outside = {m for m in used if m.split(".")[0] in {"backfill_operator", "backfill_worker"}}
    assert outside == KUBECTL_PLUGIN_USES
