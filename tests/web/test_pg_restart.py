"""PostgreSQL "restarted" mid-traffic: every server connection of the proxy is killed at once.

`pg_terminate_backend` on all of the proxy's sessions is what a database restart looks like from
the proxy (pool and LISTEN connections drop together) without stopping the shared test cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import ClientSession

from tests.stores.pg import connect, fresh_database, load_members
from tests.web.conftest import SHIPPED_MEMBERS, Backend, StartProxy

WF = "/api/projects/proj-prod/workflows"


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with fresh_database() as dsn:
        await load_members(dsn, SHIPPED_MEMBERS)
        yield dsn


async def _kill_sessions(dsn: str) -> int:
    conn = await connect(dsn)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return int(killed)


async def test_connections_killed_mid_traffic_heal_without_restart(
    backend: Backend, start_proxy: StartProxy, database: str
) -> None:
    # A long TTL: only the LISTEN connection can explain a fast revocation at the end.
    proxy = await start_proxy(backend.url, store=database, store_timeout=1.0, cache_ttl=60)
    statuses: list[int] = []
    async with ClientSession() as s:

        async def get(user: str) -> int:
            async with s.get(proxy.url + WF, headers={"X-User-Id": user}) as r:
                await r.read()
                return r.status

        assert await get("bob") == 200  # warm: bob is cached
        killed = await _kill_sessions(database)
        assert killed >= 2  # at least one pool connection and the LISTEN connection
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and len(statuses) < 500:  # bounded
            statuses.append(await get("bob"))
            await asyncio.sleep(0.005)
        # Warm bob never loses access: a fresh entry, a reconnect, or a stale answer.
        assert set(statuses) == {200}, statuses
        # A cold user is answered from the database again (the pool reconnected by itself).
        for _ in range(100):  # ≤ ~5 s
            status = await get("alice")
            if status == 200:
                break
            assert status == 503  # never a wrong answer while it heals
            await asyncio.sleep(0.05)
        assert status == 200
        # The LISTEN connection came back too: a revocation still applies at once.
        for _ in range(100):  # wait until the listener is back (≤ ~5 s)
            pg = proxy.server.runtime.store
            inner = getattr(pg, "inner", pg)
            if getattr(inner, "listening", False):
                break
            await asyncio.sleep(0.05)
        assert getattr(inner, "listening", False)
        conn = await connect(database)
        try:
            await conn.execute(
                "UPDATE members SET role = 'support' WHERE user_id = 'bob' AND org_id = 'acme'"
            )
        finally:
            await conn.close()
        for _ in range(100):  # ≤ ~1 s
            if await get("bob") == 403:
                break
            await asyncio.sleep(0.01)
        assert await get("bob") == 403
