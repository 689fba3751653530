"""`serve --workers 2` as real processes: shared port, aggregated metrics, restart, signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession, TCPConnector
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from tests.web.conftest import SHIPPED_MEMBERS, SHIPPED_ROUTES, Backend

ROUTE = "/api/projects/{project_id}/workflows"
PATH = "/api/projects/proj-prod/workflows"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Workers:
    def __init__(
        self, proc: asyncio.subprocess.Process, port: int, admin: int, metrics: Path, routes: Path
    ) -> None:
        self.routes = routes
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.admin = f"http://127.0.0.1:{admin}"
        self.metrics_dir = metrics

    async def metric(self, session: ClientSession, name: str, **labels: str) -> float:
        async with session.get(self.admin + "/metrics") as resp:
            text = await resp.text()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                wanted = all(sample.labels.get(k) == v for k, v in labels.items())
                if sample.name == name and wanted:
                    total += sample.value
        return total

    def requests_per_pid(self) -> dict[int, float]:
        """Each worker writes its counters to counter_<pid>.db: read them one by one."""
        per_pid: dict[int, float] = {}
        for path in self.metrics_dir.glob("counter_*.db"):
            pid = int(path.stem.split("_")[1])
            values = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
            for key, value, *_rest in values:
                name = json.loads(key)[1]  # [family, sample name, labels, help]
                if name == "rbac_proxy_requests_total":
                    per_pid[pid] = per_pid.get(pid, 0.0) + value
        return per_pid


@pytest.fixture
async def workers(backend: Backend, tmp_path: Path) -> AsyncIterator[Workers]:
    port, admin = _free_port(), _free_port()
    metrics = tmp_path / "metrics"
    routes = tmp_path / "routes.yaml"
    # Without its tests: the SIGHUP test edits a role in a way the shipped cases would refuse.
    routes.write_text(Path(SHIPPED_ROUTES).read_text().split("\ntests:", 1)[0] + "\n")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(metrics), RBAC_PROXY_ADMIN_TOKEN="t0k")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve",
        "--upstream", backend.url,
        "--routes", str(routes),
        "--reload-interval", "0",
        "--store", f"file:{SHIPPED_MEMBERS}",
        "--listen", f"127.0.0.1:{port}",
        "--admin-listen", f"127.0.0.1:{admin}",
        "--workers", "2",
        "--audit", "off",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    w = Workers(proc, port, admin, metrics, routes)
    async with ClientSession() as session:
        for _ in range(200):  # bounded wait for readiness (≤ 20 s)
            try:
                async with session.get(w.admin + "/readyz") as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            await asyncio.sleep(0.1)
        else:
            proc.kill()
            pytest.fail("workers never became ready")
    try:
        yield w
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 25)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _burst(url: str, n: int) -> list[int]:
    """n requests, each on a new connection so the kernel can pick either worker."""
    statuses: list[int] = []
    async with ClientSession(connector=TCPConnector(force_close=True)) as session:
        for _ in range(n):
            async with session.get(url + PATH, headers={"X-User-Id": "bob"}) as resp:
                await resp.read()
                statuses.append(resp.status)
    return statuses


async def test_requests_spread_and_metrics_aggregate(workers: Workers) -> None:
    statuses = await _burst(workers.url, 200)
    assert statuses == [200] * 200
    per_pid = workers.requests_per_pid()
    assert len([pid for pid, count in per_pid.items() if count > 0]) == 2, per_pid
    async with ClientSession() as session:
        total = await workers.metric(
            session, "rbac_proxy_requests_total", route=ROUTE, reason="allowed"
        )
        ready = await session.get(workers.admin + "/readyz")
        assert ready.status == 200
        assert (await ready.json())["workers"] == [200, 200]
    assert total == 200


async def test_crashed_worker_is_restarted_and_counted(workers: Workers) -> None:
    pids = _child_pids(workers.proc.pid)
    assert len(pids) == 2, pids
    os.kill(pids[0], signal.SIGKILL)
    async with ClientSession() as session:
        for _ in range(100):  # ≤ 10 s for the restart
            restarts = await workers.metric(session, "rbac_proxy_worker_restarts_total")
            if restarts == 1 and len(_child_pids(workers.proc.pid)) == 2:
                break
            await asyncio.sleep(0.1)
        assert restarts == 1
    assert pids[0] not in _child_pids(workers.proc.pid)
    assert await _burst(workers.url, 20) == [200] * 20


async def test_invalidate_reaches_every_worker_and_sigterm_exits(workers: Workers) -> None:
    async with ClientSession() as session:
        resp = await session.post(
            workers.admin + "/admin/cache/invalidate",
            json={"user": "bob"},
            headers={"Authorization": "Bearer t0k"},
        )
        body = await resp.json()
        assert resp.status == 200
        assert [w["status"] for w in body["workers"]] == [200, 200]
    workers.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(workers.proc.wait(), 25) == 0


def _child_pids(parent: int) -> list[int]:
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent pid; the command name (field 2) may contain spaces.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent:
            out.append(int(entry.name))
    return sorted(out)


async def test_sighup_reaches_every_worker(workers: Workers) -> None:
    assert await _burst(workers.url, 20) == [200] * 20
    # Developers lose workflows:read: bob's request must now be denied by BOTH workers.
    text = workers.routes.read_text()
    edited = text.replace('- "workflows:*"', "- workflows:create", 1)
    assert edited != text
    workers.routes.write_text(edited)
    workers.proc.send_signal(signal.SIGHUP)
    statuses: list[int] = []
    for _ in range(50):  # ≤ ~5 s until both workers reloaded
        statuses = await _burst(workers.url, 20)
        if statuses == [403] * 20:
            break
        await asyncio.sleep(0.1)
    assert statuses == [403] * 20
