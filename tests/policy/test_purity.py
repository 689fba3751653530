"""The policy core stays pure: no I/O, asyncio, aiohttp, yaml, asyncpg or prometheus imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

POLICY = Path(__file__).resolve().parents[2] / "proxy" / "policy"
FORBIDDEN = {
    "asyncio", "aiohttp", "yaml", "asyncpg", "prometheus_client", "socket", "ssl", "os",
    "io", "pathlib", "subprocess", "http", "multidict", "yarl", "cachetools", "jwt",
    "time",
}  # fmt: skip
ALLOWED_INTERNAL = "proxy.policy"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", sorted(POLICY.glob("*.py")), ids=lambda p: p.name)
def test_policy_module_imports_nothing_impure(path: Path) -> None:
    for name in _imports(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN, f"{path.name} imports {name}"
        assert name != "urllib" and not name.startswith("urllib.request"), name  # .parse is pure
        if top == "proxy":
            assert name.startswith(ALLOWED_INTERNAL), f"{path.name} imports {name} (outward)"


def test_the_scan_sees_the_modules() -> None:
    names = {p.name for p in POLICY.glob("*.py")}
    assert {"canonical.py", "compile.py", "decide.py", "match.py", "model.py"} <= names
