"""`--workers N`: a supervisor that runs N proxy processes on one port and one admin listener.

Each worker is `python -m proxy serve` with the same settings, binding the proxy port with
SO_REUSEPORT (the kernel spreads connections) and a private admin listener on 127.0.0.1.
The supervisor owns the public admin port: /metrics aggregates every worker through
prometheus-client's multiprocess mode, /readyz is ready when every worker is, and the admin
POSTs are fanned out to each worker so a cache invalidation reaches every cache.
SIGTERM and SIGHUP are passed on; a worker that dies is restarted and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

from aiohttp import ClientError, ClientSession, ClientTimeout, web
from prometheus_client import CollectorRegistry, Counter

from proxy.settings import Settings, env_name, parse_hostport

log = logging.getLogger("rbac_proxy.workers")

WORKER_ENV = "RBAC_PROXY_WORKER_ID"
PORT_FILE_ENV = "RBAC_PROXY_ADMIN_PORT_FILE"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_BACKOFF = 1.0  # seconds before restarting a crashed worker (no tight crash loops)


@dataclass(eq=False)
class Worker:
    index: int
    port_file: Path
    process: asyncio.subprocess.Process | None = None
    admin_port: int | None = None
    restarts: int = 0


def worker_env(settings: Settings, index: int, port_file: Path, metrics_dir: str) -> dict[str, str]:
    """The child's environment: every setting as RBAC_PROXY_*, one worker, private admin."""
    env = dict(os.environ)
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if value is not None:
            env[env_name(f.name)] = str(value)
    env[env_name("workers")] = "1"
    env[env_name("admin_listen")] = "127.0.0.1:0"
    env[WORKER_ENV] = str(index)
    env[PORT_FILE_ENV] = str(port_file)
    env[MULTIPROC_ENV] = metrics_dir
    return env


