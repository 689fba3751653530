"""`rbac-proxy store init|import` through the real entry point, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from proxy.stores.postgres import PostgresStore
from tests.stores.pg import fresh_database

ROOT = Path(__file__).resolve().parents[2]


async def _cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "store", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_init_twice_then_import_then_bad_import_changes_nothing(tmp_path: Path) -> None:
    async with fresh_database() as dsn:
        assert (await _cli("init", "--store", dsn))[0] == 0
        assert (await _cli("init", "--store", dsn))[0] == 0  # idempotent
        code, out = await _cli("import", str(ROOT / "members.yaml"), "--store", dsn)
        assert code == 0, out
        bad = tmp_path / "bad.yaml"
        bad.write_text("orgs:\n  acme:\n    plan: enterprise\n    members: {bob: [1]}\n")
        code, out = await _cli("import", str(bad), "--store", dsn)
        assert code == 1
        assert "bad.yaml:4" in out  # file:line of the bad member
        store = PostgresStore(dsn, timeout=5)
        await store.open()
        try:
            bob = await store.memberships("bob")
            assert [(m.org, m.role) for m in bob] == [("acme", "developer")]
            assert await store.project_org("sc-main") == "smallco"
        finally:
            await store.close()


async def test_import_needs_a_store(tmp_path: Path) -> None:
    code, out = await _cli("import", str(ROOT / "members.yaml"), "--store", "file:x.yaml")
    assert code == 2
    assert "postgresql" in out
