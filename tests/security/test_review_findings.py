"""Regressions for the fresh-eyes review (response rewriting, HTTP/1.0 framing, upload timeout,
502 text, WebSocket handshake checks, draining). Real proxy, raw sockets, loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest

from tests.security.harness import Recorder, request, send_raw
from tests.web.conftest import Proxy, StartProxy

WS_ROUTE = "/api/projects/proj-prod/task-history/live"


@contextlib.asynccontextmanager
async def scripted(answer: bytes) -> AsyncIterator[str]:
    """A backend that reads one request head per connection and writes `answer` verbatim."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The proxy may hang up first, and teardown cancels the linger: neither is a failure.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            if b"Connection: close" not in answer:  # a close-delimited body ends at close
                await asyncio.sleep(0.5)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


@pytest.fixture(params=["lean", "aiohttp"])
def client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("RBAC_PROXY_UPSTREAM_CLIENT", request.param)
    return str(request.param)


# --- 1. response header bytes are relayed exactly or refused, never rewritten --------------


@pytest.mark.parametrize(
    ("line", "forbidden"),
    [
        (b"Location: /\xff/evil.example/login", b"Location: //evil.example"),
        (b"Location: https://dash.example\xc0@evil.example/", b"dash.example@evil.example"),
    ],
)
async def test_invalid_utf8_in_a_response_header_is_not_silently_dropped(
    client: str, line: bytes, forbidden: bytes, start_proxy: StartProxy
) -> None:
    answer = b"HTTP/1.1 302 Found\r\n" + line + b"\r\nContent-Length: 0\r\n\r\n"
    async with scripted(answer) as url:
        proxy = await start_proxy(url)
        reply = await send_raw(proxy.server.proxy_port, request("/api/org", user="alice"))
    assert forbidden not in reply.data
    assert reply.status == 502


async def test_a_control_byte_in_a_response_header_is_a_502_not_a_500(
    client: str, start_proxy: StartProxy
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 2\r\n\r\nok"
    async with scripted(answer) as url:
        proxy = await start_proxy(url)
        reply = await send_raw(proxy.server.proxy_port, request("/api/org", user="alice"))
    assert reply.status == 502
    audit = json.loads(proxy.audit_lines()[-1])
    assert audit["status"] == 502


# --- 2. HTTP/1.0 clients and unframed upstream bodies -------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nok",
    ],
)
async def test_http10_client_gets_a_close_delimited_body_not_a_500(
    client: str, answer: bytes, start_proxy: StartProxy
) -> None:
    async with scripted(answer) as url:
        proxy = await start_proxy(url)
        reply = await send_raw(
            proxy.server.proxy_port,
            b"GET /api/org HTTP/1.0\r\nHost: dash.example\r\nX-User-Id: alice\r\n\r\n",
        )
    assert reply.status == 200
    assert reply.closed
    assert reply.data.endswith(b"\r\n\r\nok")


# --- 3. --upstream-timeout is time to response headers, not upload time ------------------


async def test_a_slow_upload_is_not_cut_by_the_upstream_timeout(
    client: str, start_proxy: StartProxy, recorder: Recorder
) -> None:
    proxy = await start_proxy(recorder.url, upstream_timeout=1.0)
    body = b"x" * 40
    raw = request(
        "/api/projects/proj-prod/task-history/e1/replay", method="POST", user="sue", body=body
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
    try:
        writer.write(raw[: -len(body)])
        for i in range(4):  # 2 s of upload, twice the upstream timeout
            writer.write(body[i * 10 : (i + 1) * 10])
            await writer.drain()
            await asyncio.sleep(0.5)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 ")
    assert [r.body for r in recorder.requests] == [body]


# --- 4. the 502 never quotes the upstream's bytes ------------------------------------------


async def test_a_502_does_not_echo_upstream_header_text(
    client: str, start_proxy: StartProxy
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nAuthorization : Bearer eyJSECRET\r\nContent-Length: 2\r\n\r\nok"
    async with scripted(answer) as url:
        proxy = await start_proxy(url)
        reply = await send_raw(proxy.server.proxy_port, request("/api/org", user="alice"))
    assert reply.status == 502
    assert b"SECRET" not in reply.data


# --- 5. WebSocket handshakes the proxy cannot complete are refused before going upstream ---


def handshake(key: bytes = b"dGhlIHNhbXBsZSBub25jZQ==", extra: bytes = b"") -> bytes:
    return (
        b"GET " + WS_ROUTE.encode() + b" HTTP/1.1\r\nHost: dash.example\r\nX-User-Id: sue\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\n" + extra + b"\r\n"
    )


@pytest.mark.parametrize(
    "raw",
    [
        handshake(key=b"abc"),
        handshake(key=b"!!!!!!!!!!!!!!!!!!!!!!=="),
        handshake(key=b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),  # 32 bytes
        handshake(extra=b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n"),
        handshake(extra=b"Sec-WebSocket-Version: 8\r\n"),
        handshake(extra=b"Content-Length: 5\r\n") + b"hello",
    ],
)
async def test_broken_websocket_handshake_is_a_400_and_never_reaches_the_backend(
    raw: bytes, guarded: Proxy, recorder: Recorder
) -> None:
    reply = await send_raw(guarded.server.proxy_port, raw)
    assert reply.status == 400
    assert recorder.requests == []


# --- 6. draining: Connection: close means close ---------------------------------------------


async def test_draining_closes_the_connection_it_says_it_closes(
    guarded: Proxy, recorder: Recorder
) -> None:
    server = guarded.server
    server.runtime.draining = True
    try:
        one = request("/api/org", user="alice", close=False)
        reply = await send_raw(server.proxy_port, one + one, quiet=1.0)
    finally:
        server.runtime.draining = False
    assert reply.statuses == [503]
    assert reply.closed
    assert recorder.requests == []


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 000 Weird", b"HTTP/1.1 099 Low"])
async def test_an_invalid_upstream_status_code_is_a_502(
    status_line: bytes, start_proxy: StartProxy
) -> None:
    """RFC 9110 §15: 1xx-5xx only; the lean client used to relay "0 Weird" as sent."""
    async with scripted(status_line + b"\r\nContent-Length: 0\r\n\r\n") as url:
        proxy = await start_proxy(url)
        reply = await send_raw(proxy.server.proxy_port, request("/api/org", user="alice"))
    assert reply.status == 502