class Supervisor:
    def __init__(self, settings: Settings, admin_token: str | None) -> None:
        self.settings = settings
        self.admin_token = admin_token
        self.stopping = False
        self.workers: list[Worker] = []
        # The supervisor's own metrics (restarts) live in memory, beside the workers' files.
        self.own_registry = CollectorRegistry()
        self.tmp = Path(tempfile.mkdtemp(prefix="rbac-proxy-"))
        configured = os.environ.get(MULTIPROC_ENV)
        self.metrics_dir = Path(configured) if configured else self.tmp / "metrics"
        # A stale directory would add the last run's counters to this one's.
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True)
        os.environ[MULTIPROC_ENV] = str(self.metrics_dir)

    async def spawn(self, worker: Worker) -> None:
        with contextlib.suppress(FileNotFoundError):
            worker.port_file.unlink()
        worker.admin_port = None
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "serve",
            env=worker_env(self.settings, worker.index, worker.port_file, str(self.metrics_dir)),
        )

    async def wait_ready(self, worker: Worker, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = worker.process
            if proc is None or proc.returncode is not None:
                return False
            with contextlib.suppress(OSError, ValueError):
                worker.admin_port = int(worker.port_file.read_text())
                return True
            await asyncio.sleep(0.05)
        return False

    async def watch(self, worker: Worker, restarts: Counter) -> None:
        """Restart the worker whenever it dies, until the supervisor stops."""
        while not self.stopping:
            proc = worker.process
            assert proc is not None
            code = await proc.wait()
            if self.stopping:
                return
            _mark_dead(proc.pid)
            worker.restarts += 1
            restarts.inc()
            log.error("worker %d (pid %d) exited with %s; restarting", worker.index, proc.pid, code)
            await asyncio.sleep(RESTART_BACKOFF)
            await self.spawn(worker)
            await self.wait_ready(worker)

    def signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    async def run(self) -> int:
        restarts = Counter(
            "rbac_proxy_worker_restarts",
            "Worker processes restarted after an unexpected exit.",
            registry=self.own_registry,
        )
        self.workers = [
            Worker(i, self.tmp / f"worker-{i}.port") for i in range(self.settings.workers)
        ]
        for worker in self.workers:
            await self.spawn(worker)
        for worker in self.workers:
            if not await self.wait_ready(worker):
                self.stopping = True
                self.signal_all(signal.SIGTERM)
                await self._reap()
                print("rbac-proxy: a worker failed to start (see its error above)", file=sys.stderr)
                return 1
        admin = web.AppRunner(self._admin_app(), access_log=None)
        await admin.setup()
        host, port = parse_hostport(self.settings.admin_listen, "--admin-listen")
        try:
            await web.TCPSite(admin, host, port).start()
        except OSError as exc:
            self.stopping = True
            self.signal_all(signal.SIGTERM)
            await self._reap()
            await admin.cleanup()
            where = self.settings.admin_listen
            print(f"rbac-proxy: cannot listen on {where}: {exc}", file=sys.stderr)
            return 1
        watchers = [asyncio.create_task(self.watch(w, restarts)) for w in self.workers]
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.signal_all(signal.SIGHUP))
        log.info("supervisor: %d workers on %s", len(self.workers), self.settings.listen)
        await stop.wait()
        self.stopping = True
        self.draining = True
        self.signal_all(signal.SIGTERM)
        await self._reap()
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await admin.cleanup()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return 0

    async def _reap(self) -> None:
        grace = self.settings.shutdown_timeout + 5
        for worker in self.workers:
            proc = worker.process
            if proc is None:
                continue
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    # ------------------------------------------------------------------ admin listener

    draining = False

    def _admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_post("/admin/reload", self._fan_out)
        app.router.add_post("/admin/cache/invalidate", self._fan_out)
        return app

    async def _metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir))  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
        if b"rbac_proxy_worker_restarts_total" not in body:
            # Started without PROMETHEUS_MULTIPROC_DIR: our own counter lives in memory only.
            body += generate_latest(self.own_registry)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "workers": len(self.workers)})

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response(
                {"status": "unavailable", "problems": ["draining"]}, status=503
            )
        results = await self._ask_all("GET", "/readyz", {}, b"")
        ready = all(status == 200 for status, _ in results)
        body = {"status": "ready" if ready else "unavailable", "workers": [s for s, _ in results]}
        return web.json_response(body, status=200 if ready else 503)

    async def _fan_out(self, request: web.Request) -> web.Response:
        if self.admin_token is None:
            return web.json_response({"error": "admin API disabled"}, status=404)
        from proxy.web.admin import read_limited

        body = await read_limited(request)
        if body is None:  # never fan out a truncated body (the workers would act on it)
            return web.json_response({"error": "body too large"}, status=413)
        headers = {"Authorization": request.headers.get("Authorization", "")}
        ct = request.headers.get("Content-Type")
        if ct:
            headers["Content-Type"] = ct
        results = await self._ask_all("POST", request.path, headers, body)
        statuses = [s for s, _ in results]
        worst = max(statuses) if statuses else 503
        return web.json_response(
            {"workers": [{"status": s, "body": b} for s, b in results]}, status=worst
        )

    async def _ask_all(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> list[tuple[int, object]]:
        async def ask(session: ClientSession, worker: Worker) -> tuple[int, object]:
            if worker.admin_port is None:
                return 503, "worker starting"
            url = f"http://127.0.0.1:{worker.admin_port}{path}"
            try:
                async with session.request(method, url, headers=headers, data=body) as resp:
                    text = await resp.text()
                    return resp.status, text
            except (ClientError, OSError, TimeoutError) as exc:
                return 503, f"worker unreachable: {type(exc).__name__}"

        async with ClientSession(timeout=ClientTimeout(total=5)) as session:
            return list(await asyncio.gather(*(ask(session, w) for w in self.workers)))


def _mark_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (inflight, cache entries) from the aggregate."""
    from prometheus_client import multiprocess

    with contextlib.suppress(Exception):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def run_supervisor(settings: Settings, admin_token: str | None) -> int:
    return asyncio.run(Supervisor(settings, admin_token).run())
