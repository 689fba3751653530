"""Hot reload of routes.yaml and members.yaml: polling, ConfigMap swaps, SIGHUP, admin, traffic."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.web.serve import reload_all
from tests.web.conftest import SHIPPED_MEMBERS, Backend, Proxy, StartProxy

INTERVAL = 0.2  # reload_interval of the polling proxies
ADMIN_TOKEN = "reload-test-token"
MEMBERS_PAGE = "/api/org/members"  # team:read in v1 (bob allowed), billing:read in v2 (denied)


def routes_yaml(members_permission: str = "team:read", *, extra_case: str = "") -> str:
    """A small policy with its own tests. Block style: braces in flow mappings break YAML."""
    return f"""\
version: 1
default: deny
mode: enforce
roles:
  admin:
    permissions: [team:read, billing:read, projects:read]
  developer:
    permissions: [team:read, projects:read]
  support:
    permissions: [task_history:read]
plans:
  enterprise:
    roles: [admin, developer, support]
    project_bindings: true
  "*":
    roles: [admin, developer]
    project_bindings: false
routes:
  - path: /healthz
    methods: [GET]
    public: true
  - path: /api/org/members
    methods: [GET]
    permission: {members_permission}
  - path: /api/org/billing
    methods: [GET]
    permission: billing:read
  - path: /api/projects/{{project_id}}
    methods: [GET]
    permission: projects:read
tests:
  members:
    orgs:
      acme:
        plan: enterprise
        projects: [proj-prod]
        members:
          alice: admin
          bob: developer
          sue: support
  cases:
    - user: alice
      method: GET
      path: /api/org/billing
      expect: allow
    - user: sue
      method: GET
      path: /api/org/billing
      expect: deny
      reason: missing_permission
{extra_case}"""


V1 = routes_yaml("team:read")
V2 = routes_yaml("billing:read")  # bob (developer) loses the members page


def line_of(text: str, marker: str) -> int:
    """1-based line of the first line containing marker."""
    for number, line in enumerate(text.splitlines(), start=1):
        if marker in line:
            return number
    raise AssertionError(f"{marker!r} not in text")


def _bad_yaml() -> tuple[str, int]:
    text = V1.replace(
        "    methods: [GET]\n    permission: team:read", "    methods: [GET\n    x: ]]"
    )
    return text, line_of(text, "x: ]]")


def _unknown_permission() -> tuple[str, int]:
    text = routes_yaml("team:raed")
    return text, line_of(text, "team:raed")


def _failing_policy_test() -> tuple[str, int]:
    # The edit itself is well-formed, but its own test says bob must not read the members page.
    case = "    - user: bob\n      method: GET\n      path: /api/org/members\n      expect: deny\n"
    text = routes_yaml("team:read", extra_case=case)
    return text, line_of(text, "    - user: bob")


INVALID_EDITS: dict[str, Callable[[], tuple[str, int]]] = {
    "bad_yaml": _bad_yaml,
    "unknown_permission": _unknown_permission,
    "failing_policy_test": _failing_policy_test,
}


def write_atomic(path: Path, text: str) -> None:
    """Replace the file in one step, as editors and ConfigMaps do: a poll never sees half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, "utf-8")
    os.replace(tmp, path)


@dataclass
class Files:
    routes: Path
    members: Path


@pytest.fixture
def files(tmp_path: Path) -> Files:
    routes = tmp_path / "routes.yaml"
    routes.write_text(V1, "utf-8")
    members = tmp_path / "members.yaml"
    shutil.copyfile(SHIPPED_MEMBERS, members)
    return Files(routes, members)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def status_of(
    session: aiohttp.ClientSession, proxy: Proxy, user: str, path: str = MEMBERS_PAGE
) -> int:
    async with session.get(proxy.url + path, headers={"X-User-Id": user}) as resp:
        await resp.read()
        return resp.status


