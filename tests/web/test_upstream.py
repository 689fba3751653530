"""The lean upstream client against raw loopback servers: framing, reuse, retries and limits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import ClientSession, web
from multidict import CIMultiDict
from yarl import URL

from proxy.web.serve import StartupError, free_port
from proxy.web.upstream import (
    MAX_HEAD,
    BodyBroken,
    UpstreamFailure,
    UpstreamPool,
    UpstreamResponse,
    request_head,
)
from tests.web.conftest import StartBackend, StartProxy

WAIT = 10.0  # bound for "eventually"; never a speed assertion
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# One connection's script: (reader, writer) -> None; it may serve several requests.
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Raw:
    """A raw upstream: connection n runs scripts[min(n, last)]; counts connections."""

    scripts: list[Script]
    port: int = 0
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        script = self.scripts[min(self.connections, len(self.scripts) - 1)]
        self.connections += 1
        try:
            async with asyncio.timeout(WAIT):
                await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()

    async def head(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        return head


@pytest.fixture
async def raw() -> AsyncIterator[Callable[..., Awaitable[Raw]]]:
    servers: list[asyncio.Server] = []

    async def _start(*scripts: Script) -> Raw:
        state = Raw(list(scripts))
        server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
        state.port = int(server.sockets[0].getsockname()[1])
        servers.append(server)
        return state

    yield _start
    for server in servers:
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()


def answer(*responses: bytes) -> Callable[[Raw], Script]:
    """A script that answers each incoming request head with the next response, then closes."""

    def make(state: Raw) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for response in responses:
                await state.head(reader)
                writer.write(response)
                await writer.drain()

        return script

    return make


async def start(raw: Callable[..., Awaitable[Raw]], *makers: Callable[[Raw], Script]) -> Raw:
    state = await raw()
    state.scripts = [make(state) for make in makers]
    return state


def pool_for(state: Raw, max_idle: int = 256) -> UpstreamPool:
    url = URL(f"http://127.0.0.1:{state.port}")
    return UpstreamPool(url, connect_timeout=5.0, max_idle=max_idle)


def get_head(path: str = "/x", method: str = "GET") -> bytes:
    return request_head(method, path, CIMultiDict({"Host": "up"}), "up", chunked=False)


async def fetch(
    pool: UpstreamPool, method: str = "GET", *, body: list[bytes] | None = None
) -> tuple[UpstreamResponse, bytes]:
    async def chunks() -> AsyncIterator[bytes]:
        for chunk in body or ():
            yield chunk

    head = request_head(method, "/x", CIMultiDict({"Host": "up"}), "up", chunked=body is not None)
    response = await pool.request(
        method, head, chunks() if body is not None else None, chunked=body is not None, timeout=5
    )
    data = b""
    while chunk := await response.body.readany():
        data += chunk
    response.release()
    return response, data


# --- framing --------------------------------------------------------------------------------


async def test_chunked_with_extensions_and_trailers_is_read_and_the_connection_reused(
    raw: Callable[..., Awaitable[Raw]],
) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n6;x\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    state = await start(raw, answer(chunked, OK))
    pool = pool_for(state)
    try:
        response, data = await fetch(pool)
        assert (response.status, data) == (200, b"hello world")
        assert pool.idle == 1
        response, data = await fetch(pool)
        assert data == b"ok"
        assert state.connections == 1  # the second request rode the same connection
    finally:
        await pool.close()


async def test_close_delimited_body_is_read_to_eof_and_not_reused(
    raw: Callable[..., Awaitable[Raw]],
) -> None:
    state = await start(raw, answer(b"HTTP/1.1 200 OK\r\n\r\nuntil the end"))
    pool = pool_for(state)
    try:
        _response, data = await fetch(pool)
        assert data == b"until the end"
        assert pool.idle == 0
    finally:
        await pool.close()


@pytest.mark.parametrize(
    "response",
    [
        # RFC 9112 §6.1: both framings is a smuggling signature, never guessed at.
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk",
        b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
    ids=["cl-and-te", "two-lengths", "negative-length", "unrequested-101", "garbage"],
)
async def test_ambiguous_or_malformed_responses_are_refused(
    raw: Callable[..., Awaitable[Raw]], response: bytes
) -> None:
    state = await start(raw, answer(response))
    pool = pool_for(state)
    try:
        with pytest.raises(UpstreamFailure) as caught:
            await fetch(pool)
        assert caught.value.kind == "connect"
        assert pool.idle == 0
    finally:
        await pool.close()


async def test_interim_responses_are_skipped(raw: Callable[..., Awaitable[Raw]]) -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + OK
    )
    state = await start(raw, answer(interim))
    pool = pool_for(state)
    try:
        response, data = await fetch(pool)
        assert (response.status, data) == (200, b"ok")
        assert "Link" not in response.headers
    finally:
        await pool.close()


async def test_header_section_over_64_kib_is_refused_and_under_is_fine(
    raw: Callable[..., Awaitable[Raw]],
) -> None:
    def with_headers(total: int) -> bytes:
        lines = b"".join(b"X-Big-%d: %s\r\n" % (i, b"v" * 1000) for i in range(total // 1000))
        return b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 2\r\n\r\nok"

    state = await start(raw, answer(with_headers(MAX_HEAD - 4096), with_headers(MAX_HEAD + 2048)))
    pool = pool_for(state)
    try:
        response, data = await fetch(pool)
        assert data == b"ok"
        assert len(response.headers) > 50
        with pytest.raises(UpstreamFailure):
            await fetch(pool)
    finally:
        await pool.close()


async def test_header_section_that_never_ends_is_refused(
    raw: Callable[..., Awaitable[Raw]],
) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(MAX_HEAD // 100 + 10):  # bounded: just past the limit
            writer.write(b"X-H-%d: %s\r\n" % (i, b"v" * 90))
            await writer.drain()
        await reader.read()  # until the client hangs up

    state = await raw(endless)
    pool = pool_for(state)
    try:
        with pytest.raises(UpstreamFailure):
            await fetch(pool)
    finally:
        await pool.close()


async def test_truncated_body_raises_body_broken(raw: Callable[..., Awaitable[Raw]]) -> None:
    state = await start(raw, answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort"))
    pool = pool_for(state)
    try:
        with pytest.raises(BodyBroken):
            await fetch(pool)
        assert pool.idle == 0
    finally:
        await pool.close()


async def test_head_response_has_no_body_and_its_connection_is_not_reused(
    raw: Callable[..., Awaitable[Raw]],
) -> None:
    """Review finding: a backend that sends a body after a HEAD head must not poison the next
    caller's response, so a HEAD exchange never returns its connection to the pool."""
    def head_then_late_body(state: Raw) -> Script:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await state.head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)  # then, wrongly, a body: would poison a reused connection
            writer.write(b"POISON")
            await writer.drain()

        return script

    state = await start(raw, head_then_late_body, answer(OK))
    pool = pool_for(state)
    try:
        response, data = await fetch(pool, "HEAD")
        assert (response.status, data) == (200, b"")
        assert response.headers["Content-Length"] == "6"
        _response, data = await fetch(pool)
        assert data == b"ok"
        assert state.connections == 2  # the HEAD connection was dropped, not reused
    finally:
        await pool.close()


