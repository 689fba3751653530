"""The demo dashboard backend: every SPEC §10 endpoint over in-memory data, with no authorization.

It stands in for the company's dashboard API behind the proxy. Every JSON answer echoes the
identity headers the proxy injected (``auth``) plus the method and raw path it received, and
every request is recorded under ``app[RECEIVED]`` so tests can assert what reached the backend.

Org routes act on the org named by ``X-Auth-Org`` (``acme`` when the header is absent, so the
app is usable standalone); project routes act on ``{project_id}`` whatever its org, because
deciding who may touch which project is the proxy's job, not this backend's.

Extra endpoints for proxy tests live under ``/_demo/`` and are never in the shipped routes.yaml.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus

from aiohttp import WSMsgType, web

Item = dict[str, object]
Collection = dict[str, Item]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_ORG = "acme"
# Only the newest requests are kept, so a long-running standalone demo does not grow forever.
MAX_RECEIVED = 10_000
CHUNK = 64 * 1024
# /_demo/bytes emits this pattern: the byte at offset i is i % 256, so corruption is visible.
_PATTERN = bytes(range(256)) * (CHUNK // 256)
MAX_BYTES = 2 * 1024**3
MAX_SLOW_DELAY = 120.0
MAX_SSE_COUNT = 1000
MAX_SSE_INTERVAL = 5.0
SSE_DEFAULT_COUNT = 4  # one event at once, then three more
SSE_DEFAULT_INTERVAL = 0.2
WS_CLOSE_COMMAND = "close:4001"
WS_CLOSE_CODE = 4001
_AUTH_HEADERS = {
    "user": "X-Auth-User",
    "org": "X-Auth-Org",
    "role": "X-Auth-Role",
    "permission": "X-Auth-Permission",
    "request_id": "X-Request-Id",
}


@dataclass
class Org:
    """One organization: its plan, team, pending invites and billing details."""

    id: str
    name: str
    plan: str
    members: Collection
    invites: Collection = field(default_factory=dict)
    billing: Item = field(default_factory=dict)


@dataclass
class Project:
    """One project: its settings plus one collection per §10 resource, keyed by path segment."""

    id: str
    org: str
    name: str
    sdk_settings: Item
    collections: dict[str, Collection]

    def summary(self) -> Item:
        return {"id": self.id, "org": self.org, "name": self.name}


@dataclass
class DemoState:
    """All mutable demo data of one app instance."""

    orgs: dict[str, Org]
    projects: dict[str, Project]
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-new-{next(self.ids)}"


RECEIVED: web.AppKey[list[dict[str, object]]] = web.AppKey("demo_received")
STATE: web.AppKey[DemoState] = web.AppKey("demo_state")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- seed data ------------------------------------------------------------------------------


def _seed_project(project_id: str, org: str, name: str) -> Project:
    """Every project starts with the same ids, so tests and curl examples can rely on them."""
    collections: dict[str, Collection] = {
        "integrations": {
            "int-slack": {"id": "int-slack", "provider": "slack", "active": True,
                          "client_id": f"{project_id}-slack-client",
                          "client_secret": f"{project_id}-slack-secret"},
            "int-github": {"id": "int-github", "provider": "github", "active": False,
                           "client_id": f"{project_id}-github-client",
                           "client_secret": f"{project_id}-github-secret"},
        },
        "workflows": {
            "wf-sync-contacts": {"id": "wf-sync-contacts", "name": "Sync contacts",
                                 "version": 3, "deployed_version": 3},
            "wf-nightly-report": {"id": "wf-nightly-report", "name": "Nightly report",
                                  "version": 1, "deployed_version": None},
        },
        "connected-users": {
            "cu-1001": {"id": "cu-1001", "external_id": "customer-42",
                        "integrations": ["int-slack", "int-github"], "metadata": {"tier": "gold"}},
            "cu-1002": {"id": "cu-1002", "external_id": "customer-77",
                        "integrations": ["int-slack"], "metadata": {}},
        },
        "task-history": {
            "ex-5001": {"id": "ex-5001", "workflow": "wf-sync-contacts", "status": "failed",
                        "started_at": "2024-05-01T09:00:00+00:00"},
            "ex-5002": {"id": "ex-5002", "workflow": "wf-nightly-report", "status": "succeeded",
                        "started_at": "2024-05-01T23:00:00+00:00"},
        },
        "secrets": {
            "SLACK_TOKEN": {"name": "SLACK_TOKEN", "value": "xoxb-demo"},
            "DB_PASSWORD": {"name": "DB_PASSWORD", "value": "hunter2"},
        },
        "api-keys": {
            "key-1": {"id": "key-1", "label": "CI", "prefix": "pk_demo_1"},
        },
        "event-destinations": {
            "dest-1": {"id": "dest-1", "url": "https://hooks.example.com/demo",
                       "events": ["execution.failed"]},
        },
    }
    settings: Item = {"callback_url": f"https://{project_id}.example.com/callback",
                      "signing_key_id": "sk-1"}
    return Project(project_id, org, name, settings, collections)


def _seed() -> DemoState:
    acme = Org(
        "acme", "Acme Corp", "enterprise",
        members={
            "alice": {"user": "alice", "role": "admin"},
            "bob": {"user": "bob", "role": "developer"},
            "sue": {"user": "sue", "role": "support"},
            "carol": {"user": "carol", "role": None, "projects": {"proj-staging": "developer"}},
            "dan": {"user": "dan", "role": None, "projects": {"proj-prod": "support"}},
        },
        billing={"plan": "enterprise", "card": "visa ****4242", "email": "billing@acme.test"},
    )
    smallco = Org(
        "smallco", "SmallCo", "pro",
        members={
            "ed": {"user": "ed", "role": "admin"},
            "gus": {"user": "gus", "role": "developer"},
            "fay": {"user": "fay", "role": "support"},
        },
        billing={"plan": "pro", "card": "mastercard ****5454", "email": "ed@smallco.test"},
    )
    projects = [
        _seed_project("proj-prod", "acme", "Production"),
        _seed_project("proj-staging", "acme", "Staging"),
        _seed_project("sc-main", "smallco", "Main"),
    ]
    return DemoState({o.id: o for o in (acme, smallco)}, {p.id: p for p in projects})


# --- response helpers -----------------------------------------------------------------------


def _echo(request: web.Request) -> Item:
    """What the proxy forwarded: identity headers (null when absent), method and raw path."""
    auth = {key: request.headers.get(name) for key, name in _AUTH_HEADERS.items()}
    return {"auth": auth, "method": request.method, "path": request.raw_path}


def _reply(request: web.Request, body: Item, status: int = 200) -> web.Response:
    return web.json_response({**body, **_echo(request)}, status=status)


def _no_content() -> web.Response:
    return web.Response(status=204)


def _not_found(what: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(text=what)


def _get_or_404(collection: Collection, key: str, what: str) -> Item:
    try:
        return collection[key]
    except KeyError:
        raise _not_found(f"unknown {what} {key!r}") from None


async def _body(request: web.Request) -> Item:
    """The JSON object sent with a mutation; an empty body counts as ``{}``."""
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="request body must be a JSON object")
    return data


def _number(request: web.Request, name: str, default: float, maximum: float) -> float:
    """A query parameter within [0, maximum]; anything else is a 400, never silently clamped."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a number") from None
    if not math.isfinite(value) or not 0 <= value <= maximum:
        raise web.HTTPBadRequest(text=f"{name} must be between 0 and {maximum:g}")
    return value


