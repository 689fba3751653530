"""Regressions for the second review (hostile role store / JWKS encodings, admin body
handling, connection-guard edge cases). Real proxy, raw sockets, loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import zlib
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.security.harness import Recorder, send_raw
from tests.web.conftest import StartProxy

TOKEN = "review2-admin-token"


def _gzip(data: bytes) -> bytes:
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    return co.compress(data) + co.flush()


@contextlib.asynccontextmanager
async def raw_store(answer: bytes, seen: list[bytes]) -> AsyncIterator[str]:
    """An HTTP role store that records each request head and answers `answer` verbatim."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            while True:
                seen.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(answer)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/base"
    finally:
        server.close()


# --- 1. a compressed store answer must not be inflated past the 1 MiB limit ----------------


async def test_http_store_refuses_a_gzip_answer_instead_of_inflating_it(
    recorder: Recorder, start_proxy: StartProxy
) -> None:
    # ~200 KB on the wire, 64 MiB inflated: before the fix aiohttp inflated it in one piece
    # before the 1 MiB check ran (hundreds of MB of RSS, the event loop blocked for seconds).
    inflated = b'{"user":"bob","memberships":[],"pad":"' + b"a" * (64 << 20) + b'"}'
    wire = _gzip(inflated)
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\n\r\n" % len(wire)
    ) + wire
    seen: list[bytes] = []
    async with raw_store(answer, seen) as url:
        proxy = await start_proxy(recorder.url, store=url, store_timeout=5.0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        reply = await send_raw(
            proxy.server.proxy_port,
            b"GET /api/org/billing HTTP/1.1\r\nHost: a\r\nX-User-Id: bob\r\n"
            b"Connection: close\r\n\r\n",
            limit=10.0,
        )
        elapsed = loop.time() - t0
    assert reply.status == 503  # a store error: fail closed
    assert elapsed < 1.0, (
        f"store answer took {elapsed:.2f}s to refuse (was it inflated?)"
    )
    assert seen and b"accept-encoding: identity" in seen[0].lower()


async def test_http_store_still_accepts_a_plain_answer(
    recorder: Recorder, start_proxy: StartProxy
) -> None:
    body = json.dumps(
        {
            "user": "bob",
            "memberships": [{"org": "acme", "plan": "enterprise", "role": "admin"}],
        }
    ).encode()
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    seen: list[bytes] = []
    async with raw_store(answer, seen) as url:
        proxy = await start_proxy(recorder.url, store=url)
        reply = await send_raw(
            proxy.server.proxy_port,
            b"GET /api/org/billing HTTP/1.1\r\nHost: a\r\nX-User-Id: bob\r\n"
            b"Connection: close\r\n\r\n",
        )
    assert reply.status == 200


@pytest.mark.parametrize(
    ("user", "segment"),
    [
        ("..", b"/base/members/%2E%2E "),
        ("x/../../admin", b"/base/members/x%2F..%2F..%2Fadmin "),
        ("%2F", b"/base/members/%252F "),
        ("a\\b", b"/base/members/a%5Cb "),
    ],
)
async def test_http_store_lookup_url_is_one_encoded_segment(
    recorder: Recorder, start_proxy: StartProxy, user: str, segment: bytes
) -> None:
    seen: list[bytes] = []
    async with raw_store(
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", seen
    ) as url:
        proxy = await start_proxy(recorder.url, store=url)
        await send_raw(
            proxy.server.proxy_port,
            b"GET /api/org/billing HTTP/1.1\r\nHost: a\r\nX-User-Id: "
            + user.encode()
            + b"\r\nConnection: close\r\n\r\n",
        )
    assert seen and seen[0].startswith(b"GET " + segment)


# --- 2. admin: a body is read whole, bounded, and never acted on when truncated ------------


async def _invalidate(url: str, data: bytes) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url + "/admin/cache/invalidate",
            data=data,
            headers={
                "Authorization": f"Bearer {TOKEN}",
                "Content-Type": "application/json",
            },
        ) as r,
    ):
        return r.status, await r.text()


async def test_admin_invalidate_refuses_an_oversized_body_instead_of_truncating_it(
    recorder: Recorder, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(recorder.url, admin_token=TOKEN)
    # 64 KiB of whitespace, then a one-user invalidation: read truncated, it was `{}` and
    # dropped every user's entries.
    status, text = await _invalidate(
        proxy.admin_url, b" " * (64 * 1024) + b'{"user": "bob"}'
    )
    assert status == 413, text
    assert '"*"' not in text


@pytest.mark.parametrize(
    "data", [b"[" * 50_000, b'{"user":' * 8_000], ids=["deep-array", "deep-object"]
)
async def test_admin_invalidate_deeply_nested_json_is_a_400_not_a_500(
    recorder: Recorder, start_proxy: StartProxy, data: bytes
) -> None:
    proxy = await start_proxy(recorder.url, admin_token=TOKEN)
    status, _ = await _invalidate(proxy.admin_url, data)
    assert status == 400


async def test_admin_invalidate_reads_a_body_that_arrives_in_pieces(
    recorder: Recorder, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(recorder.url, admin_token=TOKEN)
    body = b'{"user": "bob"}'
    head = (
        b"POST /admin/cache/invalidate HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % len(body)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.admin_port)
    try:
        writer.write(head + body[:8])
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(body[8:])
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert b'"invalidated": "bob"' in data


async def test_admin_invalidate_log_line_cannot_be_forged(
    recorder: Recorder, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await start_proxy(recorder.url, admin_token=TOKEN)
    with caplog.at_level(logging.INFO, logger="rbac_proxy.admin"):
        status, _ = await _invalidate(
            proxy.admin_url,
            json.dumps({"user": "bob\nrbac_proxy.admin forged"}).encode(),
        )
    assert status == 200
    messages = [r.getMessage() for r in caplog.records if r.name == "rbac_proxy.admin"]
    assert messages and all("\n" not in m for m in messages)


# --- 3. the connection guard: evasions that held up, kept as regressions -------------------


async def _trickle_and_read(port: int, first: bytes, byte: bytes) -> bytes:
    """Send `first`, then one `byte` every 0.1 s for up to 3 s; everything the proxy sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()

    async def read() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received.extend(chunk)

    reading = asyncio.create_task(read())
    try:
        writer.write(first)
        for _ in range(30):
            await asyncio.sleep(0.1)
            if reading.done():
                break
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.write(byte)
        await asyncio.wait_for(reading, 5)
    finally:
        reading.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return bytes(received)


async def test_head_deadline_applies_to_a_head_pipelined_behind_a_complete_request(
    recorder: Recorder, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(recorder.url, header_timeout=0.5)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    data = await _trickle_and_read(
        proxy.server.proxy_port,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /heal",
        b"x",
    )
    assert b"HTTP/1.1 200" in data and b"HTTP/1.1 408" in data
    assert (
        loop.time() - t0 < 2.5
    )  # cut by the head deadline, not by the 3 s trickle ending


async def test_head_deadline_applies_after_a_refused_upgrade(
    recorder: Recorder, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(recorder.url, header_timeout=0.5)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    data = await _trickle_and_read(
        proxy.server.proxy_port,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
        b"G",
    )
    assert data.startswith(b"HTTP/1.1 400")
    assert loop.time() - t0 < 2.5  # the connection did not stay open for the trickle
