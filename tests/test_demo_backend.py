"""Tests for the demo dashboard backend: every SPEC §10 row, streaming and test-only endpoints."""

from __future__ import annotations

import io
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from proxy.demo.app import RECEIVED, make_demo_app, parse_args

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]

P = "/api/projects/proj-prod"
AUTH = {
    "X-Auth-User": "alice",
    "X-Auth-Org": "acme",
    "X-Auth-Role": "admin",
    "X-Auth-Permission": "test:perm",
    "X-Request-Id": "req-123",
}
ECHOED_AUTH = {"user": "alice", "org": "acme", "role": "admin", "permission": "test:perm",
               "request_id": "req-123"}

# One request per SPEC §10 row (both paths or methods where a row lists two), with the status
# the demo answers. Streams (SSE, WebSocket) have their own tests below.
ROWS: list[tuple[str, str, dict[str, object] | None, int]] = [
    ("GET", "/healthz", None, 200),
    ("GET", "/api/org", None, 200),
    ("GET", "/api/org/members", None, 200),
    ("POST", "/api/org/invites", {"email": "new@acme.test", "role": "developer"}, 201),
    ("PATCH", "/api/org/members/bob", {"role": "support"}, 200),
    ("DELETE", "/api/org/members/bob", None, 204),
    ("GET", "/api/org/billing", None, 200),
    ("PUT", "/api/org/billing", {"card": "amex ****0005"}, 200),
    ("GET", "/api/projects", None, 200),
    ("POST", "/api/projects", {"id": "proj-new", "name": "New"}, 201),
    ("GET", P, None, 200),
    ("PATCH", P, {"name": "Prod!"}, 200),
    ("DELETE", P, None, 204),
    ("GET", f"{P}/integrations", None, 200),
    ("GET", f"{P}/integrations/int-slack", None, 200),
    ("POST", f"{P}/integrations", {"provider": "jira"}, 201),
    ("DELETE", f"{P}/integrations/int-slack", None, 204),
    ("POST", f"{P}/integrations/int-github/activate", None, 200),
    ("POST", f"{P}/integrations/int-slack/deactivate", None, 200),
    ("GET", f"{P}/integrations/int-slack/credentials", None, 200),
    ("GET", f"{P}/workflows", None, 200),
    ("GET", f"{P}/workflows/wf-sync-contacts", None, 200),
    ("POST", f"{P}/workflows", {"name": "New flow"}, 201),
    ("PUT", f"{P}/workflows/wf-sync-contacts", {"name": "Renamed", "version": 4}, 200),
    ("PATCH", f"{P}/workflows/wf-sync-contacts", {"version": 5}, 200),
    ("DELETE", f"{P}/workflows/wf-nightly-report", None, 204),
    ("POST", f"{P}/workflows/wf-nightly-report/deploy", None, 200),
    ("GET", f"{P}/sdk-settings", None, 200),
    ("PATCH", f"{P}/sdk-settings", {"callback_url": "https://x.example.com"}, 200),
    ("POST", f"{P}/sdk-settings/signing-key", None, 201),
    ("GET", f"{P}/event-destinations", None, 200),
    ("POST", f"{P}/event-destinations", {"url": "https://hooks.example.com/2"}, 201),
    ("PATCH", f"{P}/event-destinations/dest-1", {"events": []}, 200),
    ("DELETE", f"{P}/event-destinations/dest-1", None, 204),
    ("GET", f"{P}/secrets", None, 200),
    ("POST", f"{P}/secrets", {"name": "NEW_SECRET", "value": "s3cret"}, 201),
    ("PUT", f"{P}/secrets/SLACK_TOKEN", {"value": "xoxb-rotated"}, 200),
    ("DELETE", f"{P}/secrets/DB_PASSWORD", None, 204),
    ("GET", f"{P}/api-keys", None, 200),
    ("POST", f"{P}/api-keys", {"label": "deploy bot"}, 201),
    ("DELETE", f"{P}/api-keys/key-1", None, 204),
    ("GET", f"{P}/connected-users", None, 200),
    ("GET", f"{P}/connected-users/cu-1001", None, 200),
    ("PATCH", f"{P}/connected-users/cu-1001/metadata", {"tier": "silver"}, 200),
    ("DELETE", f"{P}/connected-users/cu-1001/integrations/int-github", None, 204),
    ("GET", f"{P}/task-history", None, 200),
    ("GET", f"{P}/task-history/ex-5001", None, 200),
    ("POST", f"{P}/task-history/ex-5001/replay", None, 202),
]


