"""Fixtures: the recording backend, and rbac-proxy with the shipped files in front of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping

import pytest
import uvloop

from tests.security.harness import Recorder
from tests.web.conftest import Proxy, StartProxy, start_backend, start_proxy

__all__ = ["guarded", "recorder", "start_backend", "start_proxy"]


# Tests marked `both_loops` run twice: on asyncio's own loop and on uvloop, which serve uses
# by default. Flow control (pause/resume writing, buffer limits) differs between the two.
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_loops: run on the asyncio loop and on uvloop")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.get_closest_marker("both_loops") is None:
        return {"asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    await rec.start()
    yield rec
    await rec.stop()


@pytest.fixture
async def guarded(recorder: Recorder, start_proxy: StartProxy) -> Proxy:
    """rbac-proxy (shipped routes.yaml and members.yaml, header auth) in front of the recorder."""
    return await start_proxy(recorder.url)
