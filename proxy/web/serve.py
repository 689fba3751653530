"""Builds a Runtime from Settings and runs the proxy and admin listeners until SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field

from aiohttp import ClientSession, ClientTimeout, DummyCookieJar, TCPConnector, web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry

from proxy.audit import AuditLog
from proxy.config import PolicyHolder
from proxy.identity import Authenticator, TrustedProxies
from proxy.identity import build_authenticator as make_authenticator
from proxy.metrics import Metrics
from proxy.policy.model import PolicyError
from proxy.settings import Settings, SettingsError, parse_hostport, parse_upstream
from proxy.stores.base import PushesInvalidations, RoleStore
from proxy.stores.cache import RoleCache
from proxy.stores.file import FileStore
from proxy.web.admin import make_admin_app
from proxy.web.forward import ALWAYS_STRIPPED, HeaderPolicy, normalize
from proxy.web.handler import ProxyHandler
from proxy.web.protocol import GuardedServer, Limits
from proxy.web.runtime import Runtime
from proxy.web.upstream import UpstreamPool

log = logging.getLogger("rbac_proxy")


class _RedactBadRequests(logging.Filter):
    """aiohttp logs a malformed request with the offending header line, which may hold a
    bearer token: keep the fact and the error class, drop the text (no secrets in logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "malformed request rejected: %s (details redacted)"
            record.args = (type(exc).__name__,)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_REDACTOR = _RedactBadRequests()


class StartupError(Exception):
    """Configuration that prevents the proxy from starting; the message says what to fix."""


def build_store(settings: Settings, metrics: Metrics | None = None) -> RoleStore:
    """The role store named by --store. Network stores get a timeout and a circuit breaker."""
    spec = settings.store
    if spec.startswith("file:"):
        path = spec[len("file:") :]
        try:
            return FileStore(path)
        except OSError as exc:
            raise StartupError(
                f"--store {spec}: cannot read {path}: {exc.strerror or exc}"
            ) from None
        except PolicyError as exc:
            raise StartupError(f"--store {spec}: invalid member file:\n{exc}") from None
    inner: RoleStore
    if spec.startswith(("postgresql://", "postgres://")):
        from proxy.stores.postgres import PostgresStore

        try:
            inner = PostgresStore(
                spec, timeout=settings.store_timeout, query_file=settings.store_query_file
            )
        except (ValueError, OSError) as exc:
            raise StartupError(f"--store postgresql: {exc}") from None
    elif spec.startswith(("http://", "https://")):
        from proxy.stores.http import HttpStore

        token = None
        if settings.store_token_env:
            token = os.environ.get(settings.store_token_env)
            if not token:
                raise StartupError(f"--store-token-env: ${settings.store_token_env} is not set")
        try:
            inner = HttpStore(spec, timeout=settings.store_timeout, token=token)
        except ValueError as exc:  # the message never echoes the URL: it may hold a secret
            raise StartupError(f"--store http: {exc}") from None
    else:
        raise StartupError(
            f"--store {spec!r}: expected file:PATH, postgresql://... or http(s)://..."
        )
    from proxy.stores.guard import GuardedStore

    def observe(backend: str, seconds: float, failed: bool) -> None:
        if metrics is not None:
            metrics.store_duration.labels(backend).observe(seconds)
            if failed:
                metrics.store_errors.labels(backend).inc()

    return GuardedStore(inner, timeout=settings.store_timeout, observe=observe)


def build_authenticator(settings: Settings) -> Authenticator:
    try:
        return make_authenticator(
            settings.auth,
            trusted_proxies=settings.trusted_proxies,
            user_header=settings.user_header,
            org_header=settings.org_header,
            jwt_secret_env=settings.jwt_secret_env,
            jwt_key=settings.jwt_key,
            jwks=settings.jwks,
            jwt_issuer=settings.jwt_issuer,
            jwt_audience=settings.jwt_audience,
            jwt_leeway=settings.jwt_leeway,
            jwt_user_claim=settings.jwt_user_claim,
            jwt_org_claim=settings.jwt_org_claim,
            jwt_cookie=settings.jwt_cookie,
        )
    except (ValueError, OSError) as exc:
        raise StartupError(f"--auth {settings.auth}: {exc}") from None


def build_runtime(settings: Settings, registry: CollectorRegistry | None = None) -> Runtime:
    """Everything that can fail on bad configuration fails here, before any socket opens."""
    try:
        upstream = parse_upstream(settings.upstream)
        trusted = TrustedProxies.parse(settings.trusted_proxies)
    except (SettingsError, ValueError) as exc:
        raise StartupError(str(exc)) from None
    try:
        routes = PolicyHolder(settings.routes)
    except PolicyError as exc:
        raise StartupError(f"invalid routes file:\n{exc}") from None
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    store = build_store(settings, metrics)
    cache = RoleCache(
        store,
        ttl=settings.cache_ttl,
        negative_ttl=settings.cache_negative_ttl,
        stale_ttl=settings.cache_stale_ttl,
        maxsize=settings.cache_size,
        on_lookup=metrics.count_cache_lookup,
    )
    source = getattr(store, "inner", store)  # a GuardedStore wraps the real backend
    if isinstance(source, PushesInvalidations):
        source.on_invalidate = cache.invalidate
    authenticator = build_authenticator(settings)
    injected = (
        settings.inject_user_header,
        settings.inject_org_header,
        settings.inject_role_header,
        settings.inject_permission_header,
        settings.request_id_header,
    )
    # The identity headers are input for us, never for the backend (in jwt mode too: a client
    # copy must not look like an identity to a backend that reads them).
    stripped = {normalize(n) for n in injected} | set(ALWAYS_STRIPPED)
    stripped |= {normalize(settings.user_header), normalize(settings.org_header)}
    headers = HeaderPolicy(
        stripped=frozenset(stripped),
        user=settings.inject_user_header,
        org=settings.inject_org_header,
        role=settings.inject_role_header,
        permission=settings.inject_permission_header,
        request_id=settings.request_id_header,
    )
    metrics.config_routes.set(len(routes.policy.routes))
    now = time.time()
    for file in ("routes", "members"):
        metrics.config_last_success.labels(file).set(now)
        metrics.config_last_ok.labels(file).set(1)
    return Runtime(
        settings=settings,
        routes=routes,
        authenticator=authenticator,
        store=store,
        cache=cache,
        metrics=metrics,
        audit=AuditLog(settings.audit),
        trusted=trusted,
        headers=headers,
        upstream=upstream,
    )


def reload_all(rt: Runtime) -> dict[str, str]:
    """SIGHUP / POST /admin/reload / poll: reload routes and members; a bad file keeps the old."""
    result: dict[str, str] = {}
    try:
        changed = rt.routes.reload()
        result["routes"] = "success" if changed else "unchanged"
        if changed:
            rt.metrics.config_routes.set(len(rt.routes.policy.routes))
    except PolicyError as exc:
        log.error("routes reload failed, keeping the previous table:\n%s", exc)
        result["routes"] = "failure"
    if isinstance(rt.store, FileStore):
        try:
            changed = rt.store.reload()
            result["members"] = "success" if changed else "unchanged"
            if changed:
                rt.cache.invalidate()
        except (PolicyError, OSError) as exc:
            log.error("member file reload failed, keeping the previous members:\n%s", exc)
            result["members"] = "failure"
    for file, outcome in result.items():
        rt.metrics.config_reloads.labels(file, outcome).inc()
        rt.metrics.config_last_ok.labels(file).set(0 if outcome == "failure" else 1)
        if outcome == "success":
            rt.metrics.config_last_success.labels(file).set(time.time())
    return result


@dataclass(eq=False)
class Server:
    """A running proxy: both listeners plus background tasks. Used by serve, demo and tests."""

    runtime: Runtime
    proxy_runner: web.ServerRunner
    admin_runner: web.AppRunner
    proxy_port: int
    admin_port: int
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def drain_and_stop(self) -> None:
        """SIGTERM: readyz turns 503, listeners close, in-flight requests get time to finish."""
        rt = self.runtime
        rt.draining = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.proxy_runner.cleanup()  # closes the listener, waits up to shutdown_timeout
        await self.admin_runner.cleanup()
        rt.audit.flush()
        rt.metrics.flush()
        if rt.upstream_pool is not None:
            await rt.upstream_pool.close()
        if rt.session is not None:
            await rt.session.close()
        await rt.authenticator.close()
        await rt.store.close()


async def start(
    settings: Settings,
    runtime: Runtime | None = None,
    *,
    admin_token: str | None = None,
    reuse_port: bool = False,
) -> Server:
    """Open the upstream pool and both listeners; raise StartupError on a busy port."""
    rt = runtime if runtime is not None else build_runtime(settings)
    try:
        await rt.store.open()
    except ValueError as exc:  # reachable but misconfigured (bad query file, no schema)
        raise StartupError(f"role store: {exc}") from None
    rt.session = ClientSession(
        connector=TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30, force_close=False),
        # Only connect has a session timeout; time-to-headers is enforced per request and a
        # long body or SSE stream must not be cut (aiohttp's default is 5 minutes total).
        timeout=ClientTimeout(total=None, sock_connect=settings.connect_timeout),
        auto_decompress=False,  # the client gets the upstream's bytes unchanged
        cookie_jar=DummyCookieJar(),  # never mix cookies between callers
        skip_auto_headers=("User-Agent",),
    )
    # Plain HTTP goes through the lean pool (proxy/web/upstream.py); the session above keeps
    # WebSocket upgrades. RBAC_PROXY_UPSTREAM_CLIENT=aiohttp sends everything through the
    # session (an A/B switch for benchmarks and a fallback), read once here.
    client = os.environ.get("RBAC_PROXY_UPSTREAM_CLIENT", "lean")
    if client not in ("lean", "aiohttp"):
        await rt.session.close()
        raise StartupError(f"RBAC_PROXY_UPSTREAM_CLIENT={client!r}: expected lean or aiohttp")
    if client == "lean":
        rt.upstream_pool = UpstreamPool(rt.upstream, connect_timeout=settings.connect_timeout)
    server_log = logging.getLogger("aiohttp.server")
    if _REDACTOR not in server_log.filters:
        server_log.addFilter(_REDACTOR)
    # No aiohttp access log on the proxy port: the audit log is the per-request record.
    handler = ProxyHandler(rt)
    proxy_server = GuardedServer(
        handler,
        limits=Limits(
            header_timeout=settings.header_timeout, send_timeout=settings.send_timeout
        ),
        on_malformed=handler.malformed,
        handler_cancellation=True,
        access_log=None,
        # Idle keep-alive connections close after 75 s (aiohttp's default is an hour):
        # idle sockets are not free, and a load balancer in front keeps its own pool.
        keepalive_timeout=75,
    )
    proxy_runner = web.ServerRunner(proxy_server, shutdown_timeout=settings.shutdown_timeout)
    admin_app = make_admin_app(rt, reload=lambda: reload_all(rt), token=admin_token)
    admin_runner = web.AppRunner(admin_app, access_log=None)
    await proxy_runner.setup()
    await admin_runner.setup()
    try:
        host, port = parse_hostport(settings.listen, "--listen")
        ahost, aport = parse_hostport(settings.admin_listen, "--admin-listen")
        proxy_site = web.TCPSite(proxy_runner, host, port, reuse_port=reuse_port or None)
        await proxy_site.start()
        admin_site = web.TCPSite(admin_runner, ahost, aport, reuse_port=reuse_port or None)
        await admin_site.start()
    except OSError as exc:
        await proxy_runner.cleanup()
        await admin_runner.cleanup()
        await rt.session.close()
        if rt.upstream_pool is not None:
            await rt.upstream_pool.close()
        raise StartupError(f"cannot listen: {exc.strerror or exc}") from None
    server = Server(
        rt, proxy_runner, admin_runner, _bound_port(proxy_runner), _bound_port(admin_runner)
    )
    if settings.reload_interval > 0:
        server.tasks.append(asyncio.create_task(_watch(rt, settings.reload_interval)))
    server.tasks.append(asyncio.create_task(_gauges(rt)))
    return server