@pytest.fixture
async def client(aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(make_demo_app())


@pytest.mark.parametrize(("method", "path", "body", "status"), ROWS)
async def test_every_row_answers_2xx_and_echoes_auth(
    client: Client, method: str, path: str, body: dict[str, object] | None, status: int
) -> None:
    resp = await client.request(method, path, json=body, headers=AUTH)
    assert resp.status == status
    if status == 204:
        assert await resp.read() == b""
    else:
        data = await resp.json()
        assert data["auth"] == ECHOED_AUTH
        assert data["method"] == method
        assert data["path"] == path
    # The request record shows exactly what reached the backend, whatever the answer.
    record = client.app[RECEIVED][-1]
    assert record["method"] == method
    assert record["raw_path"] == path
    headers = record["headers"]
    assert isinstance(headers, dict)
    assert headers["x-auth-user"] == ["alice"]


async def test_auth_block_is_null_when_headers_absent(client: Client) -> None:
    resp = await client.get("/api/projects?x=1")
    data = await resp.json()
    assert data["auth"] == dict.fromkeys(ECHOED_AUTH)
    assert data["path"] == "/api/projects?x=1"  # raw_path keeps the query string


async def test_received_keeps_repeated_headers_in_order(client: Client) -> None:
    headers = [("X-Auth-User", "one"), ("X-Auth-User", "two"), ("X_Auth_User", "three")]
    await client.get("/healthz", headers=headers)
    received = client.app[RECEIVED][-1]["headers"]
    assert isinstance(received, dict)
    assert received["x-auth-user"] == ["one", "two"]
    assert received["x_auth_user"] == ["three"]


async def test_head_on_a_get_route(client: Client) -> None:
    resp = await client.head("/api/org")
    assert resp.status == 200
    assert await resp.read() == b""


async def test_unknown_project_is_404_json(client: Client) -> None:
    resp = await client.get("/api/projects/nope/workflows", headers=AUTH)
    assert resp.status == 404
    assert resp.content_type == "application/json"
    data = await resp.json()
    assert data["error"] == "not_found"
    assert "nope" in data["detail"]
    assert data["auth"] == ECHOED_AUTH


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"{P}/integrations/int-nope"),
        ("DELETE", f"{P}/workflows/wf-nope"),
        ("PUT", f"{P}/secrets/NOPE"),
        ("POST", f"{P}/task-history/ex-nope/replay"),
        ("PATCH", "/api/org/members/nobody"),
        ("DELETE", f"{P}/connected-users/cu-1002/integrations/int-github"),
        ("GET", "/api/no-such-endpoint"),
    ],
)
async def test_unknown_ids_are_404_json(client: Client, method: str, path: str) -> None:
    resp = await client.request(method, path)
    assert resp.status == 404
    assert (await resp.json())["error"] == "not_found"


async def test_unknown_org_is_404(client: Client) -> None:
    resp = await client.get("/api/org/billing", headers={"X-Auth-Org": "ghost"})
    assert resp.status == 404


async def test_wrong_method_is_405_json_with_allow(client: Client) -> None:
    resp = await client.post("/api/org/billing")
    assert resp.status == 405
    assert "PUT" in resp.headers["Allow"]
    assert (await resp.json())["error"] == "method_not_allowed"


async def test_bad_json_body_is_400(client: Client) -> None:
    resp = await client.post(f"{P}/workflows", data=b"{not json",
                             headers={"Content-Type": "application/json"})
    assert resp.status == 400
    resp = await client.post(f"{P}/workflows", json=[1, 2])
    assert resp.status == 400