def _integer(request: web.Request, name: str, default: int, maximum: int) -> int:
    value = _number(request, name, default, maximum)
    if value != int(value):
        raise web.HTTPBadRequest(text=f"{name} must be a whole number")
    return int(value)


def _org(request: web.Request) -> Org:
    orgs = request.app[STATE].orgs
    org_id = request.headers.get("X-Auth-Org", DEFAULT_ORG)
    if org_id not in orgs:
        raise _not_found(f"unknown org {org_id!r}")
    return orgs[org_id]


def _project(request: web.Request) -> Project:
    projects = request.app[STATE].projects
    project_id = request.match_info["project_id"]
    if project_id not in projects:
        raise _not_found(f"unknown project {project_id!r}")
    return projects[project_id]


# --- org handlers ---------------------------------------------------------------------------


async def get_org(request: web.Request) -> web.Response:
    org = _org(request)
    projects = [p.id for p in request.app[STATE].projects.values() if p.org == org.id]
    return _reply(request, {"org": {"id": org.id, "name": org.name, "plan": org.plan,
                                    "projects": projects}})


async def list_members(request: web.Request) -> web.Response:
    return _reply(request, {"items": list(_org(request).members.values())})


async def create_invite(request: web.Request) -> web.Response:
    org = _org(request)
    invite: Item = {"role": "developer", **await _body(request), "id": request.app[STATE].new_id(
        "inv"), "org": org.id, "created_at": _now()}
    org.invites[str(invite["id"])] = invite
    return _reply(request, {"item": invite}, status=201)


