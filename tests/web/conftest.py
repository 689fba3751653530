"""Real-socket fixtures: the demo backend on a loopback port and proxies started in front of it."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.audit import AuditLog
from proxy.demo.app import RECEIVED, make_demo_app
from proxy.settings import Settings
from proxy.web.serve import Server, build_runtime, start

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_ROUTES = str(ROOT / "routes.yaml")
SHIPPED_MEMBERS = str(ROOT / "members.yaml")


@dataclass
class Backend:
    """A real aiohttp upstream on 127.0.0.1: the demo app, or any app a test builds."""

    app: web.Application
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def received(self) -> list[dict[str, object]]:
        """Requests the demo backend saw (only for the demo app)."""
        return self.app[RECEIVED]


@dataclass
class Proxy:
    server: Server
    audit: io.StringIO

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.server.admin_port}"

    def audit_lines(self) -> list[str]:
        return [line for line in self.audit.getvalue().splitlines() if line]


StartBackend = Callable[[web.Application], Awaitable[Backend]]
StartProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def start_backend() -> AsyncIterator[StartBackend]:
    runners: list[web.AppRunner] = []

    async def _start(app: web.Application) -> Backend:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        return Backend(app, int(port))

    yield _start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def backend(start_backend: StartBackend) -> Backend:
    """The bundled demo dashboard backend, fresh for each test."""
    return await start_backend(make_demo_app())


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    """Factory: start_proxy(upstream, admin_token=None, **Settings overrides) -> Proxy."""
    servers: list[Server] = []

    async def _start(upstream: str, admin_token: str | None = None, **overrides: Any) -> Proxy:
        settings = Settings(
            upstream=upstream,
            routes=SHIPPED_ROUTES,
            store=f"file:{SHIPPED_MEMBERS}",
            listen="127.0.0.1:0",
            admin_listen="127.0.0.1:0",
            reload_interval=0,
        )
        settings = replace(settings, **overrides)
        runtime = build_runtime(settings)
        audit = io.StringIO()
        runtime.audit = AuditLog(settings.audit, audit)
        server = await start(settings, runtime, admin_token=admin_token)
        servers.append(server)
        return Proxy(server, audit)

    yield _start
    for server in servers:
        await server.drain_and_stop()


@pytest.fixture
async def proxy(backend: Backend, start_proxy: StartProxy) -> Proxy:
    """rbac-proxy with the shipped routes.yaml and members.yaml in front of the demo backend."""
    return await start_proxy(backend.url)
