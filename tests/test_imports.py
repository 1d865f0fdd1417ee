"""Imports flow one way (docs/architecture.md): checked on the source, without importing it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _ours(mods: set[str]) -> set[str]:
    return {m for m in mods if m.split(".")[0] in ("balancer", "policies", "simulator")}


def test_model_imports_nothing_of_ours() -> None:
    for path in (ROOT / "balancer/model").rglob("*.py"):
        ours = _ours(_imports(path))
        assert {m for m in ours if not m.startswith("balancer.model")} == set(), path


def test_policies_import_only_the_model_and_errors() -> None:
    for path in (ROOT / "policies").rglob("*.py"):
        bad = {m for m in _ours(_imports(path))
               if not (m.startswith(("balancer.model", "policies", "balancer.errors",
                                     "balancer.migration_model")))}
        assert bad == set(), (path, bad)


def test_balancer_never_imports_simulator() -> None:
    for path in (ROOT / "balancer").rglob("*.py"):
        bad = {m for m in _imports(path) if m.split(".")[0] == "simulator"}
        assert bad == set(), (path, bad)


def test_solver_and_verify_import_model_not_service() -> None:
    for path in [*(ROOT / "balancer/solver").rglob("*.py"), ROOT / "balancer/verify.py"]:
        bad = {m for m in _ours(_imports(path))
               if m.startswith(("balancer.service", "balancer.cli", "balancer.api",
                                "balancer.daemon", "policies"))}
        assert bad == set(), (path, bad)