async def metric(session: aiohttp.ClientSession, proxy: Proxy, name: str, **labels: str) -> float:
    async with session.get(proxy.admin_url + "/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def reloads(session: aiohttp.ClientSession, proxy: Proxy, file: str, result: str) -> float:
    return await metric(session, proxy, "rbac_proxy_config_reloads_total", file=file, result=result)


async def eventually(check: Callable[[], Any], *, polls: int = 10) -> bool:
    """Wait (bounded: `polls` reload intervals) until the async check returns True."""
    for _ in range(polls * 4):
        if await check():
            return True
        await asyncio.sleep(INTERVAL / 4)
    return bool(await check())


async def polling_proxy(
    start_proxy: StartProxy, backend: Backend, routes: Path, members: Path, **kw: Any
) -> Proxy:
    return await start_proxy(
        backend.url,
        admin_token=ADMIN_TOKEN,
        routes=str(routes),
        store=f"file:{members}",
        reload_interval=kw.pop("reload_interval", INTERVAL),
        **kw,
    )


async def test_valid_routes_edit_applies_by_polling(
    files: Files, backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await polling_proxy(start_proxy, backend, files.routes, files.members)
    assert await status_of(session, proxy, "bob") == 200
    assert await metric(session, proxy, "rbac_proxy_config_routes") == 4
    write_atomic(
        files.routes, V2.replace("  - path: /healthz\n    methods: [GET]\n    public: true\n", "")
    )

    async def denied() -> bool:
        return await status_of(session, proxy, "bob") == 403

    assert await eventually(denied), "the edit was not applied by the poller"
    assert await status_of(session, proxy, "alice") == 200
    assert await reloads(session, proxy, "routes", "success") == 1
    assert await metric(session, proxy, "rbac_proxy_config_routes") == 3
    # Nothing changes on later polls: one reload per new content.
    await asyncio.sleep(INTERVAL * 3)
    assert await reloads(session, proxy, "routes", "success") == 1


@pytest.mark.parametrize("kind", sorted(INVALID_EDITS))
async def test_invalid_routes_edit_keeps_the_old_table(
    kind: str,
    files: Files,
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    proxy = await polling_proxy(start_proxy, backend, files.routes, files.members)
    assert await status_of(session, proxy, "bob") == 200
    text, line = INVALID_EDITS[kind]()
    write_atomic(files.routes, text)

    async def failed() -> bool:
        return await reloads(session, proxy, "routes", "failure") >= 1

    assert await eventually(failed), "the bad edit was never attempted"
    # The previous table still answers: bob keeps the members page, sue stays out of billing.
    assert await status_of(session, proxy, "bob") == 200
    assert await status_of(session, proxy, "sue", "/api/org/billing") == 403
    assert f"{files.routes}:{line}: " in caplog.text, caplog.text
    # Reported once per bad content, not once per poll.
    await asyncio.sleep(INTERVAL * 3)
    assert await reloads(session, proxy, "routes", "failure") == 1
    assert await reloads(session, proxy, "routes", "success") == 0
    # A fixed file is picked up afterwards.
    write_atomic(files.routes, V2)

    async def applied() -> bool:
        return await status_of(session, proxy, "bob") == 403

    assert await eventually(applied)
    assert await reloads(session, proxy, "routes", "success") == 1


async def test_edit_right_after_start_is_not_missed(
    files: Files, backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    # The watcher must compare against what was loaded, not against the file as it is when
    # its task first runs: an edit landing between load and that moment would be lost.
    proxy = await polling_proxy(start_proxy, backend, files.routes, files.members)
    write_atomic(files.routes, V2)  # no await since start(): the watcher task has not run yet

    async def denied() -> bool:
        return await status_of(session, proxy, "bob") == 403

    assert await eventually(denied), "an edit made right after startup was never applied"


def _configmap(root: Path, version: str, text: str) -> None:
    """Kubernetes' atomic ConfigMap update: new timestamped dir, then swap the ..data link."""
    data = root / f"..2026_{version}"
    data.mkdir()
    (data / "routes.yaml").write_text(text, "utf-8")
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(data.name)
    os.replace(tmp_link, root / "..data")  # rename(2): atomic, like the kubelet's swap


async def test_configmap_symlink_swap_is_detected(
    tmp_path: Path,
    files: Files,
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
) -> None:
    root = tmp_path / "configmap"
    root.mkdir()
    _configmap(root, "01", V1)
    routes = root / "routes.yaml"
    routes.symlink_to("..data/routes.yaml")
    proxy = await polling_proxy(start_proxy, backend, routes, files.members)
    assert await status_of(session, proxy, "bob") == 200
    link_before = os.lstat(routes)
    _configmap(root, "02", V2)
    link_after = os.lstat(routes)
    # The file the proxy was given did not change at all: only ..data points elsewhere.
    assert (link_before.st_ino, link_before.st_mtime_ns) == (
        link_after.st_ino,
        link_after.st_mtime_ns,
    )

    async def denied() -> bool:
        return await status_of(session, proxy, "bob") == 403

    assert await eventually(denied), "the ..data swap went unnoticed"
    assert await reloads(session, proxy, "routes", "success") == 1


async def test_members_edit_applies_and_invalidates_the_cache(
    files: Files,
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    # A long TTL: only the reload's invalidation can make the change visible this fast.
    proxy = await polling_proxy(
        start_proxy, backend, files.routes, files.members, cache_ttl=300, cache_negative_ttl=300
    )
    assert await status_of(session, proxy, "bob") == 200
    assert await status_of(session, proxy, "zed") == 403  # not a member: a cached negative
    original = files.members.read_text("utf-8")
    edited = original.replace("bob: developer", "bob: support").replace(
        "sue: support", "sue: support\n      zed: developer"
    )
    assert edited != original
    write_atomic(files.members, edited)

    async def applied() -> bool:
        return await status_of(session, proxy, "bob") == 403

    assert await eventually(applied), "the member file edit was not applied"
    assert await status_of(session, proxy, "zed") == 200
    assert await reloads(session, proxy, "members", "success") == 1
    assert await reloads(session, proxy, "routes", "unchanged") >= 1

    # A broken member file keeps the previous members, names file:line, and is counted.
    broken = edited.replace("zed: developer", "zed: [developer")
    write_atomic(files.members, broken)

    async def failed() -> bool:
        return await reloads(session, proxy, "members", "failure") >= 1

    assert await eventually(failed)
    assert await status_of(session, proxy, "zed") == 200
    assert await status_of(session, proxy, "bob") == 403
    assert re.search(re.escape(str(files.members)) + r":\d+: ", caplog.text), caplog.text


async def test_sighup_equivalent_reload_all(
    files: Files, backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await polling_proxy(
        start_proxy, backend, files.routes, files.members, reload_interval=0
    )
    runtime = proxy.server.runtime
    write_atomic(files.routes, V2)
    await asyncio.sleep(INTERVAL * 2)
    assert await status_of(session, proxy, "bob") == 200  # no poller: nothing until asked
    assert reload_all(runtime) == {"routes": "success", "members": "unchanged"}
    assert await status_of(session, proxy, "bob") == 403
    assert reload_all(runtime) == {"routes": "unchanged", "members": "unchanged"}
    write_atomic(files.routes, _unknown_permission()[0])
    assert reload_all(runtime) == {"routes": "failure", "members": "unchanged"}
    assert await status_of(session, proxy, "bob") == 403  # still V2
    assert await reloads(session, proxy, "routes", "failure") == 1


async def test_admin_reload_endpoint(
    files: Files, backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await polling_proxy(
        start_proxy, backend, files.routes, files.members, reload_interval=0
    )
    url = proxy.admin_url + "/admin/reload"
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    write_atomic(files.routes, V2)
    async with session.post(url) as resp:
        assert resp.status == 401
    async with session.post(url, headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
    assert await status_of(session, proxy, "bob") == 200  # unauthorized calls changed nothing
    async with session.post(url, headers=auth) as resp:
        assert resp.status == 200
        assert await resp.json() == {"routes": "success", "members": "unchanged"}
    assert await status_of(session, proxy, "bob") == 403
    write_atomic(files.routes, _bad_yaml()[0])
    async with session.post(url, headers=auth) as resp:
        assert resp.status == 422
        assert (await resp.json())["routes"] == "failure"
    assert await status_of(session, proxy, "bob") == 403


async def test_thousand_requests_in_flight_across_a_reload(
    files: Files, backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await polling_proxy(
        start_proxy, backend, files.routes, files.members, reload_interval=0
    )
    runtime = proxy.server.runtime
    write_atomic(files.routes, V2)  # on disk now, applied by reload_all mid-traffic
    # Expected status per (user, path) under the old and the new table.
    plan = [
        ("bob", MEMBERS_PAGE, {"old": 200, "new": 403}),
        ("alice", MEMBERS_PAGE, {"old": 200, "new": 200}),
        ("sue", MEMBERS_PAGE, {"old": 403, "new": 403}),
        ("bob", "/api/projects/proj-prod", {"old": 200, "new": 200}),
    ]
    total, half = 1000, 500
    limit = asyncio.Semaphore(50)
    done = 0
    halfway = asyncio.Event()
    reloaded = False
    results: list[tuple[int, int, bool, bool]] = []  # (case, status, started_after, ended_before)

    async def one(i: int) -> None:
        nonlocal done
        user, path, _ = plan[i % len(plan)]
        async with limit:
            started_after = reloaded
            status = await status_of(session, proxy, user, path)
            results.append((i % len(plan), status, started_after, not reloaded))
        done += 1
        if done == half:
            halfway.set()

    async def reload_midway() -> dict[str, str]:
        nonlocal reloaded
        await halfway.wait()
        outcome = reload_all(runtime)  # synchronous: one reference swap between two requests
        reloaded = True
        return outcome

    reloader = asyncio.create_task(reload_midway())
    await asyncio.gather(*(one(i) for i in range(total)))
    assert await reloader == {"routes": "success", "members": "unchanged"}
    assert len(results) == total
    seen_old_bob = seen_new_bob = 0
    for case, status, started_after, ended_before in results:
        expect = plan[case][2]
        assert status in (expect["old"], expect["new"]), (plan[case], status)
        if started_after:
            assert status == expect["new"], plan[case]
        if ended_before:
            assert status == expect["old"], plan[case]
        if case == 0:
            seen_old_bob += status == 200
            seen_new_bob += status == 403
    # The reload really happened in the middle of the traffic.
    assert seen_old_bob >= 100 and seen_new_bob >= 50, (seen_old_bob, seen_new_bob)
    assert await metric(session, proxy, "rbac_proxy_requests_total", code="500") == 0