async def _watch(rt: Runtime, interval: float) -> None:
    """Poll the files' content hashes (ConfigMap symlink swaps change content, not names).

    A file is reloaded once per new content: a broken edit is reported once, not every poll.
    """
    # Start from what was loaded, not from a fresh read: an edit between loading and this
    # task's first run must not become the baseline and be missed.
    seen: dict[str, str | None] = {rt.routes.path: rt.routes.digest}
    if isinstance(rt.store, FileStore):
        seen[rt.store.path] = rt.store.digest
    paths = list(seen)
    while True:
        await asyncio.sleep(interval)
        try:
            now = {p: _digest(p) for p in paths}
            if now != seen:
                seen = now
                reload_all(rt)
        except Exception:  # the watcher must outlive any surprise; it is logged
            log.exception("config watcher error")


async def _gauges(rt: Runtime, interval: float = 1.0) -> None:
    """Publish the in-flight and cache-size gauges once a second instead of on every request
    (with --workers N the supervisor's /metrics reads what each worker last published)."""
    while True:
        rt.metrics.inflight.set(rt.inflight)
        rt.metrics.cache_entries.set(len(rt.cache))
        await asyncio.sleep(interval)


def _digest(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return None


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return 0


async def serve(settings: Settings, admin_token: str | None) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads."""
    worker = os.environ.get("RBAC_PROXY_WORKER_ID")
    server = await start(settings, admin_token=admin_token, reuse_port=worker is not None)
    rt = server.runtime
    port_file = os.environ.get("RBAC_PROXY_ADMIN_PORT_FILE")
    if port_file:
        # Tell the supervisor where this worker's private admin listener is (see workers.py).
        tmp = port_file + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(str(server.admin_port))
        os.replace(tmp, port_file)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP: %s", reload_all(rt)))
    # Everything built so far (policy, modules, cache structures) lives until exit: move it
    # out of the cyclic collector's view so per-request garbage collections stay cheap.
    gc.collect()
    gc.freeze()
    log.info(
        "rbac-proxy listening on %s (admin %s), upstream %s, %d routes",
        settings.listen,
        settings.admin_listen,
        settings.upstream,
        len(rt.routes.policy.routes),
    )
    await stop.wait()
    log.info("draining (up to %.0fs)", settings.shutdown_timeout)
    await server.drain_and_stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