async def test_create_then_read_then_delete(client: Client) -> None:
    resp = await client.post(f"{P}/workflows", json={"name": "Flow"})
    created = (await resp.json())["item"]
    url = f"{P}/workflows/{created['id']}"
    assert (await (await client.get(url)).json())["item"]["name"] == "Flow"
    assert (await client.delete(url)).status == 204
    assert (await client.get(url)).status == 404


async def test_duplicate_create_is_409(client: Client) -> None:
    resp = await client.post(f"{P}/secrets", json={"name": "SLACK_TOKEN"})
    assert resp.status == 409


async def test_secret_values_only_via_their_endpoints(client: Client) -> None:
    secrets = (await (await client.get(f"{P}/secrets")).json())["items"]
    assert {s["value"] for s in secrets} == {"****"}
    integration = (await (await client.get(f"{P}/integrations/int-slack")).json())["item"]
    assert integration["client_secret"] == "****"
    creds = (await (await client.get(f"{P}/integrations/int-slack/credentials")).json())["item"]
    assert creds["client_secret"] == "proj-prod-slack-secret"


async def test_org_routes_follow_x_auth_org(client: Client) -> None:
    small = {"X-Auth-Org": "smallco"}
    resp = await client.post("/api/projects", json={"id": "sc-two"}, headers=small)
    assert resp.status == 201
    listed = (await (await client.get("/api/projects", headers=small)).json())["items"]
    assert {p["id"] for p in listed} == {"sc-main", "sc-two"}
    acme = (await (await client.get("/api/projects")).json())["items"]  # default org: acme
    assert {p["id"] for p in acme} == {"proj-prod", "proj-staging"}
    members = (await (await client.get("/api/org/members", headers=small)).json())["items"]
    assert {m["user"] for m in members} == {"ed", "gus", "fay"}


async def test_new_project_starts_empty(client: Client) -> None:
    await client.post("/api/projects", json={"id": "proj-x"})
    items = (await (await client.get("/api/projects/proj-x/integrations")).json())["items"]
    assert items == []


async def test_deleted_project_is_gone(client: Client) -> None:
    assert (await client.delete("/api/projects/proj-staging")).status == 204
    assert (await client.get("/api/projects/proj-staging")).status == 404


async def test_actions_change_state(client: Client) -> None:
    await client.post(f"{P}/integrations/int-github/activate")
    integration = (await (await client.get(f"{P}/integrations/int-github")).json())["item"]
    assert integration["active"] is True
    replay = (await (await client.post(f"{P}/task-history/ex-5001/replay")).json())["item"]
    assert replay["replay_of"] == "ex-5001"
    assert (await client.get(f"{P}/task-history/{replay['id']}")).status == 200
    await client.delete(f"{P}/connected-users/cu-1001/integrations/int-github")
    user = (await (await client.get(f"{P}/connected-users/cu-1001")).json())["item"]
    assert user["integrations"] == ["int-slack"]


async def test_healthz_and_static(client: Client) -> None:
    assert (await (await client.get("/healthz")).json())["status"] == "ok"
    css = await client.get("/static/css/app.css")
    assert css.status == 200
    assert css.content_type == "text/css"
    text = await client.get("/static/js/app.js")
    assert text.content_type == "text/plain"
    assert "js/app.js" in await text.text()


def _parse_sse(text: str) -> list[dict[str, object]]:
    events = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line.startswith("data: ")]
        if lines:
            events.append(json.loads(lines[0].removeprefix("data: ")))
    return events


async def test_sse_default_sends_four_events(client: Client) -> None:
    resp = await client.get(f"{P}/task-history/stream", headers=AUTH)
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    events = _parse_sse(await resp.text())
    assert [e["seq"] for e in events] == [0, 1, 2, 3]
    assert events[0]["auth"] == ECHOED_AUTH
    assert events[0]["project"] == "proj-prod"


