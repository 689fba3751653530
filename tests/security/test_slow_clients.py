"""Slow and oversized clients: slowloris, 414/431, thousands of idle connections, a client that
never reads (issue 7, item 5). Limits: proxy/web/protocol.py; docs/operations.md lists them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource

import pytest
from aiohttp import web

from proxy.web.protocol import MAX_FIELD, MAX_HEADERS, MAX_TARGET
from tests.security.harness import (
    RawReply,
    Recorder,
    open_non_reader,
    parse_statuses,
    request,
    send_raw,
)
from tests.web.conftest import Proxy, StartBackend, StartProxy

HEAD_TIMEOUT = 0.5


async def _slow_proxy(start_proxy: StartProxy, recorder: Recorder) -> Proxy:
    return await start_proxy(recorder.url, header_timeout=HEAD_TIMEOUT)


async def _trickle(port: int, data: bytes, interval: float, limit: float) -> tuple[bytes, float]:
    """Send `data` one byte per `interval` s; return what came back and when the proxy closed
    (seconds after the first byte), or `limit` if it never did."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    received = b""
    try:
        for byte in data:
            if loop.time() - started > limit:
                break
            with contextlib.suppress(ConnectionError):
                writer.write(bytes([byte]))
            try:
                chunk = await asyncio.wait_for(reader.read(65536), interval)
            except TimeoutError:
                continue
            except ConnectionError:
                return received, loop.time() - started
            received += chunk
            if not chunk:
                return received, loop.time() - started
        return received, limit
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _count(proxy: Proxy, code: int) -> float:
    metrics = proxy.server.runtime.metrics
    total = 0.0
    for family in metrics.requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("code") == str(code):
                total += sample.value
    return total


# --- slowloris --------------------------------------------------------------------------------


async def test_a_head_sent_one_byte_at_a_time_is_cut_with_408(
    start_proxy: StartProxy, recorder: Recorder
) -> None:
    proxy = await _slow_proxy(start_proxy, recorder)
    head = (
        b"GET /api/org HTTP/1.1\r\nHost: dash.example\r\nX-User-Id: alice\r\nX-Pad: " + b"a" * 200
    )
    received, closed_after = await _trickle(proxy.server.proxy_port, head, 0.05, limit=5.0)
    assert received.startswith(b"HTTP/1.1 408 ")
    head, _, body = received.partition(b"\r\n\r\n")
    answer = json.loads(body)
    assert answer["error"] == "request_timeout"
    assert b"X-Request-Id: " + answer["request_id"].encode() in head
    assert HEAD_TIMEOUT * 0.9 <= closed_after < HEAD_TIMEOUT + 1.5
    assert recorder.requests == []
    assert _count(proxy, 408) == 1


async def test_a_slow_second_head_on_a_kept_alive_connection_is_cut_too(
    start_proxy: StartProxy, recorder: Recorder
) -> None:
    proxy = await _slow_proxy(start_proxy, recorder)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
    try:
        writer.write(request("/api/org", close=False))
        first = await asyncio.wait_for(reader.readuntil(b'{"ok":true}'), 5)
        assert first.startswith(b"HTTP/1.1 200 ")
        writer.write(b"GET /api/org/billing HTTP/1.1\r\nHost: x\r\n")  # ...and nothing more
        rest = await asyncio.wait_for(reader.read(-1), HEAD_TIMEOUT + 3)
    finally:
        writer.close()
    assert rest.startswith(b"HTTP/1.1 408 ")
    assert recorder.targets() == [b"/api/org"]


async def test_an_idle_connection_is_not_cut_by_the_head_deadline(
    start_proxy: StartProxy, recorder: Recorder
) -> None:
    """The deadline starts at the first byte of a head: idle keep-alive is the 75 s timer's."""
    proxy = await _slow_proxy(start_proxy, recorder)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
    try:
        await asyncio.sleep(HEAD_TIMEOUT * 3)
        writer.write(request("/api/org"))
        reply = await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()
    assert reply.startswith(b"HTTP/1.1 200 ")


