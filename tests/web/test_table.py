"""SPEC §10 end to end: every row, method and path for six users through the running proxy."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from proxy.audit import AuditLog
from proxy.demo.app import RECEIVED, STATE, make_demo_app
from proxy.settings import Settings
from proxy.web.serve import Server, build_runtime, start

ROOT = Path(__file__).resolve().parents[2]
P = "/api/projects/{project_id}"
PUBLIC = "public"
AUTHENTICATED = "authenticated"


@dataclass(frozen=True)
class Row:
    """One row of SPEC §10: methods × paths, the permission, and who holds it org-wide."""

    methods: tuple[str, ...]
    paths: tuple[str, ...]
    permission: str  # a permission, PUBLIC or AUTHENTICATED
    admin: bool
    developer: bool
    support: bool
    kind: str = "http"  # http | sse | ws


Y, N = True, False
# SPEC §10, row by row, in its order.
TABLE: tuple[Row, ...] = (
    Row(("GET",), ("/healthz",), PUBLIC, Y, Y, Y),
    Row(("GET",), ("/static/{path*}",), PUBLIC, Y, Y, Y),
    Row(("GET",), ("/api/org",), AUTHENTICATED, Y, Y, Y),
    Row(("GET",), ("/api/org/members",), "team:read", Y, Y, N),
    Row(("POST",), ("/api/org/invites",), "team:invite", Y, N, N),
    Row(("PATCH", "DELETE"), ("/api/org/members/{user_id}",), "team:manage", Y, N, N),
    Row(("GET",), ("/api/org/billing",), "billing:read", Y, N, N),
    Row(("PUT",), ("/api/org/billing",), "billing:write", Y, N, N),
    Row(("GET",), ("/api/projects",), AUTHENTICATED, Y, Y, Y),
    Row(("POST",), ("/api/projects",), "projects:create", Y, N, N),
    Row(("GET",), (P,), "projects:read", Y, Y, N),
    Row(("PATCH",), (P,), "projects:write", Y, N, N),
    Row(("DELETE",), (P,), "projects:delete", Y, N, N),
    Row(
        ("GET",),
        (f"{P}/integrations", f"{P}/integrations/{{integration_id}}"),
        "integrations:read",
        Y,
        Y,
        N,
    ),
    Row(("POST",), (f"{P}/integrations",), "integrations:create", Y, Y, N),
    Row(("DELETE",), (f"{P}/integrations/{{integration_id}}",), "integrations:delete", Y, Y, N),
    Row(
        ("POST",),
        (
            f"{P}/integrations/{{integration_id}}/activate",
            f"{P}/integrations/{{integration_id}}/deactivate",
        ),
        "integrations:activate",
        Y,
        Y,
        N,
    ),
    Row(
        ("GET",),
        (f"{P}/integrations/{{integration_id}}/credentials",),
        "integrations:credentials",
        Y,
        Y,
        N,
    ),
    Row(("GET",), (f"{P}/workflows", f"{P}/workflows/{{workflow_id}}"), "workflows:read", Y, Y, N),
    Row(("POST",), (f"{P}/workflows",), "workflows:create", Y, Y, N),
    Row(("PUT", "PATCH"), (f"{P}/workflows/{{workflow_id}}",), "workflows:update", Y, Y, N),
    Row(("DELETE",), (f"{P}/workflows/{{workflow_id}}",), "workflows:delete", Y, Y, N),
    Row(("POST",), (f"{P}/workflows/{{workflow_id}}/deploy",), "workflows:deploy", Y, Y, N),
    Row(("GET",), (f"{P}/sdk-settings",), "sdk:read", Y, Y, N),
    Row(("PATCH",), (f"{P}/sdk-settings",), "sdk:write", Y, Y, N),
    Row(("POST",), (f"{P}/sdk-settings/signing-key",), "sdk:write", Y, Y, N),
    Row(("GET",), (f"{P}/event-destinations",), "event_destinations:read", Y, N, N),
    Row(("POST",), (f"{P}/event-destinations",), "event_destinations:write", Y, N, N),
    Row(
        ("PATCH", "DELETE"),
        (f"{P}/event-destinations/{{destination_id}}",),
        "event_destinations:write",
        Y,
        N,
        N,
    ),
    Row(("GET",), (f"{P}/secrets",), "secrets:read", Y, Y, N),
    Row(("POST",), (f"{P}/secrets",), "secrets:create", Y, Y, N),
    Row(("PUT",), (f"{P}/secrets/{{secret_name}}",), "secrets:update", Y, N, N),
    Row(("DELETE",), (f"{P}/secrets/{{secret_name}}",), "secrets:delete", Y, N, N),
    Row(("GET", "POST"), (f"{P}/api-keys",), "api_keys:manage", Y, N, N),
    Row(("DELETE",), (f"{P}/api-keys/{{key_id}}",), "api_keys:manage", Y, N, N),
    Row(
        ("GET",),
        (f"{P}/connected-users", f"{P}/connected-users/{{connected_user_id}}"),
        "connected_users:read",
        Y,
        Y,
        Y,
    ),
    Row(
        ("PATCH",),
        (f"{P}/connected-users/{{connected_user_id}}/metadata",),
        "connected_users:manage",
        Y,
        Y,
        Y,
    ),
    Row(
        ("DELETE",),
        (f"{P}/connected-users/{{connected_user_id}}/integrations/{{integration_id}}",),
        "connected_users:manage",
        Y,
        Y,
        Y,
    ),
    Row(
        ("GET",),
        (f"{P}/task-history", f"{P}/task-history/{{execution_id}}"),
        "task_history:read",
        Y,
        Y,
        Y,
    ),
    Row(("POST",), (f"{P}/task-history/{{execution_id}}/replay",), "executions:replay", Y, Y, Y),
    Row(("GET",), (f"{P}/task-history/stream",), "task_history:read", Y, Y, Y, kind="sse"),
    Row(("GET",), (f"{P}/task-history/live",), "task_history:read", Y, Y, Y, kind="ws"),
)

# Ids seeded by the demo backend in every project (ex-5001 is a failed execution, so replaying
# it is the realistic case); the org member must exist in acme for PATCH/DELETE to succeed.
IDS = {
    "{path*}": "css/app.css",
    "{user_id}": "bob",
    "{integration_id}": "int-slack",
    "{workflow_id}": "wf-sync-contacts",
    "{destination_id}": "dest-1",
    "{secret_name}": "SLACK_TOKEN",
    "{key_id}": "key-1",
    "{connected_user_id}": "cu-1001",
    "{execution_id}": "ex-5001",
}
# The shipped members.yaml: org-wide roles in acme, and the "Set by Project" bindings as
# (bound project, another acme project, role).
ORG_ROLES = {"alice": "admin", "bob": "developer", "sue": "support"}
BINDINGS = {
    "carol": ("proj-staging", "proj-prod", "developer"),
    "dan": ("proj-prod", "proj-staging", "support"),
}
# SSE: one event, no pause, so the stream ends at once.
SSE_QUERY = "?count=1&interval=0"


@dataclass(frozen=True)
class Case:
    user: str
    method: str
    template: str
    path: str  # concrete, without query
    kind: str
    permission: str | None  # what X-Auth-Permission / the error body must say, None = absent
    allowed: bool
    reason: str  # the expected reason when denied (or "public" / "allowed")
    org: str | None = None  # expected X-Auth-Org when allowed
    role: str | None = None  # expected X-Auth-Role when allowed (None = header absent)


def concrete(template: str, project: str) -> str:
    path = template.replace("{project_id}", project)
    for placeholder, value in IDS.items():
        path = path.replace(placeholder, value)
    assert "{" not in path, path
    return path


def _case(
    user: str,
    row: Row,
    method: str,
    template: str,
    project: str,
    reason: str,
    role: str | None = None,
    org: str | None = "acme",
) -> Case:
    allowed = reason in ("allowed", "public")
    perm = row.permission if row.permission not in (PUBLIC, AUTHENTICATED) else None
    return Case(
        user=user,
        method=method,
        template=template,
        path=concrete(template, project),
        kind=row.kind,
        permission=perm,
        allowed=allowed,
        reason=reason,
        org=org if allowed else None,
        role=role if allowed else None,
    )


def _verdict(ok: bool) -> str:
    return "allowed" if ok else "missing_permission"


def cases_for(user: str) -> list[Case]:
    """Expectations per user, derived from the table and the shipped members.yaml."""
    out: list[Case] = []
    for row in TABLE:
        for method in row.methods:
            for template in row.paths:
                is_project = "{project_id}" in template
                if row.permission == PUBLIC:
                    out.append(_case(user, row, method, template, "proj-prod", "public", org=None))
                elif user in ORG_ROLES:
                    role = ORG_ROLES[user]
                    ok = bool(getattr(row, role))
                    out.append(_case(user, row, method, template, "proj-prod", _verdict(ok), role))
                elif user in BINDINGS:
                    # Set by Project: the binding's role on the bound project only, no org role.
                    bound, other, role = BINDINGS[user]
                    if is_project:
                        ok = bool(getattr(row, role))
                        out.append(_case(user, row, method, template, bound, _verdict(ok), role))
                        out.append(_case(user, row, method, template, other, "missing_permission"))
                    else:
                        # An org membership is enough for authenticated routes; there is no
                        # org-wide role to send upstream, and no org permission to check.
                        ok = row.permission == AUTHENTICATED
                        out.append(_case(user, row, method, template, "proj-prod", _verdict(ok)))
                else:
                    assert user == "fay"  # support on plan pro: not honoured anywhere
                    out.append(_case(user, row, method, template, "sc-main", "plan_restricted"))
    return out


USERS = ("alice", "bob", "sue", "carol", "dan", "fay")
CASES = [c for u in USERS for c in cases_for(u)]


def test_the_table_covers_every_row_and_user() -> None:
    # 51 method × path cells in §10; carol and dan get each project cell twice (bound, unbound).
    cells = sum(len(r.methods) * len(r.paths) for r in TABLE)
    assert cells == 51
    project_cells = sum(
        len(r.methods) * len(r.paths) for r in TABLE if any("{project_id}" in p for p in r.paths)
    )
    assert len(CASES) == 6 * cells + 2 * project_cells
    assert {(c.method, c.template) for c in CASES if c.user == "sue"} == {
        (m, p) for r in TABLE for m in r.methods for p in r.paths
    }


@dataclass
class Stack:
    backend: web.Application
    server: Server
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.proxy_port}"

    @property
    def received(self) -> list[dict[str, object]]:
        return self.backend[RECEIVED]

    def reset_data(self) -> None:
        """Give the demo backend its seed data back without touching the frozen app."""
        fresh = make_demo_app()[STATE]
        state = self.backend[STATE]
        state.orgs, state.projects, state.ids = fresh.orgs, fresh.projects, fresh.ids


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    app = make_demo_app()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    settings = Settings(
        upstream=f"http://127.0.0.1:{port}",
        routes=str(ROOT / "routes.yaml"),
        store=f"file:{ROOT / 'members.yaml'}",
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        reload_interval=0,
    )
    runtime = build_runtime(settings)
    runtime.audit = AuditLog("all", io.StringIO())
    server = await start(settings, runtime)
    session = aiohttp.ClientSession()
    try:
        yield Stack(app, server, session)
    finally:
        await session.close()
        await server.drain_and_stop()
        await runner.cleanup()


WS_HANDSHAKE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def _headers(record: dict[str, object]) -> dict[str, list[str]]:
    headers = record["headers"]
    assert isinstance(headers, dict)
    return headers


async def _send_allowed(stack: Stack, case: Case) -> None:
    url = stack.url + case.path
    ident = {"X-User-Id": case.user}
    if case.kind == "ws":
        async with stack.session.ws_connect(url, headers=ident) as ws:
            await ws.send_str("ping")
            assert await ws.receive_str(timeout=5) == "ping"
        return
    if case.kind == "sse":
        async with stack.session.get(
            url + SSE_QUERY, headers={**ident, "Accept": "text/event-stream"}
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert "event: execution" in await resp.text()
        return
    payload = {"note": "from the table test"} if case.method in ("POST", "PUT", "PATCH") else None
    async with stack.session.request(case.method, url, headers=ident, json=payload) as resp:
        text = await resp.text()
        assert 200 <= resp.status < 300, f"{resp.status}: {text}"
        assert resp.headers.get("X-Request-Id")


async def _send_denied(stack: Stack, case: Case) -> aiohttp.ClientResponse:
    headers = {"X-User-Id": case.user, **(WS_HANDSHAKE if case.kind == "ws" else {})}
    body = {"note": "denied"} if case.method in ("POST", "PUT", "PATCH") else None
    resp = await stack.session.request(
        case.method, stack.url + case.path, headers=headers, json=body
    )
    await resp.read()
    return resp


# One backend and one proxy for the whole module (hence the module event loop): loading the
# shipped routes.yaml runs its 247 policy tests, too slow to repeat for each of the ~400 cases.
# The demo's data is reset before each case instead, so a DELETE cannot 404 a later case.
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", CASES, ids=[f"{c.user}-{c.method}-{c.path}" for c in CASES])
async def test_spec_table(stack: Stack, case: Case) -> None:
    stack.reset_data()
    before = len(stack.received)
    if case.allowed:
        await _send_allowed(stack, case)
        new = stack.received[before:]
        assert len(new) == 1, new
        record = new[0]
        assert record["method"] == case.method
        expected_path = case.path + (SSE_QUERY if case.kind == "sse" else "")
        assert record["raw_path"] == expected_path
        headers = _headers(record)
        expected = {
            "x-auth-user": case.user if case.reason != "public" else None,
            "x-auth-org": case.org,
            "x-auth-role": case.role,
            "x-auth-permission": case.permission if case.reason != "public" else None,
        }
        for name, value in expected.items():
            assert headers.get(name) == ([value] if value is not None else None), name
        # The caller's identity header is input for the proxy, never for the backend.
        assert "x-user-id" not in headers
        return
    resp = await _send_denied(stack, case)
    assert resp.status == 403
    assert resp.content_type == "application/json"
    body = json.loads(await resp.text())
    assert body["error"] == "forbidden"
    assert body["reason"] == case.reason
    assert body.get("permission") == case.permission
    assert body["request_id"] == resp.headers["X-Request-Id"]
    assert len(stack.received) == before, "a denied request reached the backend"
