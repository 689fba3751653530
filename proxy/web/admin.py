"""The admin listener: metrics, probes, reload and cache invalidation (SPEC §9)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.policy.model import PolicyError
from proxy.stores.file import FileStore
from proxy.web.runtime import Runtime

log = logging.getLogger("rbac_proxy.admin")

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
RELOAD = web.AppKey[Callable[[], dict[str, str]]]("reload")
TOKEN: web.AppKey[str | None] = web.AppKey("token", str)
METRICS_TEXT = web.AppKey[Callable[[], bytes]]("metrics_text")
MAX_ADMIN_BODY = 64 * 1024
READY_PING_TTL = 1.0  # seconds a role-store ping answers /readyz


class StorePing:
    """The store ping behind /readyz, at most one per READY_PING_TTL: the probe is
    unauthenticated, and each call must not become a store round trip (second review)."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._lock = asyncio.Lock()
        self._at = float("-inf")
        self._problem: str | None = None

    async def problem(self) -> str | None:
        async with self._lock:  # concurrent probes share one ping
            now = asyncio.get_running_loop().time()
            if now - self._at >= READY_PING_TTL:
                try:
                    await self._rt.store.ping()
                    self._problem = None
                except Exception as exc:  # any failure means "not ready"; the reason is reported
                    self._problem = f"role store unreachable: {type(exc).__name__}"
                self._at = asyncio.get_running_loop().time()
            return self._problem


PING = web.AppKey("ping", StorePing)


def make_admin_app(
    runtime: Runtime,
    *,
    reload: Callable[[], dict[str, str]],
    token: str | None,
    metrics_text: Callable[[], bytes] | None = None,
) -> web.Application:
    app = web.Application()
    app[RUNTIME] = runtime
    app[PING] = StorePing(runtime)
    app[RELOAD] = reload
    app[TOKEN] = token or None
    app[METRICS_TEXT] = metrics_text or (lambda: generate_latest(runtime.metrics.registry))
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_post("/admin/reload", _reload)
    app.router.add_post("/admin/cache/invalidate", _invalidate)
    return app


async def _metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    rt.metrics.cache_entries.set(len(rt.cache))
    rt.metrics.inflight.set(rt.inflight)
    resp = web.Response(body=request.app[METRICS_TEXT]())
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    problems: list[str] = []
    if rt.draining:
        problems.append("draining")
    store_problem = await request.app[PING].problem()
    if store_problem is not None:
        problems.append(store_problem)
    if problems:
        return web.json_response({"status": "unavailable", "problems": problems}, status=503)
    return web.json_response({"status": "ready", "routes": len(rt.routes.policy.routes)})


def _authorized(request: web.Request) -> web.Response | None:
    token = request.app[TOKEN]
    if token is None:
        # Off unless RBAC_PROXY_ADMIN_TOKEN is set (SPEC §9).
        return web.json_response({"error": "admin API disabled"}, status=404)
    sent = request.headers.get("Authorization", "")
    expected = f"Bearer {token}"
    # Constant-time comparison: the admin token must not leak through timing.
    # surrogateescape: a raw non-UTF-8 byte in the header must be a 401, never a 500.
    if not hmac.compare_digest(
        sent.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    ):
        return web.json_response(
            {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"}
        )
    return None


async def _reload(request: web.Request) -> web.Response:
    denied = _authorized(request)
    if denied is not None:
        return denied
    result = request.app[RELOAD]()
    status = 200 if all(v != "failure" for v in result.values()) else 422
    return web.json_response(result, status=status)


async def _invalidate(request: web.Request) -> web.Response:
    denied = _authorized(request)
    if denied is not None:
        return denied
    raw = await read_limited(request)
    if raw is None:
        # Never act on a truncated body: 64 KiB of spaces before {"user": "bob"} read as {}
        # and dropped every user's entries.
        return web.json_response({"error": "body too large"}, status=413)
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays or objects
        return web.json_response({"error": "body must be JSON"}, status=400)
    if not isinstance(body, dict) or not set(body) <= {"user"}:
        return web.json_response({"error": 'expected {"user": "ID"} or {}'}, status=400)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        return web.json_response({"error": "user must be a string"}, status=400)
    rt = request.app[RUNTIME]
    # A member file edit invalidates everyone it touched, not only the user named.
    scope = None if _reread_member_file(rt) else user
    dropped = rt.cache.invalidate(scope)
    # %r: the id comes from the request body; a newline must not forge a log line.
    log.info("cache invalidated: user=%r dropped=%d", scope or "*", dropped)
    return web.json_response({"invalidated": scope or "*", "entries": dropped})


async def read_limited(request: web.Request, limit: int = MAX_ADMIN_BODY) -> bytes | None:
    """The whole body, or None when it is longer than `limit` (one read() may return only
    the bytes that have arrived so far: read until EOF)."""
    raw = bytearray()
    while chunk := await request.content.read(limit + 1 - len(raw)):
        raw += chunk
        if len(raw) > limit:
            return None
    return bytes(raw)


def _reread_member_file(rt: Runtime) -> bool:
    """For `--store file:`, the file is the store: re-read it so an edit applies now.

    Without this, invalidating only re-asked the in-memory copy, and an edited members.yaml
    waited for the next watcher poll (or forever with --reload-interval 0). A bad file keeps
    the previous members, as every reload does. True when new members were loaded.
    """
    if not isinstance(rt.store, FileStore):
        return False
    try:
        changed = rt.store.reload()
    except (PolicyError, OSError) as exc:
        log.error("member file reload failed, keeping the previous members:\n%s", exc)
        rt.metrics.config_reloads.labels("members", "failure").inc()
        return False
    if changed:
        rt.metrics.config_reloads.labels("members", "success").inc()
        rt.metrics.config_last_success.labels("members").set(time.time())
    return changed
