"""Fixtures: the recording backend, and rbac-proxy with the shipped files in front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.security.harness import Recorder
from tests.web.conftest import Proxy, StartProxy, start_backend, start_proxy

__all__ = ["guarded", "recorder", "start_backend", "start_proxy"]


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
