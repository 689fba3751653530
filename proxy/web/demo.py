"""`rbac-proxy demo`: the demo dashboard backend behind the proxy, with ready-to-paste curls."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web

from proxy.demo.app import make_demo_app
from proxy.settings import Settings, parse_hostport
from proxy.web.serve import StartupError, start

DEMO_ADMIN_TOKEN = "demo-admin-token"  # noqa: S105 - local demo only; serve reads the env var


def demo_curls(proxy: str) -> list[tuple[str, str]]:
    """(what it shows, command) pairs printed by the demo; tests run them."""
    base = f"http://{proxy}"
    p = f"{base}/api/projects"
    return [
        ("alice (Organization Admin) reads billing: 200",
         f"curl -s -H 'X-User-Id: alice' {base}/api/org/billing"),
        ("bob (Developer) reads billing: 403 missing_permission",
         f"curl -s -H 'X-User-Id: bob' {base}/api/org/billing"),
        ("bob deploys a workflow: 200",
         f"curl -s -X POST -H 'X-User-Id: bob' {p}/proj-prod/workflows/wf-sync-contacts/deploy"),
        ("sue (Support) reads task history: 200",
         f"curl -s -H 'X-User-Id: sue' {p}/proj-prod/task-history"),
        ("sue reads workflows: 403 missing_permission",
         f"curl -s -H 'X-User-Id: sue' {p}/proj-prod/workflows"),
        ("carol (Set by Project: developer on proj-staging) on proj-staging: 200",
         f"curl -s -H 'X-User-Id: carol' {p}/proj-staging/workflows"),
        ("carol on proj-prod: 403 missing_permission",
         f"curl -s -H 'X-User-Id: carol' {p}/proj-prod/workflows"),
        ("fay (Support on plan pro): 403 plan_restricted",
         f"curl -s -H 'X-User-Id: fay' {p}/sc-main/task-history"),
        ("no identity: 401 missing_credentials",
         f"curl -s {base}/api/org"),
        ("what may sue do on proj-prod? (for the UI): 200",
         f"curl -s -H 'X-User-Id: sue' '{base}/_rbac/me?project=proj-prod'"),
    ]  # fmt: skip


async def run_demo(
    *,
    routes: str,
    members: str,
    listen: str = "127.0.0.1:8080",
    admin_listen: str = "127.0.0.1:9090",
    backend_port: int = 8081,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    backend = web.AppRunner(make_demo_app(), access_log=None)
    await backend.setup()
    try:
        await web.TCPSite(backend, "127.0.0.1", backend_port).start()
    except OSError as exc:
        await backend.cleanup()
        raise StartupError(
            f"demo backend cannot listen on 127.0.0.1:{backend_port}: {exc}"
        ) from None
    settings = Settings(
        upstream=f"http://127.0.0.1:{backend_port}",
        routes=routes,
        store=f"file:{members}",
        listen=listen,
        admin_listen=admin_listen,
        audit="all",
    )
    try:
        server = await start(settings, admin_token=DEMO_ADMIN_TOKEN)
    except StartupError:
        await backend.cleanup()
        raise
    host, _ = parse_hostport(listen, "--listen")
    address = f"{host}:{server.proxy_port}"
    ahost, _ = parse_hostport(admin_listen, "--admin-listen")
    print(f"demo backend  http://127.0.0.1:{backend_port}  (no authorization of its own)")
    print(f"rbac-proxy    http://{address}  (routes {routes}, members {members})")
    print(f"admin         http://{ahost}:{server.admin_port}/metrics  /readyz  /healthz")
    print("Audit lines (JSON) follow on stdout. Try, in another terminal:\n")
    for what, cmd in demo_curls(address):
        print(f"# {what}\n{cmd}\n")
    print("Ctrl-C stops the demo.", flush=True)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await server.drain_and_stop()
        await backend.cleanup()
