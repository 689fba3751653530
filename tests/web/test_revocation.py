"""Live revocation: a role change committed in PostgreSQL reaches a running proxy within 1 s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import ClientSession

from tests.stores.pg import connect, fresh_database, load_members
from tests.web.conftest import SHIPPED_MEMBERS, Backend, StartProxy

MAX_REQUESTS = 2000
MAX_SECONDS = 5.0
SETTLE = 0.2  # traffic flows this long before the change is committed
AFTER = 20  # requests checked after the first changed answer: no flapping back


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """A fresh database holding schema.sql and the shipped members.yaml."""
    async with fresh_database() as dsn:
        await load_members(dsn, SHIPPED_MEMBERS)
        yield dsn


@dataclass
class Run:
    statuses: list[int] = field(default_factory=list)
    committed_index: int | None = None  # len(statuses) when the COMMIT returned
    latency: float | None = None  # seconds from COMMIT returned to the first changed answer
    reason: str | None = None  # the reason of the first changed answer


async def change_under_traffic(
    proxy_url: str, database: str, user: str, path: str, sql: str, before: int
) -> Run:
    """Loop requests as `user`; commit `sql` meanwhile; time the first status != `before`.

    Bounded: MAX_REQUESTS requests or MAX_SECONDS, whichever comes first.
    """
    run = Run()
    committed_at: float | None = None
    conn = await connect(database)

    async def commit() -> None:
        nonlocal committed_at
        await asyncio.sleep(SETTLE)
        await conn.execute(sql)  # autocommit: returns after COMMIT
        committed_at = time.perf_counter()
        run.committed_index = len(run.statuses)

    writer = asyncio.create_task(commit())
    changed_at: float | None = None
    changed_index = 0
    deadline = time.perf_counter() + MAX_SECONDS
    try:
        async with ClientSession() as session:
            for _ in range(MAX_REQUESTS):
                async with session.get(proxy_url + path, headers={"X-User-Id": user}) as resp:
                    body = await resp.json() if resp.status == 403 else None
                    await resp.read()
                now = time.perf_counter()
                run.statuses.append(resp.status)
                if changed_at is None and resp.status != before:
                    changed_at, changed_index = now, len(run.statuses)
                    run.reason = None if body is None else body.get("reason")
                if changed_at is not None and len(run.statuses) >= changed_index + AFTER:
                    break
                if now > deadline:
                    break
        await writer
    finally:
        writer.cancel()
        await conn.close()
    if changed_at is not None and committed_at is not None:
        # The proxy shares this event loop, so it can answer from the new data before the
        # writer coroutine resumes: a slightly negative value means "already applied".
        run.latency = changed_at - committed_at
    return run


async def test_role_change_denies_within_a_second(
    backend: Backend, start_proxy: StartProxy, database: str
) -> None:
    # A long cache TTL: only the LISTEN invalidation can make the change visible in time.
    proxy = await start_proxy(backend.url, store=database, cache_ttl=60)
    path = "/api/projects/proj-prod/workflows"  # workflows:read: developer yes, support no
    run = await change_under_traffic(
        proxy.url,
        database,
        "bob",
        path,
        "UPDATE members SET role = 'support' WHERE org_id = 'acme' AND user_id = 'bob'",
        before=200,
    )
    assert run.committed_index is not None and run.committed_index > 0
    assert set(run.statuses[: run.committed_index]) == {200}  # bob was allowed (and cached)
    assert run.latency is not None, f"bob was never denied: {len(run.statuses)} requests"
    print(f"\nrevocation latency (COMMIT -> first 403): {run.latency * 1000:.1f} ms")
    assert run.latency < 1.0
    assert run.reason == "missing_permission"
    first = run.statuses.index(403)
    assert set(run.statuses[first:]) == {403}  # once denied, never allowed again
    assert len(run.statuses) - first >= AFTER


async def test_plan_upgrade_grants_within_a_second(
    backend: Backend, start_proxy: StartProxy, database: str
) -> None:
    # fay is support in smallco (plan pro): not honoured until the plan becomes enterprise.
    # The orgs trigger sends '*', which drops every cached answer.
    proxy = await start_proxy(backend.url, store=database, cache_ttl=60)
    run = await change_under_traffic(
        proxy.url,
        database,
        "fay",
        "/api/projects/sc-main/task-history",
        "UPDATE orgs SET plan = 'enterprise' WHERE id = 'smallco'",
        before=403,
    )
    assert run.committed_index is not None and run.committed_index > 0
    assert set(run.statuses[: run.committed_index]) == {403}
    assert run.latency is not None, f"fay was never allowed: {len(run.statuses)} requests"
    print(f"\nplan change latency (COMMIT -> first 200): {run.latency * 1000:.1f} ms")
    assert run.latency < 1.0
    first = run.statuses.index(200)
    assert set(run.statuses[first:]) == {200}


async def test_removed_member_is_denied_within_a_second(
    backend: Backend, start_proxy: StartProxy, database: str
) -> None:
    proxy = await start_proxy(backend.url, store=database, cache_ttl=60)
    run = await change_under_traffic(
        proxy.url,
        database,
        "carol",
        "/api/projects/proj-staging/workflows",
        "DELETE FROM members WHERE org_id = 'acme' AND user_id = 'carol'",  # cascades: bindings
        before=200,
    )
    assert run.latency is not None and run.latency < 1.0
    assert run.reason == "not_a_member"
