"""Every SPEC §2 reason end to end, request ids, the audit log, default: allow and /_rbac/me."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml
from aiohttp import web

from proxy.policy.model import Membership
from proxy.stores.base import StoreError
from proxy.stores.cache import RoleCache
from proxy.stores.guard import GuardedStore
from proxy.web.serve import free_port
from tests.fakes import ROLES_AND_PLANS
from tests.web.conftest import SHIPPED_ROUTES, Backend, Proxy, StartBackend, StartProxy

AUDIT_FIELDS = {
    "ts",
    "request_id",
    "remote",
    "user",
    "org",
    "project",
    "method",
    "path",
    "route",
    "permission",
    "decision",
    "reason",
    "status",
    "duration_ms",
    "stale",
}
NEW_REQUEST_ID = re.compile(r"[0-9a-f]{32}")

# Small routes files for behaviour the shipped policy does not have (shadow mode, default
# allow). Block style: a template with braces inside a flow mapping is a YAML error.
_POLICY_HEAD = """\
version: 1
default: {default}
mode: {mode}
""" + ROLES_AND_PLANS + """\
routes:
  - path: /healthz
    methods: [GET]
    public: true
  - path: /api/org/members
    methods: [GET]
    permission: team:read
  - path: /api/org/billing
    methods: [GET]
    permission: billing:read
"""


def routes_file(
    tmp_path: Path, *, default: str = "deny", mode: str = "enforce", extra: str = ""
) -> str:
    path = tmp_path / "routes.yaml"
    path.write_text(_POLICY_HEAD.format(default=default, mode=mode) + extra)
    return str(path)


# --- helpers ---------------------------------------------------------------------------------


async def get(
    proxy: Proxy, path: str, user: str | None = None, **headers: str
) -> tuple[int, Mapping[str, str], str]:
    sent = dict(headers)
    if user is not None:
        sent["X-User-Id"] = user
    async with (
        aiohttp.ClientSession() as session,
        session.get(proxy.url + path, headers=sent) as resp,
    ):
        return resp.status, resp.headers.copy(), await resp.text()


async def raw(port: int, request: bytes) -> tuple[int, dict[str, str], str]:
    """Send bytes as they are (aiohttp's client would normalize them); one response back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=5)  # Connection: close → EOF
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body.decode()


def assert_error(
    status: int,
    headers: Mapping[str, str],
    text: str,
    *,
    expect_status: int,
    reason: str,
    permission: str | None = None,
) -> dict[str, Any]:
    """The SPEC §2 error shape: JSON, error word, reason, permission, request_id = header."""
    lowered = {k.lower(): v for k, v in headers.items()}
    assert status == expect_status, text
    assert lowered["content-type"].split(";")[0] == "application/json"
    body: dict[str, Any] = json.loads(text)
    words = {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        405: "method_not_allowed",
        502: "bad_gateway",
        503: "service_unavailable",
        504: "gateway_timeout",
    }
    assert body["error"] == words[expect_status]
    assert body["reason"] == reason
    assert body.get("permission") == permission
    assert body["request_id"] == lowered["x-request-id"]
    return body


def audit(proxy: Proxy) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proxy.audit_lines()]


def one_audit(proxy: Proxy, request_id: str) -> dict[str, Any]:
    found = [r for r in audit(proxy) if r["request_id"] == request_id]
    assert len(found) == 1, found
    return found[0]


