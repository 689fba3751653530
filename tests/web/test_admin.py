"""The admin listener end to end: probes, /metrics, cache invalidation and routes reload."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.policy.model import Membership
from proxy.stores.cache import RoleCache
from tests.fakes import ROLES_AND_PLANS
from tests.web.conftest import SHIPPED_MEMBERS, Backend, Proxy, StartProxy

TOKEN = "admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def call(
    method: str, url: str, *, headers: Mapping[str, str] | None = None, data: bytes | None = None
) -> tuple[int, Mapping[str, str], str]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers, data=data) as resp,
    ):
        return resp.status, resp.headers.copy(), await resp.text()


async def as_user(proxy: Proxy, path: str, user: str) -> tuple[int, dict[str, Any]]:
    status, _, text = await call("GET", proxy.url + path, headers={"X-User-Id": user})
    return status, json.loads(text)


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called `name` in a Prometheus text exposition, with its labels."""
    return [
        (dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


# --- probes ----------------------------------------------------------------------------------


async def test_healthz(proxy: Proxy) -> None:
    status, headers, text = await call("GET", proxy.admin_url + "/healthz")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(text)["status"] == "ok"


async def test_readyz_turns_503_while_draining(proxy: Proxy, backend: Backend) -> None:
    status, _, text = await call("GET", proxy.admin_url + "/readyz")
    assert status == 200, text
    proxy.server.runtime.draining = True
    try:
        status, _, text = await call("GET", proxy.admin_url + "/readyz")
        assert status == 503
        assert "draining" in json.dumps(json.loads(text))
        # The proxy port refuses new work while draining, and says so.
        status, headers, text = await call(
            "GET", proxy.url + "/api/org", headers={"X-User-Id": "alice"}
        )
        assert status == 503
        assert json.loads(text)["request_id"] == headers["X-Request-Id"]
        assert backend.received == []
        # /healthz is liveness: a draining process is still alive.
        status, _, _ = await call("GET", proxy.admin_url + "/healthz")
        assert status == 200
    finally:
        proxy.server.runtime.draining = False
    status, _, _ = await call("GET", proxy.admin_url + "/readyz")
    assert status == 200


# --- metrics ---------------------------------------------------------------------------------


async def test_metrics_count_requests_with_bounded_labels(proxy: Proxy) -> None:
    await as_user(proxy, "/api/org/billing", "alice")
    await as_user(proxy, "/api/org/billing", "alice")
    await as_user(proxy, "/api/org/billing", "sue")
    await as_user(proxy, "/api/projects/proj-prod/secrets", "sue")
    await call("GET", proxy.url + "/api/not/a/route/x-raw-path", headers={"X-User-Id": "alice"})
    await call("GET", proxy.url + "/healthz")

    status, headers, text = await call("GET", proxy.admin_url + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    counted = samples(text, "rbac_proxy_requests_total")
    by_labels = {tuple(sorted(labels.items())): value for labels, value in counted}

    def key(route: str, decision: str, reason: str, code: str) -> tuple[tuple[str, str], ...]:
        labels = {"route": route, "method": "GET", "decision": decision, "reason": reason}
        return tuple(sorted({**labels, "code": code}.items()))

    assert by_labels[key("/api/org/billing", "allow", "allowed", "200")] == 2
    assert by_labels[key("/api/org/billing", "deny", "missing_permission", "403")] == 1
    assert (
        by_labels[key("/api/projects/{project_id}/secrets", "deny", "missing_permission", "403")]
        == 1
    )
    assert by_labels[key("/healthz", "allow", "public", "200")] == 1
    no_route = [v for labels, v in counted if labels["reason"] == "no_route"]
    assert no_route == [1]
    for labels, _ in counted:
        assert set(labels) == {"route", "method", "decision", "reason", "code"}
        # Bounded labels (SPEC §9): a template, never a raw path or a user id.
        assert "x-raw-path" not in labels["route"]
        assert "proj-prod" not in labels["route"]
        assert not {"alice", "sue"} & set(labels.values())
    assert samples(text, "rbac_proxy_inflight_requests") == [({}, 0.0)]


# --- cache invalidation ----------------------------------------------------------------------


async def test_invalidate_is_off_without_a_token(proxy: Proxy) -> None:
    for path in ("/admin/cache/invalidate", "/admin/reload"):
        status, _, _ = await call("POST", proxy.admin_url + path, headers=AUTH, data=b"{}")
        assert status == 404, path


async def test_invalidate_requires_the_token(backend: Backend, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(backend.url, admin_token=TOKEN)
    url = proxy.admin_url + "/admin/cache/invalidate"
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
    ):
        status, _, text = await call("POST", url, headers=headers, data=b"{}")
        assert status == 401, headers
        assert TOKEN not in text
    status, _, _ = await call("POST", proxy.admin_url + "/admin/reload", headers={})
    assert status == 401


async def test_invalidate_answers(backend: Backend, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(backend.url, admin_token=TOKEN)
    url = proxy.admin_url + "/admin/cache/invalidate"
    await as_user(proxy, "/api/org", "bob")
    await as_user(proxy, "/api/org", "sue")
    status, _, text = await call("POST", url, headers=AUTH, data=b'{"user": "bob"}')
    assert status == 200
    assert json.loads(text) == {"invalidated": "bob", "entries": 1}
    status, _, text = await call("POST", url, headers=AUTH, data=b"{}")
    assert status == 200
    assert json.loads(text) == {"invalidated": "*", "entries": 1}  # only sue was left
    status, _, text = await call("POST", url, headers=AUTH)  # an empty body means {}
    assert status == 200
    for bad in (b"{not json", b'{"user": 5}', b'["bob"]', b'{"usr": "bob"}'):
        status, _, text = await call("POST", url, headers=AUTH, data=bad)
        assert status == 400, bad
        assert "error" in json.loads(text)


class SwitchableStore:
    """A role store whose answers the test changes, to see exactly when the cache asks again."""

    backend = "test"

    def __init__(self) -> None:
        self.roles = {"bob": "developer", "sue": "support"}
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


async def test_invalidation_drops_cached_roles(backend: Backend, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(backend.url, admin_token=TOKEN)
    store = SwitchableStore()
    proxy.server.runtime.cache = RoleCache(store, ttl=300, negative_ttl=300)
    url = proxy.admin_url + "/admin/cache/invalidate"

    assert (await as_user(proxy, "/api/org/billing", "bob"))[0] == 403
    assert (await as_user(proxy, "/api/org/billing", "sue"))[0] == 403
    store.roles = {"bob": "admin", "sue": "admin"}
    # Cached for the TTL: the store's new answer is not seen yet.
    assert (await as_user(proxy, "/api/org/billing", "bob"))[0] == 403
    assert store.calls == 2

    status, _, _ = await call("POST", url, headers=AUTH, data=b'{"user": "bob"}')
    assert status == 200
    status, body = await as_user(proxy, "/api/org/billing", "bob")
    assert status == 200
    assert body["auth"]["role"] == "admin"
    assert (await as_user(proxy, "/api/org/billing", "sue"))[0] == 403  # still cached

    status, _, _ = await call("POST", url, headers=AUTH, data=b"{}")
    assert status == 200
    assert (await as_user(proxy, "/api/org/billing", "sue"))[0] == 200


async def test_edited_members_file_applies_on_invalidate(
    tmp_path: Path, backend: Backend, start_proxy: StartProxy
) -> None:
    members = tmp_path / "members.yaml"
    original = Path(SHIPPED_MEMBERS).read_text()
    members.write_text(original)
    proxy = await start_proxy(backend.url, admin_token=TOKEN, store=f"file:{members}")

    status, body = await as_user(proxy, "/api/org/billing", "bob")
    assert status == 403
    assert body["reason"] == "missing_permission"
    assert (await as_user(proxy, "/api/org/billing", "sue"))[0] == 403
    edited = original.replace("bob: developer", "bob: admin").replace("sue: support", "sue: admin")
    assert edited.count(": admin") == original.count(": admin") + 2
    members.write_text(edited)
    url = proxy.admin_url + "/admin/cache/invalidate"

    status, _, text = await call("POST", url, headers=AUTH, data=b'{"user": "bob"}')
    assert status == 200
    # The file changed, so every cached answer from the old file went, not only bob's.
    assert json.loads(text)["invalidated"] == "*"
    for user in ("bob", "sue"):
        status, body = await as_user(proxy, "/api/org/billing", user)
        assert status == 200, body
        assert body["auth"]["role"] == "admin"

    # A broken edit keeps the members loaded last; invalidation still works.
    members.write_text("orgs: [not, a, mapping\n")
    status, _, text = await call("POST", url, headers=AUTH, data=b'{"user": "bob"}')
    assert status == 200
    assert json.loads(text) == {"invalidated": "bob", "entries": 1}
    assert (await as_user(proxy, "/api/org/billing", "bob"))[0] == 200


# --- reload ----------------------------------------------------------------------------------

ROUTES = """\
version: 1
default: deny
""" + ROLES_AND_PLANS + """\
routes:
  - path: /api/org/billing
    methods: [GET]
    permission: billing:read
  - path: /api/org/members
    methods: [GET]
    permission: team:read
"""
NEW_ROUTE = """\
  - path: /_demo/status/{code}
    methods: [GET]
    authenticated: true
"""
BROKEN_ROUTE = """\
  - path: /api/org
    methods: [GET]
    permision: team:read
"""


async def test_reload_applies_a_good_routes_file_and_refuses_a_broken_one(
    tmp_path: Path, backend: Backend, start_proxy: StartProxy
) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    proxy = await start_proxy(backend.url, admin_token=TOKEN, routes=str(routes))
    reload_url = proxy.admin_url + "/admin/reload"

    status, body = await as_user(proxy, "/_demo/status/200", "sue")
    assert (status, body["reason"]) == (403, "no_route")

    routes.write_text(ROUTES + NEW_ROUTE)
    status, _, text = await call("POST", reload_url, headers={"Authorization": "Bearer nope"})
    assert status == 401
    assert (await as_user(proxy, "/_demo/status/200", "sue"))[0] == 403  # not reloaded

    status, _, text = await call("POST", reload_url, headers=AUTH)
    assert status == 200, text
    assert json.loads(text)["routes"] == "success"
    status, body = await as_user(proxy, "/_demo/status/200", "sue")
    assert status == 200
    assert body["auth"]["user"] == "sue"

    routes.write_text(ROUTES + NEW_ROUTE + BROKEN_ROUTE)
    status, _, text = await call("POST", reload_url, headers=AUTH)
    assert status == 422
    assert json.loads(text)["routes"] == "failure"
    # The previous table keeps serving: the new route still works, the rest is still enforced.
    assert (await as_user(proxy, "/_demo/status/200", "sue"))[0] == 200
    status, body = await as_user(proxy, "/api/org/billing", "sue")
    assert (status, body["reason"]) == (403, "missing_permission")
    status, body = await as_user(proxy, "/api/org", "sue")
    assert (status, body["reason"]) == (403, "no_route")

    _, _, metrics = await call("GET", proxy.admin_url + "/metrics")
    reloads = {
        labels["result"]: value
        for labels, value in samples(metrics, "rbac_proxy_config_reloads_total")
        if labels["file"] == "routes"
    }
    assert reloads.get("success") == 1
    assert reloads.get("failure") == 1
    assert samples(metrics, "rbac_proxy_config_routes") == [({}, 3.0)]


async def test_non_utf8_admin_token_is_a_401_not_a_500(
    backend: Backend, start_proxy: StartProxy
) -> None:
    """Review finding: a raw 0xFF byte in the admin Authorization header was a 500."""
    proxy = await start_proxy(backend.url, admin_token="t0k")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.admin_port)
    writer.write(
        b"POST /admin/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        b"Authorization: Bearer \xff\r\n\r\n"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 401"), head
