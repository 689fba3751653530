"""`rbac-proxy demo`: both servers start and every printed curl behaves as its comment says."""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil

import pytest
from aiohttp import ClientSession

from proxy.web.demo import demo_curls, run_demo
from proxy.web.serve import free_port
from tests.web.conftest import SHIPPED_MEMBERS, SHIPPED_ROUTES


async def test_demo_starts_and_printed_curls_behave_as_printed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "the demo prints curl commands: install curl to test them"
    port, admin, backend = free_port(), free_port(), free_port()
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        run_demo(
            routes=SHIPPED_ROUTES,
            members=SHIPPED_MEMBERS,
            listen=f"127.0.0.1:{port}",
            admin_listen=f"127.0.0.1:{admin}",
            backend_port=backend,
            ready=ready,
            stop=stop,
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), 20)
        printed = capsys.readouterr().out
        curls = demo_curls(f"127.0.0.1:{port}")
        assert len(curls) >= 9
        for what, command in curls:
            assert command in printed
            expected = int(re.search(r"\b([2-5]\d\d)\b", what).group(1))  # type: ignore[union-attr]
            args = shlex.split(command)
            args[1:1] = ["-o", "/dev/null", "-w", "%{http_code}"]
            proc = await asyncio.create_subprocess_exec(
                *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 20)
            assert int(out) == expected, f"{what}: {command} gave {out!r}"
        async with ClientSession() as s, s.get(f"http://127.0.0.1:{admin}/readyz") as r:
            assert r.status == 200
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
