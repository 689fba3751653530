"""The decision memo of the proxy handler: reused only while every input is unchanged."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from aiohttp import ClientSession

from proxy.policy.model import Membership
from proxy.stores.cache import RoleCache
from tests.web.conftest import Backend, Proxy, StartProxy

PATH = "/api/projects/proj-prod/workflows"


class CountingStore:
    """Answers that the test changes; counts the questions, to see when the cache asks."""

    backend = "test"

    def __init__(self) -> None:
        self.roles = {"bob": "developer"}
        self.calls = 0

    async def memberships(self, user: str) -> tuple[Membership, ...]:
        self.calls += 1
        role = self.roles.get(user)
        return () if role is None else (Membership("acme", "enterprise", role),)

    async def project_org(self, project: str) -> str | None:
        return "acme" if project in ("proj-prod", "proj-staging") else None

    async def open(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def status_of(proxy: Proxy, user: str, path: str = PATH, **headers: str) -> int:
    async with (
        ClientSession() as session,
        session.get(proxy.url + path, headers={"X-User-Id": user, **headers}) as resp,
    ):
        await resp.read()
        return resp.status


def lookups(proxy: Proxy) -> dict[str, float]:
    registry = proxy.server.runtime.metrics.registry
    return {
        result: registry.get_sample_value(
            "rbac_proxy_role_cache_requests_total", {"result": result}
        )
        or 0.0
        for result in ("hit", "miss", "negative")
    }


def with_store(proxy: Proxy, store: CountingStore, ttl: float) -> None:
    rt = proxy.server.runtime
    rt.cache = RoleCache(
        store, ttl=ttl, negative_ttl=ttl, on_lookup=rt.metrics.count_cache_lookup
    )


async def test_memoized_decisions_count_cache_hits_like_lookups(
    backend: Backend, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(backend.url)
    with_store(proxy, CountingStore(), ttl=300)
    assert await status_of(proxy, "bob") == 200  # both answers fetched: two misses
    for _ in range(3):
        assert await status_of(proxy, "bob") == 200
    await asyncio.sleep(0)
    assert lookups(proxy) == {"hit": 6.0, "miss": 2.0, "negative": 0.0}
    assert await status_of(proxy, "eve") == 403  # another caller: not bob's decision
    assert await status_of(proxy, "eve") == 403
    await asyncio.sleep(0)
    assert lookups(proxy) == {"hit": 6.0, "miss": 3.0, "negative": 1.0}


async def test_invalidation_ends_a_memoized_decision_at_once(
    backend: Backend, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(backend.url)
    store = CountingStore()
    with_store(proxy, store, ttl=300)
    for _ in range(3):
        assert await status_of(proxy, "bob") == 200
    store.roles = {}
    assert await status_of(proxy, "bob") == 200  # cached, as without the memo
    proxy.server.runtime.cache.invalidate("bob")
    assert await status_of(proxy, "bob") == 403
    assert store.calls == 2


async def test_a_memoized_decision_ends_with_the_freshness_of_its_answers(
    backend: Backend, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(backend.url)
    store = CountingStore()
    with_store(proxy, store, ttl=0.3)
    for _ in range(3):
        assert await status_of(proxy, "bob") == 200
    store.roles = {}
    await asyncio.sleep(0.35)
    assert await status_of(proxy, "bob") == 403
    assert store.calls == 2


async def test_a_swapped_policy_is_never_answered_from_the_memo(
    backend: Backend, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(backend.url)
    for _ in range(3):
        assert await status_of(proxy, "bob") == 200
    # A reload swaps the policy reference; in the new one developers lack workflows:read.
    holder = proxy.server.runtime.routes
    developer = holder.policy.roles["developer"]
    assert "workflows:read" in developer.granted
    roles = {
        **holder.policy.roles,
        "developer": replace(developer, granted=developer.granted - {"workflows:read"}),
    }
    holder.policy = replace(holder.policy, roles=roles)
    assert await status_of(proxy, "bob") == 403


async def test_different_org_hints_and_duplicate_identity_headers_are_different_callers(
    backend: Backend, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(backend.url)
    assert await status_of(proxy, "bob") == 200
    assert await status_of(proxy, "bob", **{"X-Org-Id": "smallco"}) == 403
    assert await status_of(proxy, "bob") == 200
    assert await status_of(proxy, "bob", path=PATH + "?x=1") == 200
    assert await status_of(proxy, "bob", path="/api/projects/proj-none/workflows") == 403



async def test_only_short_keys_are_memoized(backend: Backend, start_proxy: StartProxy) -> None:
    from aiohttp.test_utils import make_mocked_request

    from proxy.web.handler import ProxyHandler

    proxy = await start_proxy(backend.url)
    handler = ProxyHandler(proxy.server.runtime)

    def key(path: str, **headers: str) -> object:
        request = make_mocked_request("GET", path, headers={"X-User-Id": "bob", **headers})
        return handler._memo_key(request)

    assert key(PATH) is not None
    assert key(PATH + "?" + "q" * 600) is None  # long targets: decided every time
    assert key(PATH, **{"X-User-Id": "u" * 300}) is None
    assert key(PATH, Upgrade="websocket") is None
    # A long target still gets the same answer, just without the memo.
    assert await status_of(proxy, "bob", path=PATH + "?" + "q" * 600) == 200