async def test_a_slow_body_is_not_cut_by_the_head_deadline(
    start_proxy: StartProxy, recorder: Recorder
) -> None:
    """Only the head has a deadline: a slow upload of an allowed request goes through."""
    proxy = await _slow_proxy(start_proxy, recorder)
    body = b"0123456789"
    head = request(
        "/api/projects/proj-prod/workflows", method="POST", headers=[f"Content-Length: {len(body)}"]
    ).removesuffix(b"\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
    try:
        writer.write(head + b"\r\n\r\n")
        for byte in body:  # 10 bytes over ~4 head timeouts
            await asyncio.sleep(HEAD_TIMEOUT / 2.5)
            writer.write(bytes([byte]))
        reply = await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert [r.body for r in recorder.requests] == [body]


async def test_header_timeout_zero_turns_the_deadline_off(
    start_proxy: StartProxy, recorder: Recorder
) -> None:
    proxy = await start_proxy(recorder.url, header_timeout=0)
    head = request("/api/org")
    received, _ = await _trickle(proxy.server.proxy_port, head, 0.02, limit=5.0)
    assert received.startswith(b"HTTP/1.1 200 ")


# --- stalled bodies -------------------------------------------------------------------------


@pytest.fixture(params=["lean", "aiohttp"])
def client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("RBAC_PROXY_UPSTREAM_CLIENT", request.param)
    return str(request.param)


BODY_TIMEOUT = 0.5


@pytest.mark.parametrize(
    ("method", "target", "user", "expect"),
    [
        # Public: without the deadline anyone could hold a backend connection this way.
        ("GET", "/healthz", None, []),
        ("POST", "/api/projects/proj-prod/workflows", "alice", []),
        ("POST", "/api/projects/proj-prod/workflows", "alice", ["Expect: 100-continue"]),
    ],
)
async def test_a_body_that_stops_is_cut_with_408(
    client: str,
    method: str,
    target: str,
    user: str | None,
    expect: list[str],
    start_proxy: StartProxy,
    recorder: Recorder,
) -> None:
    proxy = await start_proxy(recorder.url, body_timeout=BODY_TIMEOUT)
    head = request(
        target, method=method, user=user, headers=["Content-Length: 1000000", *expect]
    ).removesuffix(b"\r\n\r\n")
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
    try:
        writer.write(head + b"\r\n\r\n" + b"x")  # one byte of a million, then nothing
        started = loop.time()
        reply = b""
        async with asyncio.timeout(BODY_TIMEOUT + 5):
            # The 408 comes at once; aiohttp then reads and drops what is left of the body for
            # up to 10 s (its lingering close) before it closes: read the answer, not to EOF.
            while not (b"\r\n\r\n{" in reply and reply.endswith(b"}")):
                chunk = await reader.read(65536)
                assert chunk, reply
                reply += chunk
        took = loop.time() - started
    finally:
        writer.close()
    statuses = parse_statuses(reply)
    assert statuses == [408], reply[:300]
    assert BODY_TIMEOUT * 0.9 <= took < BODY_TIMEOUT + 3
    assert json.loads(reply.rpartition(b"\r\n\r\n")[2])["error"] == "request_timeout"
    assert recorder.requests == []  # the backend never saw a complete request
    assert _count(proxy, 408) == 1
    # The stalled request did not hold the upstream side: the next one is served at once.
    follow = await send_raw(proxy.server.proxy_port, request("/api/org"))
    assert follow.status == 200


async def test_a_slow_body_that_keeps_moving_is_not_cut(
    client: str, start_proxy: StartProxy, recorder: Recorder
) -> None:
    """The deadline is per read, not for the whole body: 8 pieces over ~4 body timeouts."""
    proxy = await start_proxy(recorder.url, body_timeout=BODY_TIMEOUT)
    body = b"0123456789abcdef"
    head = request("/api/projects/proj-prod/workflows", method="POST", body=body).removesuffix(body)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
    try:
        writer.write(head)
        for i in range(0, len(body), 2):
            await asyncio.sleep(BODY_TIMEOUT / 2)
            writer.write(body[i : i + 2])
        reply = await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert [r.body for r in recorder.requests] == [body]


# --- oversized heads --------------------------------------------------------------------------


def _json(reply: RawReply) -> dict[str, object]:
    body = reply.data.partition(b"\r\n\r\n")[2]
    parsed = json.loads(body)
    assert isinstance(parsed, dict)
    return parsed


async def test_a_request_target_over_the_limit_is_414(guarded: Proxy, recorder: Recorder) -> None:
    target = "/api/org?q=" + "a" * (MAX_TARGET - len("/api/org?q=") + 1)
    reply = await send_raw(guarded.server.proxy_port, request(target))
    assert reply.status == 414
    assert reply.closed
    body = _json(reply)
    assert body["error"] == "uri_too_long"
    assert body["reason"] == "bad_request"
    assert b"X-Request-Id: " + str(body["request_id"]).encode() in reply.data
    assert recorder.requests == []
    assert _count(guarded, 414) == 1


async def test_a_request_target_at_the_limit_is_served(guarded: Proxy, recorder: Recorder) -> None:
    target = "/api/org?q=" + "a" * (MAX_TARGET - len("/api/org?q="))
    reply = await send_raw(guarded.server.proxy_port, request(target))
    assert reply.status == 200
    assert recorder.targets() == [target.encode()]


async def test_a_header_line_over_the_limit_is_431(guarded: Proxy, recorder: Recorder) -> None:
    line = "Cookie: " + "c" * (MAX_FIELD + 10)
    reply = await send_raw(guarded.server.proxy_port, request("/api/org", headers=[line]))
    assert reply.status == 431
    assert _json(reply)["error"] == "request_header_fields_too_large"
    assert "c" * 50 not in reply.data.decode("latin-1")  # the header is never echoed
    assert recorder.requests == []


async def test_too_many_header_lines_is_431(guarded: Proxy, recorder: Recorder) -> None:
    lines = [f"X-Pad-{i}: v" for i in range(MAX_HEADERS + 1)]
    reply = await send_raw(guarded.server.proxy_port, request("/api/org", headers=lines))
    assert reply.status == 431
    assert recorder.requests == []


async def test_the_largest_allowed_head_is_served(guarded: Proxy, recorder: Recorder) -> None:
    # request() adds Host, X-User-Id and Connection: MAX_HEADERS lines in all.
    lines = [f"X-Pad-{i}: " + "v" * 100 for i in range(MAX_HEADERS - 3)]
    reply = await send_raw(guarded.server.proxy_port, request("/api/org", headers=lines))
    assert reply.status == 200
    assert len(recorder.requests) == 1


async def test_a_malformed_head_gets_a_json_400_without_the_parsers_text(
    guarded: Proxy, recorder: Recorder
) -> None:
    raw = b"GET /api/org HTTP/1.1\r\nHost: x\r\nX-Secret-Token abcdef123456\r\n\r\n"
    reply = await send_raw(guarded.server.proxy_port, raw)
    assert reply.status == 400
    assert b"abcdef123456" not in reply.data
    assert _json(reply)["message"] == "malformed HTTP request"
    assert recorder.requests == []
    lines = [json.loads(line) for line in guarded.audit_lines()]
    assert [(x["status"], x["reason"], x["path"]) for x in lines] == [(400, "bad_request", "-")]


# --- many idle connections ------------------------------------------------------------------


async def test_thousands_of_idle_connections_do_not_stop_new_requests(
    guarded: Proxy, recorder: Recorder
) -> None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    idle = min(2000, (soft - 200) // 2)  # each costs a descriptor on both ends (same process)
    assert idle >= 1000, f"RLIMIT_NOFILE {soft} is too low for this test"
    port = guarded.server.proxy_port
    writers: list[asyncio.StreamWriter] = []
    try:
        for i in range(idle):
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            if i % 2:
                w.write(b"GET /api/org HTTP/1.1\r\n")  # half of them with a started head
            writers.append(w)
        replies = await asyncio.gather(
            *(send_raw(port, request("/api/org"), limit=10.0) for _ in range(20))
        )
    finally:
        for w in writers:
            w.close()
    assert [r.status for r in replies] == [200] * 20
    assert len(recorder.requests) == 20


# --- a client that never reads ----------------------------------------------------------------


@pytest.mark.both_loops
async def test_a_client_that_never_reads_holds_a_bounded_amount_of_the_response(
    start_backend: StartBackend, start_proxy: StartProxy
) -> None:
    """The upstream is paused by flow control: what it managed to send while the client read
    nothing is bounded by socket and transport buffers, not by the response size."""
    sent = 0
    chunk = b"x" * 65536
    total = 256 * 1024 * 1024

    async def huge(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = total
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            while sent < total:
                await resp.write(chunk)
                sent += len(chunk)
        return resp

    app = web.Application()
    app.router.add_get("/api/projects/{p}/workflows", huge)
    backend = await start_backend(app)
    proxy = await start_proxy(backend.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
    try:
        writer.write(request("/api/projects/proj-prod/workflows"))
        await writer.drain()
        previous = -1
        for _ in range(50):  # until the upstream stalls (bounded: 5 s)
            await asyncio.sleep(0.1)
            if sent == previous and sent > 0:
                break
            previous = sent
        stalled_at = sent
        assert 0 < stalled_at < 64 * 1024 * 1024, f"upstream sent {stalled_at} bytes"
        print(f"upstream stalled after {stalled_at} bytes")
        # ...and the proxy still serves everyone else meanwhile.
        other = await send_raw(proxy.server.proxy_port, request("/healthz"), limit=5.0)
        assert other.status is not None
        # Reading resumes the flow: the bytes keep coming.
        got = 0
        async with asyncio.timeout(10):
            while got < 2 * stalled_at + 1024 * 1024:
                data = await reader.read(1 << 20)
                assert data
                got += len(data)
        assert sent > stalled_at
    finally:
        writer.close()


@pytest.mark.both_loops
@pytest.mark.parametrize("upstream_client", ["lean", "aiohttp"])
async def test_a_client_that_never_reads_is_cut_after_the_send_timeout(
    upstream_client: str,
    start_backend: StartBackend,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """--send-timeout: a write that waits longer for the client ends the exchange, and the
    upstream connection is dropped with it (it stops sending), as for a client that left."""
    monkeypatch.setenv("RBAC_PROXY_UPSTREAM_CLIENT", upstream_client)
    sent = 0
    upstream_done = asyncio.Event()

    async def huge(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = 256 * 1024 * 1024
        await resp.prepare(request)
        try:
            with contextlib.suppress(ConnectionError):
                while sent < 256 * 1024 * 1024:
                    await resp.write(b"x" * 65536)
                    sent += 65536
        finally:
            upstream_done.set()
        return resp

    async def small(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/api/projects/{p}/workflows", huge)
    app.router.add_get("/api/org", small)
    backend = await start_backend(app)
    proxy = await start_proxy(backend.url, send_timeout=0.5)
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
    try:
        writer.write(request("/api/projects/proj-prod/workflows"))
        await writer.drain()
        started = loop.time()
        async with asyncio.timeout(10):
            await upstream_done.wait()  # the proxy dropped the upstream side
        took = loop.time() - started
        assert sent < 64 * 1024 * 1024
        assert took < 5
        # The client connection is closed too: after the buffered bytes, EOF.
        async with asyncio.timeout(10):
            while await reader.read(1 << 20):
                pass
    finally:
        writer.close()
    other = await send_raw(proxy.server.proxy_port, request("/api/org"))
    assert other.status == 200
    lines = [json.loads(line) for line in proxy.audit_lines()]
    assert lines[0]["status"] == 499  # audited like a client that left
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback


@pytest.mark.both_loops
@pytest.mark.parametrize("upstream_client", ["lean", "aiohttp"])
async def test_a_slow_reader_that_keeps_reading_outlives_the_send_timeout(
    upstream_client: str,
    start_backend: StartBackend,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The --send-timeout clock runs only while writes are blocked and restarts whenever the
    client drains some: a client reading 2 MiB every 0.2 s gets a 32 MiB answer in full,
    although it takes several times the timeout and the proxy's writes block between reads
    (the buffers hold about 11 MiB, see the test above)."""
    monkeypatch.setenv("RBAC_PROXY_UPSTREAM_CLIENT", upstream_client)
    total = 32 * 1024 * 1024

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = total
        await resp.prepare(request)
        for _ in range(total // 65536):
            await resp.write(b"y" * 65536)
        return resp

    app = web.Application()
    app.router.add_get("/api/projects/{p}/workflows", big)
    backend = await start_backend(app)
    proxy = await start_proxy(backend.url, send_timeout=0.5)
    loop = asyncio.get_running_loop()
    # limit: the client's own buffer (up to 2 MiB) holds what one read takes off the socket.
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", proxy.server.proxy_port, limit=1024 * 1024
    )
    try:
        writer.write(request("/api/projects/proj-prod/workflows"))
        await writer.drain()
        started = loop.time()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        got = 0
        async with asyncio.timeout(60):
            while got < total:
                await asyncio.sleep(0.2)
                chunk = await reader.read(2 * 1024 * 1024)
                assert chunk, f"connection closed after {got} of {total} bytes"
                got += len(chunk)
        took = loop.time() - started
    finally:
        writer.close()
    assert got == total
    assert took > 3 * 0.5
    lines = [json.loads(line) for line in proxy.audit_lines()]
    assert lines[0]["status"] == 200


@pytest.mark.both_loops
async def test_a_websocket_client_that_never_reads_is_cut_after_the_send_timeout(
    start_backend: StartBackend, start_proxy: StartProxy
) -> None:
    """--send-timeout covers WebSocket frames too: a client that upgrades and then reads
    nothing while the backend pushes is cut, and the backend's WebSocket is closed with it."""
    sent = 0
    backend_done = asyncio.Event()

    async def live(request: web.Request) -> web.WebSocketResponse:
        nonlocal sent
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        # Reading alongside the pushes: the proxy's close frame ends the loop (ws.closed).
        closing = asyncio.create_task(ws.receive())
        try:
            with contextlib.suppress(ConnectionError):
                while sent < 256 * 1024 * 1024 and not ws.closed:
                    await ws.send_bytes(b"z" * 65536)
                    sent += 65536
        finally:
            closing.cancel()
            backend_done.set()
        return ws

    app = web.Application()
    app.router.add_get("/api/projects/{p}/task-history/live", live)
    backend = await start_backend(app)
    proxy = await start_proxy(backend.url, send_timeout=0.5)
    handshake = request(
        "/api/projects/proj-prod/task-history/live",
        user="bob",
        headers=[
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ],
        close=False,
    )
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
    try:
        writer.write(handshake)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 "), head
        started = loop.time()
        async with asyncio.timeout(10):
            await backend_done.wait()  # the proxy closed the backend's WebSocket
        took = loop.time() - started
        assert sent < 64 * 1024 * 1024
        assert took < 5
        async with asyncio.timeout(10):  # and the client's connection: EOF after the buffers
            while await reader.read(1 << 20):
                pass
    finally:
        writer.close()


# The last bytes of an answer: what the client's full socket cannot take once the handler has
# written the rest. The kernel takes a fixed amount per connection (about 2.2 MB here for a
# 2 KiB receive buffer), so answers of many sizes around it leave every remainder from a few
# bytes up to well past 64 KiB (the transport's default high-water mark) in the proxy.
_SIZED = "/api/projects/proj-prod/workflows"
_TAIL_SIZES = [1_600_000 + i * 20_000 for i in range(60)]  # 1.6 MB .. 2.78 MB


@pytest.mark.both_loops
async def test_the_unsent_tail_of_an_answer_is_cut_after_the_send_timeout(
    start_backend: StartBackend, start_proxy: StartProxy
) -> None:
    """--send-timeout covers the tail of an answer, whatever its size: with the transport's
    default 64 KiB high-water mark a smaller remainder never paused writing, so the handler
    returned (audited 200), no deadline ran, and behind "Connection: close" (whose close
    waits for the buffer to drain) a client that read nothing held its connection for good.
    Answers the kernel took whole are the kernel's business: the proxy lets go of those."""

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"t" * int(request.query["size"]))

    app = web.Application()
    app.router.add_get(_SIZED, sized)
    backend = await start_backend(app)
    proxy = await start_proxy(backend.url, send_timeout=0.5)
    connections = proxy.server.proxy_runner.server
    assert connections is not None
    clients: list[asyncio.StreamWriter] = []
    try:
        for size in _TAIL_SIZES:
            writer = await open_non_reader(proxy.server.proxy_port)
            clients.append(writer)
            writer.write(request(f"{_SIZED}?size={size}"))
        async with asyncio.timeout(10):
            while len(proxy.audit_lines()) < len(_TAIL_SIZES):  # every handler has returned
                await asyncio.sleep(0.02)
        await asyncio.sleep(1.5)  # 3 x --send-timeout, the clients still reading nothing
        held = len(connections.connections)
    finally:
        for writer in clients:
            writer.close()
    assert held == 0, f"{held} connections to clients that read nothing are still held"
    # The sizes straddle what the kernel holds: some answers fit whole (200), the rest were
    # cut (499). Without both, this machine's buffers differ and the test proves nothing.
    statuses = {json.loads(line)["status"] for line in proxy.audit_lines()}
    assert statuses == {200, 499}, statuses
    other = await send_raw(proxy.server.proxy_port, request(_SIZED + "?size=10"))
    assert other.status == 200


@pytest.mark.both_loops
async def test_the_send_timeout_outlives_aiohttps_force_close(
    start_backend: StartBackend, start_proxy: StartProxy
) -> None:
    """aiohttp's force_close() (its keep-alive expiry, a 408, a cancelled handler) closes the
    transport gracefully, which waits for unsent bytes, and then forgets it. The send
    deadline must still abort that transport: here force_close runs on a connection whose
    answer is stuck behind a client that reads nothing."""

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"f" * 8_000_000)

    app = web.Application()
    app.router.add_get(_SIZED, big)
    backend = await start_backend(app)
    proxy = await start_proxy(backend.url, send_timeout=1.0)
    server = proxy.server.proxy_runner.server
    assert server is not None
    writer = await open_non_reader(proxy.server.proxy_port)
    try:
        writer.write(request(_SIZED, close=False))
        async with asyncio.timeout(10):
            while not server.connections or not server.connections[0].transport:
                await asyncio.sleep(0.02)
            handler = server.connections[0]
            while handler.transport is not None and not handler.transport.get_write_buffer_size():
                await asyncio.sleep(0.02)  # until the answer is stuck behind the full socket
        handler.force_close()
        assert handler.transport is None
        await asyncio.sleep(2.0)  # twice the send timeout
        held = len(server.connections)
    finally:
        writer.close()
    assert held == 0, "the stuck connection outlived --send-timeout"
    lines = [json.loads(line) for line in proxy.audit_lines()]
    assert lines[0]["status"] == 499