async def update_member(request: web.Request) -> web.Response:
    member = _get_or_404(_org(request).members, request.match_info["user_id"], "member")
    member.update(await _body(request))
    member["user"] = request.match_info["user_id"]  # the id is the path, not the body
    return _reply(request, {"item": member})


async def delete_member(request: web.Request) -> web.Response:
    org = _org(request)
    _get_or_404(org.members, request.match_info["user_id"], "member")
    del org.members[request.match_info["user_id"]]
    return _no_content()


async def get_billing(request: web.Request) -> web.Response:
    return _reply(request, {"billing": _org(request).billing})


async def put_billing(request: web.Request) -> web.Response:
    org = _org(request)
    org.billing = await _body(request)
    return _reply(request, {"billing": org.billing})


# --- project handlers -----------------------------------------------------------------------


async def list_projects(request: web.Request) -> web.Response:
    org = _org(request)
    items = [p.summary() for p in request.app[STATE].projects.values() if p.org == org.id]
    return _reply(request, {"items": items})


async def create_project(request: web.Request) -> web.Response:
    state, org, body = request.app[STATE], _org(request), await _body(request)
    project_id = str(body.get("id") or state.new_id("proj"))
    if project_id in state.projects:
        raise web.HTTPConflict(text=f"project {project_id!r} exists")
    project = _seed_project(project_id, org.id, str(body.get("name", project_id)))
    for collection in project.collections.values():
        collection.clear()  # a new project starts empty
    state.projects[project_id] = project
    return _reply(request, {"item": project.summary()}, status=201)


async def get_project(request: web.Request) -> web.Response:
    return _reply(request, {"item": _project(request).summary()})


async def update_project(request: web.Request) -> web.Response:
    project = _project(request)
    project.name = str((await _body(request)).get("name", project.name))
    return _reply(request, {"item": project.summary()})


async def delete_project(request: web.Request) -> web.Response:
    project = _project(request)
    del request.app[STATE].projects[project.id]
    return _no_content()


async def get_sdk_settings(request: web.Request) -> web.Response:
    return _reply(request, {"item": _project(request).sdk_settings})


async def update_sdk_settings(request: web.Request) -> web.Response:
    project = _project(request)
    project.sdk_settings.update(await _body(request))
    return _reply(request, {"item": project.sdk_settings})


async def rotate_signing_key(request: web.Request) -> web.Response:
    project = _project(request)
    key_id = request.app[STATE].new_id("sk")
    project.sdk_settings["signing_key_id"] = key_id
    # The key itself is shown once, like a real dashboard would.
    return _reply(request, {"item": {"signing_key_id": key_id, "signing_key": f"{key_id}-secret"}},
                  status=201)


# --- generic handlers over one project collection -------------------------------------------


def _collection(request: web.Request, name: str) -> Collection:
    return _project(request).collections[name]


def _public(item: Item) -> Item:
    """Secret values and client credentials only leave through their dedicated endpoints."""
    hidden = {"value", "client_secret"}
    return {k: ("****" if k in hidden else v) for k, v in item.items()}


