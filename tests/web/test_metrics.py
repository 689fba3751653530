"""Metrics through a running proxy: exact counter values after a scripted mix, bounded labels."""

from __future__ import annotations

import asyncio
import random
import string
from collections.abc import Iterable

from aiohttp import ClientSession
from prometheus_client.parser import text_string_to_metric_families

from proxy.policy.model import Membership, Reason
from proxy.stores.base import StoreError
from tests.web.conftest import Backend, Proxy, StartProxy

WF = "/api/projects/{project_id}/workflows"
BILLING = "/api/org/billing"


def _samples(text: str) -> Iterable[tuple[str, dict[str, str], float]]:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, dict(sample.labels), sample.value


async def _scrape(session: ClientSession, proxy: Proxy) -> str:
    async with session.get(proxy.admin_url + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def _value(text: str, name: str, **labels: str) -> float:
    return sum(
        v
        for n, lab, v in _samples(text)
        if n == name and all(lab.get(k) == want for k, want in labels.items())
    )


class _DownStore:
    backend = "file"

    async def open(self) -> None:
        return None

    async def memberships(self, user: str) -> tuple[Membership, ...]:
        raise StoreError("down")

    async def project_org(self, project: str) -> str | None:
        raise StoreError("down")

    async def ping(self) -> None:
        raise StoreError("down")

    async def close(self) -> None:
        return None


async def test_scripted_mix_counts_exactly(backend: Backend, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(backend.url)
    dead = await start_proxy("http://127.0.0.1:9")  # discard port: nothing listens there
    async with ClientSession() as s:
        before = await _scrape(s, proxy)
        for reason in Reason:  # pre-initialised: every reason is present before any traffic
            assert any(
                n == "rbac_proxy_requests_total" and lab["reason"] == reason.value
                for n, lab, _ in _samples(before)
            ), reason
        path = "/api/projects/proj-prod/workflows"
        for _ in range(3):
            async with s.get(proxy.url + path, headers={"X-User-Id": "bob"}) as r:
                assert r.status == 200
        for _ in range(2):
            async with s.get(proxy.url + "/api/org/billing", headers={"X-User-Id": "bob"}) as r:
                assert r.status == 403
        async with s.get(proxy.url + "/api/org/billing") as r:
            assert r.status == 401
        async with s.get(dead.url + path, headers={"X-User-Id": "bob"}) as r:
            assert r.status == 502
        proxy.server.runtime.cache.invalidate()
        proxy.server.runtime.cache._store = _DownStore()  # the cache's store goes down
        async with s.get(proxy.url + path, headers={"X-User-Id": "alice"}) as r:
            assert r.status == 503
        text = await _scrape(s, proxy)
        dead_text = await _scrape(s, dead)

    total = "rbac_proxy_requests_total"
    assert _value(text, total, route=WF, reason="allowed", code="200", decision="allow") == 3
    assert _value(text, total, route=BILLING, reason="missing_permission", code="403") == 2
    assert _value(text, total, route=BILLING, reason="missing_credentials", code="401") == 1
    assert _value(text, total, route=WF, reason="store_unavailable", code="503") == 1
    assert _value(dead_text, total, route=WF, reason="upstream_unavailable", code="502") == 1
    assert _value(dead_text, "rbac_proxy_upstream_errors_total", kind="connect") == 1
    assert _value(text, "rbac_proxy_request_duration_seconds_count", route=WF) == 4
    assert _value(text, "rbac_proxy_upstream_duration_seconds_count", route=WF) == 3
    assert _value(text, "rbac_proxy_role_cache_requests_total", result="miss") >= 1
    assert _value(text, "rbac_proxy_role_cache_requests_total", result="hit") >= 2
    assert _value(text, "rbac_proxy_config_routes") == len(
        proxy.server.runtime.routes.policy.routes
    )
    assert _value(text, "rbac_proxy_build_info") == 1
    assert _value(text, "rbac_proxy_inflight_requests") == 0
    assert "bob" not in text and "alice" not in text  # never a user id in a label


async def test_hostile_traffic_keeps_label_sets_bounded(
    backend: Backend, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(backend.url, audit="off")
    rng = random.Random(7)
    methods = ["GET", "POST", "DELETE", "PROPFIND", "BREW", "FOO", "get", "M" * 20]

    def word() -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 12)))

    requests = []
    for _ in range(10_000):
        depth = rng.randint(1, 6)
        path = "/" + "/".join(word() for _ in range(depth))
        if rng.random() < 0.4:
            path = f"/api/projects/{word()}/" + rng.choice(["workflows", "secrets", word()])
        requests.append((rng.choice(methods), path, word()))

    sem = asyncio.Semaphore(32)
    async with ClientSession() as s:

        async def one(method: str, path: str, user: str) -> int:
            async with sem, s.request(method, proxy.url + path, headers={"X-User-Id": user}) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one(*req) for req in requests))
        text = await _scrape(s, proxy)
    assert set(statuses) <= {400, 403, 405}
    label_sets = {(n, tuple(sorted(lab.items()))) for n, lab, _ in _samples(text) if lab}
    assert len(label_sets) < 200, len(label_sets)
    methods_seen = {
        lab["method"] for n, lab, _ in _samples(text) if n == "rbac_proxy_requests_total"
    }
    assert methods_seen <= {"GET", "POST", "DELETE", "OTHER", "HEAD"}
