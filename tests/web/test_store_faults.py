"""Role store faults through a running proxy: stale service, fast 503, circuit breaker, healing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from proxy.policy.members import Directory, parse_members
from proxy.stores.guard import GuardedStore
from proxy.web.admin import READY_PING_TTL
from proxy.yamlsource import parse_yaml
from tests.web.conftest import SHIPPED_MEMBERS, Backend, Proxy, StartProxy

Mode = Literal["ok", "hanging", "garbage", "error500"]
Fault = Literal["down", "hanging", "garbage", "error500"]

STORE_TIMEOUT = 0.5
PROJECT_PAGE = "/api/projects/proj-prod"  # projects:read: alice (admin) yes, sue (support) no
HANG_LIMIT = 20.0  # a hanging handler gives up after this, so teardown never waits forever


def shipped_directory() -> Directory:
    text = Path(SHIPPED_MEMBERS).read_text("utf-8")
    return parse_members(parse_yaml(text, SHIPPED_MEMBERS), SHIPPED_MEMBERS)


class RoleService:
    """The SPEC §6 HTTP role service on a fixed loopback port; a test switches its behaviour.

    `down` is real: the listener is closed (connection refused) and reopened on the same port.
    """

    def __init__(self) -> None:
        self.directory = shipped_directory()
        self.mode: Mode = "ok"
        self.lookups = 0  # member/project requests, pings excluded
        self.pings = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/members/{user}", self._member)
        app.router.add_get("/projects/{project}", self._project)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self.port = next(int(a[1]) for a in runner.addresses if isinstance(a, tuple))
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _misbehave(self) -> web.Response | None:
        if self.mode == "hanging":
            deadline = time.monotonic() + HANG_LIMIT
            while self.mode == "hanging" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return web.Response(status=503)
        if self.mode == "garbage":
            return web.Response(status=200, text="{not json", content_type="application/json")
        if self.mode == "error500":
            return web.Response(status=500, text="internal error")
        return None

    async def _member(self, request: web.Request) -> web.Response:
        user = request.match_info["user"]
        if user == "__rbac_proxy_ping__":
            self.pings += 1
        else:
            self.lookups += 1
        bad = await self._misbehave()
        if bad is not None:
            return bad
        found = self.directory.memberships(user)
        if not found:
            return web.json_response({"error": "not found"}, status=404)
        items = [
            {"org": m.org, "plan": m.plan, "role": m.role, "projects": dict(m.projects)}
            for m in found
        ]
        return web.json_response({"user": user, "memberships": items})

    async def _project(self, request: web.Request) -> web.Response:
        self.lookups += 1
        bad = await self._misbehave()
        if bad is not None:
            return bad
        name = request.match_info["project"]
        org = self.directory.project_org(name)
        if org is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response({"project": name, "org": org})


@pytest.fixture
async def service() -> AsyncIterator[RoleService]:
    svc = RoleService()
    await svc.start()
    yield svc
    svc.mode = "ok"  # releases hanging handlers
    await svc.stop()


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: CIMultiDict[str]
    seconds: float
    audit: dict[str, Any]


class Client:
    def __init__(self, session: aiohttp.ClientSession, proxy: Proxy) -> None:
        self.session = session
        self.proxy = proxy

    async def ask(self, user: str, path: str = PROJECT_PAGE) -> Answer:
        started = time.perf_counter()
        async with self.session.get(self.proxy.url + path, headers={"X-User-Id": user}) as resp:
            raw = await resp.read()
            seconds = time.perf_counter() - started
            headers = resp.headers.copy()
            status = resp.status
        rid = headers["X-Request-Id"]
        audit = [json.loads(line) for line in self.proxy.audit_lines()]
        mine = [a for a in audit if a["request_id"] == rid]
        assert len(mine) == 1, f"one audit line per decision, got {mine}"
        body = json.loads(raw) if raw and status >= 400 else {}
        return Answer(status, body, headers, seconds, mine[0])

    async def readyz(self) -> int:
        async with self.session.get(self.proxy.admin_url + "/readyz") as resp:
            return resp.status

    async def metric(self, name: str, **labels: str) -> float:
        async with self.session.get(self.proxy.admin_url + "/metrics") as resp:
            text = await resp.text()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total


async def start_against(
    start_proxy: StartProxy, backend: Backend, service: RoleService, **overrides: Any
) -> tuple[Proxy, GuardedStore]:
    settings: dict[str, Any] = {
        "store": service.url,
        "store_timeout": STORE_TIMEOUT,
        # Entries go stale fast (so a store call is attempted) but stay usable for minutes.
        "cache_ttl": 0.2,
        "cache_negative_ttl": 0.2,
        "cache_stale_ttl": 300.0,
    }
    settings.update(overrides)
    proxy = await start_proxy(backend.url, **settings)
    guard = proxy.server.runtime.store
    assert isinstance(guard, GuardedStore), "network stores must run behind the guard"
    assert guard.backend == "http"
    return proxy, guard


def state(guard: GuardedStore) -> str:
    """The circuit state, read afresh (a plain str: mypy must not narrow it across awaits)."""
    return guard.state


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def apply(service: RoleService, fault: Fault) -> None:
    if fault == "down":
        await service.stop()
    else:
        service.mode = fault


async def heal(service: RoleService, fault: Fault) -> None:
    service.mode = "ok"
    if fault == "down":
        await service.start()  # same port: the proxy was never told anything


async def wait_until_allowed(client: Client, user: str, tries: int = 60) -> Answer:
    """Bounded polling: the breaker admits a trial after reset_after, then the circuit closes."""
    answer = await client.ask(user)
    for _ in range(tries):
        if answer.status == 200:
            break
        await asyncio.sleep(0.05)
        answer = await client.ask(user)
    return answer


FAULTS: list[Fault] = ["down", "hanging", "garbage", "error500"]


@pytest.mark.parametrize("fault", FAULTS)
async def test_warm_users_served_stale_cold_users_503_then_heal(
    fault: Fault,
    backend: Backend,
    start_proxy: StartProxy,
    service: RoleService,
    session: aiohttp.ClientSession,
) -> None:
    proxy, guard = await start_against(start_proxy, backend, service)
    guard.reset_after = 0.3  # the default 5 s would only slow the healing step down
    client = Client(session, proxy)

    # Healthy: alice and sue are looked up once (memberships and the project's org).
    alice = await client.ask("alice")
    sue = await client.ask("sue")
    assert (alice.status, alice.audit["stale"]) == (200, False)
    assert (sue.status, sue.body["reason"], sue.audit["stale"]) == (
        403,
        "missing_permission",
        False,
    )

    await apply(service, fault)
    await asyncio.sleep(0.25)  # past cache_ttl: every lookup now goes to the broken store

    # Warm users: the same, correct answers from stale entries, and the audit line says so.
    for _ in range(3):
        alice = await client.ask("alice")
        assert alice.status == 200, (fault, alice.body)
        assert alice.audit["stale"] is True
        assert alice.audit["reason"] == "allowed"
        sue = await client.ask("sue")
        assert (sue.status, sue.body.get("reason")) == (403, "missing_permission"), fault
        assert sue.audit["stale"] is True

    # Cold user: fail closed, fast, with Retry-After.
    bob = await client.ask("bob")
    assert bob.status == 503, fault
    assert bob.body["reason"] == "store_unavailable"
    assert bob.headers["Content-Type"].startswith("application/json")
    assert int(bob.headers["Retry-After"]) > 0
    assert bob.seconds < STORE_TIMEOUT + 1.5
    assert bob.audit["reason"] == "store_unavailable"

    # Recovery without a restart: cold users get in, warm users get fresh answers again.
    await heal(service, fault)
    bob = await wait_until_allowed(client, "bob")
    assert bob.status == 200, bob.body
    assert bob.audit["stale"] is False
    await asyncio.sleep(0.25)
    alice = await client.ask("alice")
    assert (alice.status, alice.audit["stale"]) == (200, False)
    assert state(guard) == "closed"


async def test_cold_503_while_hanging_is_bounded_by_the_store_timeout(
    backend: Backend,
    start_proxy: StartProxy,
    service: RoleService,
    session: aiohttp.ClientSession,
) -> None:
    proxy, guard = await start_against(start_proxy, backend, service)
    guard.failure_threshold = 1000  # every request really waits on the hanging store
    client = Client(session, proxy)
    service.mode = "hanging"
    answers = await asyncio.gather(*(client.ask(f"cold-{i}") for i in range(10)))
    assert [a.status for a in answers] == [503] * 10
    assert all(a.body["reason"] == "store_unavailable" for a in answers)
    slowest = max(a.seconds for a in answers)
    # Fail fast: the store timeout plus scheduling slack, never the hanging handler's time.
    assert slowest < 2.0, slowest
    assert service.lookups >= 10  # they really did wait on the store


async def test_circuit_breaker_spares_a_failing_store(
    backend: Backend,
    start_proxy: StartProxy,
    service: RoleService,
    session: aiohttp.ClientSession,
) -> None:
    proxy, guard = await start_against(start_proxy, backend, service)
    client = Client(session, proxy)
    service.mode = "error500"
    limit = asyncio.Semaphore(20)

    async def one(i: int) -> int:
        async with limit:
            return (await client.ask(f"cold-{i}")).status

    statuses = await asyncio.gather(*(one(i) for i in range(300)))
    assert statuses == [503] * 300
    # At most the threshold, plus the calls already admitted when the circuit opened.
    assert service.lookups <= guard.failure_threshold + 20, service.lookups
    assert state(guard) == "open"
    errors = await client.metric("rbac_proxy_role_store_errors_total", backend="http")
    assert errors == service.lookups  # each real store call is observed, rejections are not
    calls = await client.metric("rbac_proxy_role_store_duration_seconds_count", backend="http")
    assert calls == service.lookups

    # Recovery: after reset_after one trial goes through, succeeds, and everything heals.
    service.mode = "ok"
    guard.reset_after = 0.0
    statuses = await asyncio.gather(*(one(i) for i in range(50)))
    # A request arriving while the trial runs may still be refused; none after it closed.
    assert set(statuses) <= {403, 503}
    assert state(guard) == "closed"
    assert [(await client.ask(u)).status for u in ("alice", "bob", "carol")] == [200, 200, 403]
    assert (await client.ask("nobody")).body["reason"] == "not_a_member"


async def test_circuit_breaker_spares_a_closed_port(
    backend: Backend,
    start_proxy: StartProxy,
    service: RoleService,
    session: aiohttp.ClientSession,
) -> None:
    proxy, guard = await start_against(start_proxy, backend, service)
    client = Client(session, proxy)
    await service.stop()
    statuses = [(await client.ask(f"cold-{i}")).status for i in range(100)]
    assert statuses == [503] * 100
    attempts = await client.metric("rbac_proxy_role_store_errors_total", backend="http")
    assert attempts == guard.failure_threshold  # sequential: exactly the threshold, then open
    assert state(guard) == "open"


async def test_readyz_follows_the_store(
    backend: Backend,
    start_proxy: StartProxy,
    service: RoleService,
    session: aiohttp.ClientSession,
) -> None:
    proxy, _ = await start_against(start_proxy, backend, service)
    client = Client(session, proxy)
    assert await client.readyz() == 200
    assert service.pings == 1
    # Probes within READY_PING_TTL share one ping: an unauthenticated probe is not a way to
    # load the store.
    assert [await client.readyz() for _ in range(5)] == [200] * 5
    assert service.pings == 1
    await service.stop()
    await asyncio.sleep(READY_PING_TTL)
    assert await client.readyz() == 503
    service.mode = "hanging"
    await service.start()
    await asyncio.sleep(READY_PING_TTL)
    started = time.perf_counter()
    assert await client.readyz() == 503  # hanging counts as unreachable, within the timeout
    assert time.perf_counter() - started < 2.0
    service.mode = "ok"
    await asyncio.sleep(READY_PING_TTL)
    assert await client.readyz() == 200


async def test_proxy_starts_unready_with_the_store_down_and_heals(
    backend: Backend,
    start_proxy: StartProxy,
    service: RoleService,
    session: aiohttp.ClientSession,
) -> None:
    await service.stop()
    proxy, guard = await start_against(start_proxy, backend, service)
    guard.reset_after = 0.2
    client = Client(session, proxy)
    assert await client.readyz() == 503
    assert (await client.ask("alice")).status == 503
    await service.start()
    await asyncio.sleep(READY_PING_TTL)
    assert await client.readyz() == 200
    assert (await wait_until_allowed(client, "alice")).status == 200


@pytest.mark.parametrize("cut_by", ["the client leaving", "the drain ending"])
async def test_a_request_cut_while_the_store_hangs_is_still_audited(
    cut_by: str, backend: Backend, start_proxy: StartProxy, service: RoleService
) -> None:
    """A request cut before its decision, while the store has not answered, is counted and
    audited (499, store_unavailable) like one cut later: the client may leave, or SIGTERM's
    drain may end (--shutdown-timeout shorter than --store-timeout). Nothing is forwarded."""
    proxy, guard = await start_against(
        start_proxy, backend, service, store_timeout=10.0, shutdown_timeout=0.5
    )
    guard.failure_threshold = 1000
    service.mode = "hanging"
    before = len(backend.received)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
    writer.write(b"GET /api/org HTTP/1.1\r\nHost: x\r\nX-User-Id: cold-cut\r\n\r\n")
    await writer.drain()
    deadline = time.monotonic() + 10
    while service.lookups == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)  # the proxy now waits on the store for this request
    assert service.lookups > 0
    if cut_by == "the client leaving":
        writer.close()
        while not proxy.audit_lines() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    else:
        async with asyncio.timeout(10):
            await proxy.server.drain_and_stop()
        assert await reader.read() == b""  # cut, no answer
        writer.close()
    lines = [json.loads(line) for line in proxy.audit_lines()]
    assert [(a["status"], a["reason"], a["decision"]) for a in lines] == [
        (499, "store_unavailable", "deny")
    ]
    assert len(backend.received) == before
    metrics = proxy.server.runtime.metrics
    metrics.flush()  # counters are batched per loop iteration
    counted = sum(
        sample.value
        for family in metrics.requests.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
        and sample.labels.get("reason") == "store_unavailable"
        and sample.labels.get("code") == "499"
    )
    assert counted == 1