def crlf(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# --- allowed, public, shadow_deny ------------------------------------------------------------


async def test_allowed(proxy: Proxy, backend: Backend) -> None:
    status, headers, text = await get(proxy, "/api/org/billing", "alice")
    assert status == 200
    assert json.loads(text)["billing"]["plan"] == "enterprise"
    record = one_audit(proxy, headers["X-Request-Id"])
    assert (record["decision"], record["reason"], record["status"]) == ("allow", "allowed", 200)
    assert len(backend.received) == 1


async def test_public_forwards_without_identity(proxy: Proxy, backend: Backend) -> None:
    status, headers, _ = await get(
        proxy, "/static/app.css", "alice", X_Auth_User="mallory", **{"X-Auth-Role": "admin"}
    )
    assert status == 200
    assert "X-Request-Id" in headers
    sent = backend.received[0]["headers"]
    assert isinstance(sent, dict)
    # Client identity headers are stripped on public routes too, in every spelling.
    for name in ("x-user-id", "x-auth-user", "x_auth_user", "x-auth-role", "x-auth-org"):
        assert name not in sent, name
    assert proxy.audit_lines() == []  # public routes are not audited


@pytest.mark.parametrize("where", ["global", "route"])
async def test_shadow_deny_forwards_and_audits(
    where: str, tmp_path: Path, backend: Backend, start_proxy: StartProxy
) -> None:
    if where == "global":
        routes = routes_file(tmp_path, mode="shadow")
    else:
        routes = routes_file(
            tmp_path,
            extra="  - path: /api/org\n    methods: [GET]\n    permission: billing:read\n"
            "    mode: shadow\n",
        )
    proxy = await start_proxy(backend.url, routes=routes)
    # sue (support) lacks billing:read: shadow mode logs the denial and forwards anyway.
    path = "/api/org/billing" if where == "global" else "/api/org"
    status, headers, text = await get(proxy, path, "sue")
    assert status == 200, text
    assert len(backend.received) == 1
    assert backend.received[0]["raw_path"] == path
    record = one_audit(proxy, headers["X-Request-Id"])
    assert record["reason"] == "shadow_deny"
    assert record["user"] == "sue"
    assert record["permission"] == "billing:read"
    if where == "route":
        # Only the route in shadow mode forwards; the rest of the table is enforced.
        status, headers, text = await get(proxy, "/api/org/billing", "sue")
        assert_error(
            status,
            headers,
            text,
            expect_status=403,
            reason="missing_permission",
            permission="billing:read",
        )
        assert len(backend.received) == 1


# --- bad_request -----------------------------------------------------------------------------

BAD_TARGETS = {
    "encoded-dot-dot": crlf(
        "GET /api/projects/proj-prod/%2e%2e/secrets HTTP/1.1",
        "Host: x",
        "X-User-Id: alice",
        "Connection: close",
    ),
    "absolute-form": crlf(
        "GET http://127.0.0.1/api/org HTTP/1.1",
        "Host: 127.0.0.1",
        "X-User-Id: alice",
        "Connection: close",
    ),
    "fragment": crlf(
        "GET /api/org#top HTTP/1.1", "Host: x", "X-User-Id: alice", "Connection: close"
    ),
}
NOT_ALLOWED_METHODS = {
    "connect-authority-form": crlf(
        "CONNECT 127.0.0.1:443 HTTP/1.1", "Host: 127.0.0.1:443", "Connection: close"
    ),
    "connect-origin-form": crlf(
        "CONNECT /api/org HTTP/1.1", "Host: x", "X-User-Id: alice", "Connection: close"
    ),
    "trace": crlf("TRACE /api/org HTTP/1.1", "Host: x", "X-User-Id: alice", "Connection: close"),
}


@pytest.mark.parametrize("name", sorted(BAD_TARGETS))
async def test_bad_request(name: str, proxy: Proxy, backend: Backend) -> None:
    status, headers, text = await raw(proxy.server.proxy_port, BAD_TARGETS[name])
    assert_error(status, headers, text, expect_status=400, reason="bad_request")
    assert backend.received == []
    record = one_audit(proxy, headers["x-request-id"])
    assert (record["reason"], record["status"]) == ("bad_request", 400)


@pytest.mark.parametrize("name", sorted(NOT_ALLOWED_METHODS))
async def test_connect_and_trace_are_405(name: str, proxy: Proxy, backend: Backend) -> None:
    status, headers, text = await raw(proxy.server.proxy_port, NOT_ALLOWED_METHODS[name])
    assert_error(status, headers, text, expect_status=405, reason="bad_request")
    allow = {m.strip() for m in headers["allow"].split(",")}  # RFC 9110 §15.5.6
    assert "GET" in allow and not allow & {"CONNECT", "TRACE"}
    assert backend.received == []


# --- routing and identity --------------------------------------------------------------------


async def test_no_route(proxy: Proxy, backend: Backend) -> None:
    status, headers, text = await get(proxy, "/api/nothing/here", "alice")
    assert_error(status, headers, text, expect_status=403, reason="no_route")
    assert backend.received == []
    assert one_audit(proxy, headers["X-Request-Id"])["route"] is None


async def test_missing_credentials_header_mode(proxy: Proxy, backend: Backend) -> None:
    status, headers, text = await get(proxy, "/api/org/billing")
    assert_error(
        status,
        headers,
        text,
        expect_status=401,
        reason="missing_credentials",
        permission="billing:read",
    )
    assert headers.get("WWW-Authenticate")  # RFC 9110 §11.6.1: a 401 carries a challenge
    assert backend.received == []


async def test_identity_headers_from_an_untrusted_peer_count_as_missing(
    backend: Backend, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(backend.url, trusted_proxies="10.0.0.0/8")
    status, headers, text = await get(proxy, "/api/org", "alice")
    assert_error(status, headers, text, expect_status=401, reason="missing_credentials")
    assert backend.received == []


async def test_invalid_credentials_repeated_user_header(proxy: Proxy, backend: Backend) -> None:
    request = crlf(
        "GET /api/org HTTP/1.1",
        "Host: x",
        "X-User-Id: sue",
        "X-User-Id: alice",
        "Connection: close",
    )
    status, headers, text = await raw(proxy.server.proxy_port, request)
    assert_error(status, headers, text, expect_status=401, reason="invalid_credentials")
    assert "www-authenticate" in headers
    assert backend.received == []


JWT_SECRET = "test-secret-of-at-least-32-bytes-for-hs256!"


async def test_jwt_mode_challenges_with_bearer_and_never_logs_tokens(
    backend: Backend, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RBAC_TEST_JWT_SECRET", JWT_SECRET)
    proxy = await start_proxy(backend.url, auth="jwt", jwt_secret_env="RBAC_TEST_JWT_SECRET")
    now = int(time.time())
    good = jwt.encode({"sub": "alice", "exp": now + 300}, JWT_SECRET, algorithm="HS256")
    forged = jwt.encode({"sub": "alice", "exp": now + 300}, "x" * 40, algorithm="HS256")

    status, headers, text = await get(proxy, "/api/org/billing")
    assert_error(
        status,
        headers,
        text,
        expect_status=401,
        reason="missing_credentials",
        permission="billing:read",
    )
    assert headers["WWW-Authenticate"].startswith("Bearer")

    status, headers, text = await get(proxy, "/api/org/billing", Authorization=f"Bearer {forged}")
    assert_error(
        status,
        headers,
        text,
        expect_status=401,
        reason="invalid_credentials",
        permission="billing:read",
    )
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert forged not in text

    status, headers, _ = await get(proxy, "/api/org/billing", Authorization=f"Bearer {good}")
    assert status == 200
    assert one_audit(proxy, headers["X-Request-Id"])["user"] == "alice"
    log = "\n".join(proxy.audit_lines())
    for secret in (good, forged, JWT_SECRET, good.split(".")[2], forged.split(".")[2]):
        assert secret not in log
    assert len(backend.received) == 1


@pytest.mark.parametrize(
    ("user", "path", "reason", "permission"),
    [
        ("mallory", "/api/projects/proj-prod", "not_a_member", "projects:read"),
        ("alice", "/api/projects/proj-nope/workflows", "unknown_project", "workflows:read"),
        ("fay", "/api/projects/sc-main/task-history", "plan_restricted", "task_history:read"),
        ("sue", "/api/org/billing", "missing_permission", "billing:read"),
    ],
)
async def test_forbidden_reasons(
    user: str, path: str, reason: str, permission: str, proxy: Proxy, backend: Backend
) -> None:
    status, headers, text = await get(proxy, path, user)
    assert_error(status, headers, text, expect_status=403, reason=reason, permission=permission)
    assert backend.received == []
    record = one_audit(proxy, headers["X-Request-Id"])
    assert (record["user"], record["reason"], record["decision"]) == (user, reason, "deny")


# --- dependency failures ---------------------------------------------------------------------


class BrokenStore:
    """A role store that is down: every question raises StoreError."""

    backend = "broken"

    async def memberships(self, user: str) -> tuple[Membership, ...]:
        raise StoreError("connection refused")

    async def project_org(self, project: str) -> str | None:
        raise StoreError("connection refused")

    async def open(self) -> None:
        return None

    async def ping(self) -> None:
        raise StoreError("connection refused")

    async def close(self) -> None:
        return None


async def test_store_unavailable_fails_closed(proxy: Proxy, backend: Backend) -> None:
    proxy.server.runtime.cache = RoleCache(BrokenStore())
    status, headers, text = await get(proxy, "/api/projects/proj-prod/secrets", "alice")
    body = assert_error(
        status,
        headers,
        text,
        expect_status=503,
        reason="store_unavailable",
        permission="secrets:read",
    )
    assert "connection refused" not in json.dumps(body)  # internals stay in the server log
    assert int(headers["Retry-After"]) > 0
    status, headers, text = await get(proxy, "/_rbac/me", "alice")
    assert_error(status, headers, text, expect_status=503, reason="store_unavailable")
    assert int(headers["Retry-After"]) > 0
    assert backend.received == []


class HangingStore:
    """Answers from the shipped members until `hang` is set; then never answers."""

    backend = "hanging"

    def __init__(self) -> None:
        self.hang = False

    async def _wait(self) -> None:
        if self.hang:
            await asyncio.Event().wait()  # cancelled by the guard's timeout

    async def memberships(self, user: str) -> tuple[Membership, ...]:
        await self._wait()
        return {"alice": (Membership("acme", "enterprise", "admin"),)}.get(user, ())

    async def project_org(self, project: str) -> str | None:
        await self._wait()
        return "acme" if project == "proj-prod" else None

    async def open(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_hanging_store_serves_warm_users_stale_and_fails_cold_users_closed(
    backend: Backend, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(backend.url, store_timeout=0.3)
    store = HangingStore()
    # As build_store wires a network store: its own timeout inside the cache, so the cache
    # can fall back to a stale entry before the request gives up.
    guarded = GuardedStore(store, timeout=0.3, failure_threshold=100)
    proxy.server.runtime.cache = RoleCache(guarded, ttl=0, negative_ttl=0, stale_ttl=300)
    path = "/api/projects/proj-prod/secrets"
    status, headers, _ = await get(proxy, path, "alice")
    assert status == 200
    assert one_audit(proxy, headers["X-Request-Id"])["stale"] is False

    store.hang = True
    status, headers, text = await get(proxy, path, "alice")
    assert status == 200, text
    record = one_audit(proxy, headers["X-Request-Id"])
    assert (record["reason"], record["stale"]) == ("allowed", True)
    status, headers, text = await get(proxy, path, "bob")  # nothing cached: fail closed
    assert_error(
        status,
        headers,
        text,
        expect_status=503,
        reason="store_unavailable",
        permission="secrets:read",
    )
    assert len(backend.received) == 2


async def test_upstream_unavailable(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    status, headers, text = await get(proxy, "/api/org/billing", "alice")
    assert_error(
        status,
        headers,
        text,
        expect_status=502,
        reason="upstream_unavailable",
        permission="billing:read",
    )
    record = one_audit(proxy, headers["X-Request-Id"])
    assert (record["reason"], record["status"]) == ("upstream_unavailable", 502)


async def test_upstream_timeout(start_backend: StartBackend, start_proxy: StartProxy) -> None:
    release = asyncio.Event()
    reached = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        reached.set()
        await release.wait()
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hang)
    upstream = await start_backend(app)
    proxy = await start_proxy(upstream.url, upstream_timeout=0.5)
    try:
        status, headers, text = await get(proxy, "/api/org/billing", "alice")
    finally:
        release.set()
    assert reached.is_set()
    assert_error(
        status,
        headers,
        text,
        expect_status=504,
        reason="upstream_timeout",
        permission="billing:read",
    )
    assert one_audit(proxy, headers["X-Request-Id"])["status"] == 504


# --- request ids -----------------------------------------------------------------------------


async def test_request_id_echoed_when_well_formed(proxy: Proxy, backend: Backend) -> None:
    status, headers, _ = await get(proxy, "/api/org", "alice", **{"X-Request-Id": "client-42.a"})
    assert status == 200
    assert headers["X-Request-Id"] == "client-42.a"
    sent = backend.received[0]["headers"]
    assert isinstance(sent, dict)
    assert sent["x-request-id"] == ["client-42.a"]
    status, headers, text = await get(
        proxy, "/api/org/billing", "sue", **{"X-Request-Id": "client-43"}
    )
    body = assert_error(
        status,
        headers,
        text,
        expect_status=403,
        reason="missing_permission",
        permission="billing:read",
    )
    assert body["request_id"] == "client-43"
    assert one_audit(proxy, "client-43")["user"] == "sue"


@pytest.mark.parametrize("bad", ["has space", "a" * 200, "semi;colon", 'quote"d', "ünïcode"])
async def test_malformed_request_id_is_replaced(bad: str, proxy: Proxy, backend: Backend) -> None:
    status, headers, _ = await get(proxy, "/api/org", "alice", **{"X-Request-Id": bad})
    assert status == 200
    rid = headers["X-Request-Id"]
    assert rid != bad
    assert NEW_REQUEST_ID.fullmatch(rid)
    sent = backend.received[0]["headers"]
    assert isinstance(sent, dict)
    assert sent["x-request-id"] == [rid]  # the backend sees the id the client got back
    assert one_audit(proxy, rid)["reason"] == "allowed"


async def test_every_response_carries_a_request_id(proxy: Proxy) -> None:
    requests: list[tuple[str, str | None]] = [
        ("/api/org", "alice"),  # allowed
        ("/healthz", None),  # public
        ("/api/org/billing", "sue"),  # 403
        ("/api/org", None),  # 401
        ("/api/projects/proj-prod/workflows/wf-nope", "alice"),  # the backend's own 404
        ("/_rbac/me", "alice"),
        ("/_rbac/me", None),
    ]
    seen: set[str] = set()
    for path, user in requests:
        _, headers, _ = await get(proxy, path, user)
        assert NEW_REQUEST_ID.fullmatch(headers["X-Request-Id"]), path
        seen.add(headers["X-Request-Id"])
    _, raw_headers, _ = await raw(proxy.server.proxy_port, BAD_TARGETS["fragment"])
    seen.add(raw_headers["x-request-id"])
    assert len(seen) == len(requests) + 1  # a fresh id per request


# --- audit log -------------------------------------------------------------------------------


async def test_audit_one_line_per_decision_without_secrets(proxy: Proxy) -> None:
    secrets = {
        "Authorization": "Bearer tok-SECRET-1",
        "Cookie": "session=cookie-SECRET-2",
        "X-Api-Key": "key-SECRET-3",
    }
    query = "?api_key=query-SECRET-4"
    ids: dict[str, str] = {}
    cases = {
        "alice-allowed": ("/api/org/billing" + query, "alice"),
        "sue-denied": ("/api/projects/proj-prod/secrets" + query, "sue"),
        "sue-project": ("/api/projects/proj-prod/task-history" + query, "sue"),
        "anonymous": ("/api/org/billing" + query, None),
        "public": ("/healthz" + query, "alice"),
    }
    for name, (path, user) in cases.items():
        _, headers, _ = await get(proxy, path, user, **secrets)
        ids[name] = headers["X-Request-Id"]
    _, headers, _ = await raw(proxy.server.proxy_port, BAD_TARGETS["encoded-dot-dot"])
    ids["bad"] = headers["x-request-id"]

    lines = proxy.audit_lines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 5  # one per decision; the public request is not audited
    for record in records:
        assert set(record) >= AUDIT_FIELDS
        assert isinstance(record["duration_ms"], (int, float)) and record["duration_ms"] >= 0
        assert record["remote"] == "127.0.0.1"
        assert record["stale"] is False
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", record["ts"]
        )
    assert ids["public"] not in {r["request_id"] for r in records}

    def subset(name: str) -> dict[str, Any]:
        record = one_audit(proxy, ids[name])
        return {k: record[k] for k in sorted(AUDIT_FIELDS - {"ts", "duration_ms", "remote"})}

    assert subset("alice-allowed") == {
        "request_id": ids["alice-allowed"],
        "user": "alice",
        "org": "acme",
        "project": None,
        "method": "GET",
        "path": "/api/org/billing",
        "route": "/api/org/billing",
        "permission": "billing:read",
        "decision": "allow",
        "reason": "allowed",
        "status": 200,
        "stale": False,
    }
    assert subset("sue-denied") == {
        "request_id": ids["sue-denied"],
        "user": "sue",
        "org": "acme",
        "project": "proj-prod",
        "method": "GET",
        "path": "/api/projects/proj-prod/secrets",
        "route": "/api/projects/{project_id}/secrets",
        "permission": "secrets:read",
        "decision": "deny",
        "reason": "missing_permission",
        "status": 403,
        "stale": False,
    }
    assert subset("sue-project")["project"] == "proj-prod"
    assert subset("sue-project")["status"] == 200
    assert subset("anonymous")["reason"] == "missing_credentials"
    assert subset("anonymous")["user"] is None
    assert subset("bad")["reason"] == "bad_request"
    log = "\n".join(lines)
    for value in ("tok-SECRET-1", "cookie-SECRET-2", "key-SECRET-3", "query-SECRET-4"):
        assert value not in log


# --- default: allow --------------------------------------------------------------------------


async def test_default_allow_forwards_unmatched_without_identity(
    tmp_path: Path, backend: Backend, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(backend.url, routes=routes_file(tmp_path, default="allow"))
    status, headers, _ = await get(
        proxy, "/_demo/status/200", "alice", **{"X-Auth-Role": "admin", "X-Auth-User": "alice"}
    )
    assert status == 200
    sent = backend.received[0]["headers"]
    assert isinstance(sent, dict)
    for name in ("x-user-id", "x-auth-user", "x-auth-org", "x-auth-role", "x-auth-permission"):
        assert name not in sent, name
    record = one_audit(proxy, headers["X-Request-Id"])
    assert (record["decision"], record["route"], record["status"]) == ("allow", None, 200)
    # Matched routes are still enforced.
    status, headers, text = await get(proxy, "/api/org/billing", "sue")
    assert_error(
        status,
        headers,
        text,
        expect_status=403,
        reason="missing_permission",
        permission="billing:read",
    )
    assert len(backend.received) == 1


# --- /_rbac/me -------------------------------------------------------------------------------


def catalogue() -> list[str]:
    data = yaml.safe_load(Path(SHIPPED_ROUTES).read_text())
    return sorted(data["permissions"])


async def me(proxy: Proxy, user: str | None, query: str = "") -> tuple[int, dict[str, Any], str]:
    status, headers, text = await get(proxy, "/_rbac/me" + query, user)
    assert NEW_REQUEST_ID.fullmatch(headers["X-Request-Id"])
    body: dict[str, Any] = json.loads(text)
    assert body.get("request_id", headers["X-Request-Id"]) == headers["X-Request-Id"]
    return status, body, headers["X-Request-Id"]


async def test_me(proxy: Proxy, backend: Backend) -> None:
    status, body, _ = await me(proxy, "alice")
    assert status == 200
    assert (body["user"], body["org"], body["role"]) == ("alice", "acme", "admin")
    assert body["permissions"] == catalogue()

    status, body, _ = await me(proxy, "sue", "?project=proj-prod")
    assert status == 200
    assert (body["user"], body["org"], body["role"]) == ("sue", "acme", "support")
    assert body["permissions"] == [
        "connected_users:manage",
        "connected_users:read",
        "executions:replay",
        "task_history:read",
    ]

    status, body, _ = await me(proxy, "carol", "?project=proj-prod")
    assert status == 200
    assert body["user"] == "carol"
    assert body["role"] is None
    assert body["permissions"] == []

    status, body, _ = await me(proxy, "carol", "?project=proj-staging")
    assert (body["role"], body["org"]) == ("developer", "acme")
    assert "workflows:deploy" in body["permissions"]
    assert "secrets:update" not in body["permissions"]

    status, body, _ = await me(proxy, "fay")
    assert status == 200
    assert body["reason"] == "plan_restricted"
    assert body["role"] is None
    assert body["permissions"] == []

    status, body, rid = await me(proxy, None)
    assert status == 401
    assert body["reason"] == "missing_credentials"
    assert body["request_id"] == rid

    assert backend.received == []  # /_rbac/me is answered by the proxy, never forwarded


async def test_rbac_me_does_not_look_up_projects_for_non_members(
    backend: Backend, start_proxy: StartProxy
) -> None:
    """Review finding: a caller with no membership must not make the proxy query project ids."""
    proxy = await start_proxy(backend.url)
    cache = proxy.server.runtime.cache
    async with aiohttp.ClientSession() as s, s.get(
        proxy.url + "/_rbac/me?project=made-up", headers={"X-User-Id": "mallory"}
    ) as r:
        body = await r.json()
    assert r.status == 200
    assert body["reason"] == "not_a_member"
    assert cache.fresh_project_org("made-up") is None  # never asked, never cached


async def test_an_unexpected_bug_is_a_json_500_with_the_request_id(
    backend: Backend, start_proxy: StartProxy
) -> None:
    """A crash in the pipeline fails closed: JSON 500, X-Request-Id, nothing forwarded."""
    proxy = await start_proxy(backend.url)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug")

    proxy.server.runtime.cache.fresh_memberships = broken  # type: ignore[method-assign]
    proxy.server.runtime.cache.memberships = broken  # type: ignore[method-assign,assignment]
    before = len(backend.received)
    async with aiohttp.ClientSession() as s, s.get(
        proxy.url + "/api/projects/proj-prod/workflows", headers={"X-User-Id": "bob"}
    ) as r:
        body = await r.json()
    assert r.status == 500
    assert body["error"] == "internal_error"
    assert body["request_id"] == r.headers["X-Request-Id"]
    assert len(backend.received) == before