async def test_sse_first_event_arrives_before_the_stream_ends(client: Client) -> None:
    resp = await client.get(f"{P}/task-history/stream?count=3&interval=0.05")
    first = await resp.content.readuntil(b"\n\n")
    assert b"id: 0" in first
    assert not resp.content.at_eof()
    rest = _parse_sse((await resp.content.read()).decode())
    assert [e["seq"] for e in rest] == [1, 2]


@pytest.mark.parametrize("query", ["count=1001", "interval=6", "count=-1", "count=1.5",
                                   "interval=nan", "count=x"])
async def test_sse_rejects_out_of_bounds_query(client: Client, query: str) -> None:
    resp = await client.get(f"{P}/task-history/stream?{query}")
    assert resp.status == 400


async def test_websocket_echoes_text_and_binary(client: Client) -> None:
    async with client.ws_connect(f"{P}/task-history/live") as ws:
        await ws.send_str("hello")
        assert (await ws.receive()).data == "hello"
        await ws.send_bytes(b"\x00\x01\xff")
        msg = await ws.receive()
        assert msg.type == WSMsgType.BINARY
        assert msg.data == b"\x00\x01\xff"


async def test_websocket_close_command_uses_code_4001(client: Client) -> None:
    async with client.ws_connect(f"{P}/task-history/live") as ws:
        await ws.send_str("close:4001")
        msg = await ws.receive()
        assert msg.type == WSMsgType.CLOSE
        assert msg.data == 4001
    assert ws.close_code == 4001


async def test_websocket_unknown_project_is_404(client: Client) -> None:
    resp = await client.get("/api/projects/nope/task-history/live")
    assert resp.status == 404


async def test_echo_round_trips_5_mb(client: Client) -> None:
    payload = random.Random(7).randbytes(5 * 1024 * 1024)
    resp = await client.post("/_demo/echo", data=io.BytesIO(payload))
    assert resp.status == 200
    assert await resp.read() == payload


async def test_echo_streams_a_chunked_upload(client: Client) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(50):
            yield bytes([i]) * 10_000

    resp = await client.post("/_demo/echo", data=chunks(),
                             headers={"Content-Type": "text/plain"})
    body = await resp.read()
    assert resp.content_type == "text/plain"
    assert body == b"".join(bytes([i]) * 10_000 for i in range(50))


@pytest.mark.parametrize("n", [0, 1, 65536, 65537, 3 * 65536 + 17])
async def test_bytes_length_and_pattern(client: Client, n: int) -> None:
    resp = await client.get(f"/_demo/bytes?n={n}")
    assert resp.headers["Content-Length"] == str(n)
    body = await resp.read()
    assert len(body) == n
    assert body == bytes(i % 256 for i in range(n))


async def test_bytes_bounded_to_2_gib(client: Client) -> None:
    assert (await client.get(f"/_demo/bytes?n={2 * 1024**3 + 1}")).status == 400


async def test_slow_answers_after_delay(client: Client) -> None:
    resp = await client.get("/_demo/slow?delay=0.01")
    assert (await resp.json())["slept"] == 0.01
    assert (await client.get("/_demo/slow?delay=121")).status == 400


@pytest.mark.parametrize("code", [200, 201, 302, 404, 418, 500, 503])
async def test_status_with_body(client: Client, code: int) -> None:
    resp = await client.get(f"/_demo/status/{code}", allow_redirects=False)
    assert resp.status == code
    assert (await resp.json())["status"] == code


@pytest.mark.parametrize("code", [204, 304])
async def test_status_without_body(client: Client, code: int) -> None:
    resp = await client.get(f"/_demo/status/{code}")
    assert resp.status == code
    assert await resp.read() == b""


@pytest.mark.parametrize("code", ["100", "600", "abc"])
async def test_status_rejects_invalid_codes(client: Client, code: str) -> None:
    assert (await client.get(f"/_demo/status/{code}")).status == 400


def test_standalone_args() -> None:
    args = parse_args(["--host", "127.0.0.1", "--port", "9999"])
    assert (args.host, args.port) == ("127.0.0.1", 9999)
    assert parse_args([]).port == 8081