def list_items(name: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        items = [_public(item) for item in _collection(request, name).values()]
        return _reply(request, {"items": items})

    return handler


def get_item(name: str, param: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        item = _get_or_404(_collection(request, name), request.match_info[param], name)
        return _reply(request, {"item": _public(item)})

    return handler


def create_item(name: str, prefix: str, key: str = "id") -> Handler:
    """POST to a collection; ``key`` names the id field (secrets are keyed by their name)."""

    async def handler(request: web.Request) -> web.Response:
        collection, body = _collection(request, name), await _body(request)
        item_id = str(body.get(key) or request.app[STATE].new_id(prefix))
        if item_id in collection:
            raise web.HTTPConflict(text=f"{name} {item_id!r} exists")
        item: Item = {**body, key: item_id, "created_at": _now()}
        collection[item_id] = item
        return _reply(request, {"item": _public(item)}, status=201)

    return handler


def update_item(name: str, param: str, key: str = "id") -> Handler:
    """PUT and PATCH both merge the body into the item; the id always comes from the path."""

    async def handler(request: web.Request) -> web.Response:
        item = _get_or_404(_collection(request, name), request.match_info[param], name)
        item.update(await _body(request))
        item[key] = request.match_info[param]
        item["updated_at"] = _now()
        return _reply(request, {"item": _public(item)})

    return handler


def delete_item(name: str, param: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        collection = _collection(request, name)
        _get_or_404(collection, request.match_info[param], name)
        del collection[request.match_info[param]]
        return _no_content()

    return handler


def item_action(
    name: str, param: str, action: Callable[[DemoState, Project, Item, Item], Item], status: int
) -> Handler:
    """…/{id}/verb: apply ``action(state, project, item, body)`` and answer with its result."""

    async def handler(request: web.Request) -> web.Response:
        project = _project(request)
        item = _get_or_404(project.collections[name], request.match_info[param], name)
        result = action(request.app[STATE], project, item, await _body(request))
        return _reply(request, {"item": result}, status=status)

    return handler


def _set_active(active: bool) -> Callable[[DemoState, Project, Item, Item], Item]:
    def action(_s: DemoState, _p: Project, item: Item, _b: Item) -> Item:
        item["active"] = active
        return _public(item)

    return action


def _credentials(_s: DemoState, _p: Project, item: Item, _b: Item) -> Item:
    return {key: item[key] for key in ("id", "client_id", "client_secret")}


def _deploy(_s: DemoState, _p: Project, item: Item, _b: Item) -> Item:
    item["deployed_version"] = item.get("version")
    item["deployed_at"] = _now()
    return item


def _replay(state: DemoState, project: Project, item: Item, _b: Item) -> Item:
    execution: Item = {"id": state.new_id("ex"), "workflow": item.get("workflow"),
                       "status": "queued", "replay_of": item["id"], "started_at": _now()}
    project.collections["task-history"][str(execution["id"])] = execution
    return execution


async def update_connected_user_metadata(request: web.Request) -> web.Response:
    user = _get_or_404(_collection(request, "connected-users"),
                       request.match_info["connected_user_id"], "connected user")
    metadata = user.get("metadata")
    if not isinstance(metadata, dict):  # a connected user created without metadata
        metadata = user["metadata"] = {}
    metadata.update(await _body(request))
    return _reply(request, {"item": user})


async def delete_connected_user_integration(request: web.Request) -> web.Response:
    user = _get_or_404(_collection(request, "connected-users"),
                       request.match_info["connected_user_id"], "connected user")
    integration_id = request.match_info["integration_id"]
    linked = user.get("integrations")
    if not isinstance(linked, list) or integration_id not in linked:
        raise _not_found(f"connected user has no integration {integration_id!r}")
    linked.remove(integration_id)
    return _no_content()


# --- streaming endpoints --------------------------------------------------------------------


async def task_history_stream(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: one event at once, then the rest ``interval`` seconds apart."""
    project = _project(request)
    count = _integer(request, "count", SSE_DEFAULT_COUNT, MAX_SSE_COUNT)
    interval = _number(request, "interval", SSE_DEFAULT_INTERVAL, MAX_SSE_INTERVAL)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    if request.method == "HEAD":  # RFC 9110 §9.3.2: same headers, no content
        await response.write_eof()
        return response
    executions = list(project.collections["task-history"].values()) or [{}]
    try:
        for seq in range(count):
            if seq:
                await asyncio.sleep(interval)
            data = {"seq": seq, "project": project.id,
                    "execution": executions[seq % len(executions)], **_echo(request)}
            await response.write(f"id: {seq}\nevent: execution\ndata: {json.dumps(data)}\n\n"
                                 .encode())
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away; nothing left to send to
    return response


async def task_history_live(request: web.Request) -> web.WebSocketResponse:
    """WebSocket echo; the text frame ``close:4001`` closes with code 4001."""
    _project(request)
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT and msg.data == WS_CLOSE_COMMAND:
            await ws.close(code=WS_CLOSE_CODE, message=b"closed on request")
        elif msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


# --- public and test-only endpoints ---------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return _reply(request, {"status": "ok"})


async def static(request: web.Request) -> web.Response:
    path = request.match_info["path"]
    if path.endswith(".css"):
        return web.Response(text="body { font-family: sans-serif; }\n", content_type="text/css")
    return web.Response(text=f"demo static file {path}\n", content_type="text/plain")


async def demo_echo(request: web.Request) -> web.StreamResponse:
    """Stream the request body back chunk by chunk; memory stays bounded by one chunk."""
    content_type = request.headers.get("Content-Type", "application/octet-stream")
    response = web.StreamResponse(headers={"Content-Type": content_type})
    await response.prepare(request)
    async for chunk in request.content.iter_chunked(CHUNK):
        await response.write(chunk)
    await response.write_eof()
    return response


async def demo_bytes(request: web.Request) -> web.StreamResponse:
    """Stream ``n`` bytes of a fixed pattern (byte i is i % 256) in 64 KiB chunks."""
    remaining = _integer(request, "n", 0, MAX_BYTES)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = remaining
    await response.prepare(request)
    if request.method == "HEAD":  # RFC 9110 §9.3.2: same headers, no content
        remaining = 0
    while remaining > 0:
        part = _PATTERN[: min(remaining, CHUNK)]
        await response.write(part)
        remaining -= len(part)
    await response.write_eof()
    return response


async def demo_slow(request: web.Request) -> web.Response:
    delay = _number(request, "delay", 1.0, MAX_SLOW_DELAY)
    await asyncio.sleep(delay)
    return _reply(request, {"slept": delay})


async def demo_status(request: web.Request) -> web.Response:
    try:
        code = int(request.match_info["code"])
    except ValueError:
        raise web.HTTPBadRequest(text="status must be a number") from None
    # 1xx are interim responses (RFC 9110 §15.2), never a final answer to return here.
    if not 200 <= code <= 599:
        raise web.HTTPBadRequest(text="status must be between 200 and 599")
    if code in (204, 304):  # RFC 9110 §15.3.5, §15.4.5: these never carry content
        return web.Response(status=code)
    return _reply(request, {"status": code}, status=code)


# --- the route table ------------------------------------------------------------------------

P = "/api/projects/{project_id}"

# SPEC §10, row by row, then the test-only endpoints. Literal paths come before parameter
# siblings (…/stream before …/{execution_id}) because aiohttp tries resources in order.
ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/healthz", healthz),
    ("GET", "/static/{path:.*}", static),
    ("GET", "/api/org", get_org),
    ("GET", "/api/org/members", list_members),
    ("POST", "/api/org/invites", create_invite),
    ("PATCH", "/api/org/members/{user_id}", update_member),
    ("DELETE", "/api/org/members/{user_id}", delete_member),
    ("GET", "/api/org/billing", get_billing),
    ("PUT", "/api/org/billing", put_billing),
    ("GET", "/api/projects", list_projects),
    ("POST", "/api/projects", create_project),
    ("GET", P, get_project),
    ("PATCH", P, update_project),
    ("DELETE", P, delete_project),
    ("GET", f"{P}/integrations", list_items("integrations")),
    ("POST", f"{P}/integrations", create_item("integrations", "int")),
    ("GET", f"{P}/integrations/{{integration_id}}", get_item("integrations", "integration_id")),
    ("DELETE", f"{P}/integrations/{{integration_id}}",
     delete_item("integrations", "integration_id")),
    ("POST", f"{P}/integrations/{{integration_id}}/activate",
     item_action("integrations", "integration_id", _set_active(True), 200)),
    ("POST", f"{P}/integrations/{{integration_id}}/deactivate",
     item_action("integrations", "integration_id", _set_active(False), 200)),
    ("GET", f"{P}/integrations/{{integration_id}}/credentials",
     item_action("integrations", "integration_id", _credentials, 200)),
    ("GET", f"{P}/workflows", list_items("workflows")),
    ("POST", f"{P}/workflows", create_item("workflows", "wf")),
    ("GET", f"{P}/workflows/{{workflow_id}}", get_item("workflows", "workflow_id")),
    ("PUT", f"{P}/workflows/{{workflow_id}}", update_item("workflows", "workflow_id")),
    ("PATCH", f"{P}/workflows/{{workflow_id}}", update_item("workflows", "workflow_id")),
    ("DELETE", f"{P}/workflows/{{workflow_id}}", delete_item("workflows", "workflow_id")),
    ("POST", f"{P}/workflows/{{workflow_id}}/deploy",
     item_action("workflows", "workflow_id", _deploy, 200)),
    ("GET", f"{P}/sdk-settings", get_sdk_settings),
    ("PATCH", f"{P}/sdk-settings", update_sdk_settings),
    ("POST", f"{P}/sdk-settings/signing-key", rotate_signing_key),
    ("GET", f"{P}/event-destinations", list_items("event-destinations")),
    ("POST", f"{P}/event-destinations", create_item("event-destinations", "dest")),
    ("PATCH", f"{P}/event-destinations/{{destination_id}}",
     update_item("event-destinations", "destination_id")),
    ("DELETE", f"{P}/event-destinations/{{destination_id}}",
     delete_item("event-destinations", "destination_id")),
    ("GET", f"{P}/secrets", list_items("secrets")),
    ("POST", f"{P}/secrets", create_item("secrets", "SECRET", key="name")),
    ("PUT", f"{P}/secrets/{{secret_name}}", update_item("secrets", "secret_name", key="name")),
    ("DELETE", f"{P}/secrets/{{secret_name}}", delete_item("secrets", "secret_name")),
    ("GET", f"{P}/api-keys", list_items("api-keys")),
    ("POST", f"{P}/api-keys", create_item("api-keys", "key")),
    ("DELETE", f"{P}/api-keys/{{key_id}}", delete_item("api-keys", "key_id")),
    ("GET", f"{P}/connected-users", list_items("connected-users")),
    ("GET", f"{P}/connected-users/{{connected_user_id}}",
     get_item("connected-users", "connected_user_id")),
    ("PATCH", f"{P}/connected-users/{{connected_user_id}}/metadata",
     update_connected_user_metadata),
    ("DELETE", f"{P}/connected-users/{{connected_user_id}}/integrations/{{integration_id}}",
     delete_connected_user_integration),
    ("GET", f"{P}/task-history", list_items("task-history")),
    ("GET", f"{P}/task-history/stream", task_history_stream),
    ("GET", f"{P}/task-history/live", task_history_live),
    ("GET", f"{P}/task-history/{{execution_id}}", get_item("task-history", "execution_id")),
    ("POST", f"{P}/task-history/{{execution_id}}/replay",
     item_action("task-history", "execution_id", _replay, 202)),
    ("POST", "/_demo/echo", demo_echo),
    ("GET", "/_demo/bytes", demo_bytes),
    ("GET", "/_demo/slow", demo_slow),
    ("GET", "/_demo/status/{code}", demo_status),
)


@web.middleware
async def _record_and_render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record every request, and answer every error (ours or aiohttp's) as JSON."""
    received = request.app[RECEIVED]
    headers: dict[str, list[str]] = {}
    for name, value in request.headers.items():
        # Header names are case-insensitive (RFC 9110 §5.1): keyed lower-case, values in order.
        headers.setdefault(name.lower(), []).append(value)
    received.append({"method": request.method, "raw_path": request.raw_path, "headers": headers})
    if len(received) > MAX_RECEIVED:
        del received[: len(received) - MAX_RECEIVED]
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = HTTPStatus(exc.status).phrase.lower().replace(" ", "_").replace("-", "_")
        response = _reply(request, {"error": error, "detail": exc.text}, status=exc.status)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


def make_demo_app() -> web.Application:
    """A fresh demo backend with its own seeded state and an empty request record."""
    app = web.Application(middlewares=[_record_and_render_errors])
    app[RECEIVED] = []
    app[STATE] = _seed()
    for method, path, handler in ROUTES:
        if method == "GET":
            app.router.add_get(path, handler)  # HEAD too: the proxy forwards HEAD on GET routes
        else:
            app.router.add_route(method, path, handler)
    return app


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m proxy.demo.app",
                                     description="Run the demo dashboard backend.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    web.run_app(make_demo_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
