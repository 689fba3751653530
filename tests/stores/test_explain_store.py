"""`rbac-proxy explain --store postgresql://…` answers from the database like from the file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.__main__ import main
from tests.stores.pg import fresh_database, load_members

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("user", "path", "code", "reason"),
    [
        ("bob", "/api/projects/proj-prod/workflows", 0, "allowed"),
        ("carol", "/api/projects/proj-prod/workflows", 1, "missing_permission"),
        ("fay", "/api/projects/sc-main/task-history", 1, "plan_restricted"),
        ("alice", "/api/projects/nope/workflows", 1, "unknown_project"),
    ],
)
async def test_explain_with_postgresql_store(
    user: str, path: str, code: int, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with fresh_database() as dsn:
        await load_members(dsn, str(ROOT / "members.yaml"))
        routes = str(ROOT / "routes.yaml")
        # explain runs its own event loop: call it from a worker thread.
        got = await asyncio.to_thread(
            main, ["explain", "--routes", routes, "--store", dsn, "--user", user, "GET", path]
        )
    out = capsys.readouterr().out
    assert got == code, out
    assert f"reason:       {reason}" in out


def test_explain_with_an_unreachable_store_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    got = main(["explain", "--store", "http://127.0.0.1:9/", "--user", "bob", "GET", "/api/org"])
    assert got == 2
    assert "explain:" in capsys.readouterr().err
