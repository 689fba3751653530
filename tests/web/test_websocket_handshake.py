"""A broken WebSocket handshake is refused before authorization or any upstream connection."""

from __future__ import annotations

import asyncio

import pytest

from tests.web.conftest import Backend, Proxy

LIVE = "/api/projects/proj-prod/task-history/live"
GOOD = [
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
]


async def _status(proxy: Proxy, method: str, headers: list[str]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
    lines = [f"{method} {LIVE} HTTP/1.1", "Host: x", "X-User-Id: sue", *headers, "", ""]
    writer.write("\r\n".join(lines).encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
    writer.close()
    return int(head.split()[1])


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("HEAD", GOOD),
        ("GET", [h for h in GOOD if not h.startswith("Sec-WebSocket-Key")]),
        ("GET", [h.replace("13", "8") if "Version" in h else h for h in GOOD]),
        ("GET", [h for h in GOOD if not h.startswith("Connection")]),
    ],
    ids=["head", "no-key", "version-8", "no-connection-upgrade"],
)
async def test_broken_handshakes_are_400_and_never_reach_the_backend(
    proxy: Proxy, backend: Backend, method: str, headers: list[str]
) -> None:
    assert await _status(proxy, method, headers) == 400
    assert backend.received == []


async def test_a_valid_handshake_is_switched(proxy: Proxy, backend: Backend) -> None:
    assert await _status(proxy, "GET", GOOD) == 101