# --- connection reuse and retries -----------------------------------------------------------


def close_on_next_request(state: Raw) -> Script:
    """Answers one request keeping the connection alive, then hangs up on the next one."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await state.head(reader)
        writer.write(OK)
        await writer.drain()
        await state.head(reader)  # the second request arrives, and we close unanswered

    return script


def refuse_every_request(state: Raw) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await state.head(reader)

    return script


async def test_stale_kept_alive_connection_is_retried_once_for_a_bodiless_get(
    raw: Callable[..., Awaitable[Raw]],
) -> None:
    state = await start(raw, close_on_next_request, answer(OK))
    pool = pool_for(state)
    try:
        await fetch(pool)
        _response, data = await fetch(pool)  # stale connection, then one fresh retry
        assert data == b"ok"
        assert state.connections == 2
        assert len(state.heads) == 3
    finally:
        await pool.close()


async def test_retry_happens_only_once(raw: Callable[..., Awaitable[Raw]]) -> None:
    state = await start(raw, close_on_next_request, refuse_every_request)
    pool = pool_for(state)
    try:
        await fetch(pool)
        with pytest.raises(UpstreamFailure) as caught:
            await fetch(pool)
        assert caught.value.kind == "connect"
        assert state.connections == 2  # the stale one plus exactly one retry
    finally:
        await pool.close()


@pytest.mark.parametrize(("method", "body"), [("POST", None), ("PUT", [b"data"])])
async def test_no_retry_for_a_non_idempotent_method_or_a_request_with_a_body(
    raw: Callable[..., Awaitable[Raw]], method: str, body: list[bytes] | None
) -> None:
    state = await start(raw, close_on_next_request, answer(OK))
    pool = pool_for(state)
    try:
        await fetch(pool)
        with pytest.raises(UpstreamFailure):
            await fetch(pool, method, body=body)
        assert state.connections == 1  # never sent twice
    finally:
        await pool.close()


async def test_a_response_not_read_to_its_end_never_goes_back_to_the_pool(
    raw: Callable[..., Awaitable[Raw]],
) -> None:
    state = await start(raw, answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234"))
    pool = pool_for(state)
    try:
        response = await pool.request("GET", get_head(), None, chunked=False, timeout=5)
        response.close()  # the client left mid-body
        assert pool.idle == 0
    finally:
        await pool.close()


async def test_connection_close_from_the_upstream_is_honoured(
    raw: Callable[..., Awaitable[Raw]],
) -> None:
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    state = await start(raw, answer(closing))
    pool = pool_for(state)
    try:
        await fetch(pool)
        assert pool.idle == 0
    finally:
        await pool.close()


async def test_idle_pool_is_bounded(raw: Callable[..., Awaitable[Raw]]) -> None:
    state = await start(raw, answer(OK, OK))
    pool = pool_for(state, max_idle=1)
    try:
        await asyncio.gather(fetch(pool), fetch(pool), fetch(pool))
        assert state.connections == 3
        assert pool.idle == 1
    finally:
        await pool.close()


async def test_unsolicited_bytes_on_an_idle_connection_drop_it(
    raw: Callable[..., Awaitable[Raw]],
) -> None:
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK + b"HTTP/1.1 200 OK\r\n")  # a second, unasked-for answer begins
        await writer.drain()
        await reader.read()

    state = await raw(chatty)
    pool = pool_for(state)
    try:
        await fetch(pool)
        assert pool.idle == 0  # the half answer came with the first one: never pooled
    finally:
        await pool.close()


# --- failures before the head ---------------------------------------------------------------


async def test_refused_connection_is_a_connect_failure() -> None:
    pool = UpstreamPool(URL(f"http://127.0.0.1:{free_port()}"), connect_timeout=5.0)
    try:
        with pytest.raises(UpstreamFailure) as caught:
            await fetch(pool)
        assert caught.value.kind == "connect"
    finally:
        await pool.close()


async def test_no_head_before_the_deadline_is_a_timeout(
    raw: Callable[..., Awaitable[Raw]],
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    state = await raw(silent)
    pool = pool_for(state)
    try:
        with pytest.raises(UpstreamFailure) as caught:
            await pool.request("GET", get_head(), None, chunked=False, timeout=0.2)
        assert caught.value.kind == "timeout"
        assert pool.idle == 0
    finally:
        await pool.close()


# --- request side ---------------------------------------------------------------------------


def test_request_head_is_one_buffer_with_host_and_framing() -> None:
    head = request_head(
        "POST", "/a?b=1", CIMultiDict({"X-A": "1", "X-A ": "2"}), "up:81", chunked=True
    )
    assert head.startswith(b"POST /a?b=1 HTTP/1.1\r\n")
    assert b"\r\nHost: up:81\r\n" in head
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head
    assert head.endswith(b"\r\n\r\n")
    kept = request_head("GET", "/", CIMultiDict({"Host": "client.example"}), "up", chunked=False)
    assert kept.count(b"Host:") == 1
    assert b"Host: client.example" in kept


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb"])
def test_request_head_refuses_cr_or_lf_in_a_value(value: str) -> None:
    # CWE-113: a claim or header value must never start a new header or request.
    with pytest.raises(ValueError):
        request_head("GET", "/", CIMultiDict({"X-Auth-User": value}), "up", chunked=False)


async def test_chunked_request_body_arrives_intact(start_backend: StartBackend) -> None:
    seen: list[tuple[str | None, bytes]] = []

    async def sink(request: web.Request) -> web.Response:
        seen.append((request.headers.get("Transfer-Encoding"), await request.read()))
        return web.Response(text="done")

    app = web.Application()
    app.router.add_post("/x", sink)
    backend = await start_backend(app)
    pool = UpstreamPool(URL(backend.url), connect_timeout=5.0)
    try:
        _response, data = await fetch(pool, "POST", body=[b"a" * 70000, b"", b"tail"])
        assert data == b"done"
        assert seen == [("chunked", b"a" * 70000 + b"tail")]
    finally:
        await pool.close()


# --- through the proxy ----------------------------------------------------------------------


async def test_smuggling_shaped_upstream_answer_is_a_502_through_the_proxy(
    raw: Callable[..., Awaitable[Raw]], start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RBAC_PROXY_UPSTREAM_CLIENT", raising=False)
    bad = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok"
    state = await start(raw, answer(bad))
    proxy = await start_proxy(f"http://127.0.0.1:{state.port}")
    assert proxy.server.runtime.upstream_pool is not None  # the lean path is the default
    async with ClientSession() as session, session.get(proxy.url + "/healthz") as resp:
        assert resp.status == 502
        assert (await resp.json())["reason"] == "upstream_unavailable"


async def test_env_switch_selects_the_aiohttp_client(
    raw: Callable[..., Awaitable[Raw]],
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = await start(raw, answer(OK))
    monkeypatch.setenv("RBAC_PROXY_UPSTREAM_CLIENT", "aiohttp")
    proxy = await start_proxy(f"http://127.0.0.1:{state.port}")
    assert proxy.server.runtime.upstream_pool is None
    async with ClientSession() as session, session.get(proxy.url + "/healthz") as resp:
        assert (resp.status, await resp.text()) == (200, "ok")
    monkeypatch.setenv("RBAC_PROXY_UPSTREAM_CLIENT", "curl")
    with pytest.raises(StartupError, match="RBAC_PROXY_UPSTREAM_CLIENT"):
        await start_proxy(f"http://127.0.0.1:{state.port}")


async def test_https_upstream_speaks_tls_and_a_failed_handshake_is_a_connect_failure(
    raw: Callable[..., Awaitable[Raw]],
) -> None:
    received: list[bytes] = []

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(5))  # the TLS ClientHello's record header
        writer.write(OK)  # plain HTTP where TLS is expected
        await writer.drain()

    state = await raw(plain)
    pool = UpstreamPool(URL(f"https://127.0.0.1:{state.port}"), connect_timeout=5.0)
    try:
        with pytest.raises(UpstreamFailure) as caught:
            await fetch(pool)
        assert caught.value.kind == "connect"
        assert received[0][:1] == b"\x16"  # a TLS handshake record, no request in the clear
    finally:
        await pool.close()
