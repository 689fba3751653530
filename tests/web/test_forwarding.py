"""Forwarding through a real proxy: streaming both ways, SSE, WebSocket, and header hygiene."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
import random
import re
import resource
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import ClientSession, WSMsgType, web

from tests.web.conftest import SHIPPED_MEMBERS, Backend, Proxy, StartBackend, StartProxy

MiB = 1024 * 1024
BIG = 100 * MiB
CHUNK = 64 * 1024
RSS_LIMIT_KIB = 50 * 1024
BOB = {"X-User-Id": "bob"}  # developer in acme (the shipped members.yaml)
P = "/api/projects/proj-prod"
WAIT = 10.0  # upper bound for anything that should happen "soon"; never a speed assertion

# The /_demo/* endpoints, shipped-like project routes, and /up/{path*} for inline upstreams.
ROUTES = """\
version: 1
default: deny
mode: enforce
roles:
  admin:
    description: Organization Admin
    permissions: ["*"]
  developer:
    permissions: [projects:read, task_history:read, demo:use]
  support:
    permissions: [task_history:read]
plans:
  enterprise: {roles: [admin, developer, support], project_bindings: true}
  "*": {roles: [admin, developer], project_bindings: false}
routes:
  - path: /healthz
    methods: [GET]
    public: true
  - path: /_demo/echo
    methods: [POST]
    permission: demo:use
  - path: /_demo/bytes
    methods: [GET]
    permission: demo:use
  - path: /_demo/slow
    methods: [GET]
    permission: demo:use
  - path: /_demo/status/{code}
    methods: [GET]
    permission: demo:use
  - path: /api/projects/{project_id}
    methods: [GET]
    permission: projects:read
  - path: /api/projects/{project_id}/task-history/stream
    methods: [GET]
    permission: task_history:read
  - path: /api/projects/{project_id}/task-history/live
    methods: [GET]
    permission: task_history:read
    websocket: true
  - path: /up/{path*}
    methods: "*"
    permission: demo:use
"""


@pytest.fixture
def routes_file(tmp_path: Path) -> str:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES)
    return str(path)


@pytest.fixture
async def demo_proxy(backend: Backend, start_proxy: StartProxy, routes_file: str) -> Proxy:
    return await start_proxy(backend.url, routes=routes_file, store=f"file:{SHIPPED_MEMBERS}")


# --- raw HTTP helpers (aiohttp's client normalizes what we want to send verbatim) ----------


@dataclass
class Raw:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes  # de-chunked
    wire_body: bytes  # exactly what followed the header block

    def get(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def parse_response(data: bytes) -> Raw:
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete header block in {data[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    _version, status, reason = [*lines[0].split(" ", 2), ""][:3]
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    body = rest
    if any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers):
        body = dechunk(rest)
    return Raw(int(status), reason, headers, body, rest)


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    for _ in range(len(data) + 1):  # bounded: every round consumes at least one byte
        size_line, sep, data = data.partition(b"\r\n")
        assert sep, "truncated chunked body"
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        assert data[size : size + 2] == b"\r\n", "chunk not followed by CRLF"
        data = data[size + 2 :]
    raise AssertionError("unterminated chunked body")


async def read_response(reader: asyncio.StreamReader) -> Raw:
    """One response framed by its headers (Content-Length, chunked, or until EOF)."""
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
        parsed = parse_response(head)
        lengths = parsed.get("Content-Length")
        if lengths:
            rest = await reader.readexactly(int(lengths[0]))
        elif "chunked" in ",".join(parsed.get("Transfer-Encoding")).lower():
            rest = b""
            for _ in range(10_000):  # bounded: one round per chunk
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                rest += size_line + await reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            rest = await reader.read(-1)
    return parse_response(head + rest)


async def exchange(port: int, request: bytes, *, to_eof: bool = True) -> Raw:
    """Send bytes and parse the answer: everything until EOF (the request must then ask for
    `Connection: close`), or one response framed by its headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        if not to_eof:
            return await read_response(reader)
        async with asyncio.timeout(WAIT):
            data = await reader.read(-1)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return parse_response(data)


def port_of(proxy: Proxy) -> int:
    return proxy.server.proxy_port


# --- inline upstreams -----------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]


@dataclass
class Recorder:
    """An upstream that records what reached it and answers per path, some answers gated."""

    seen: list[Seen] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    gzipped: bytes = field(default_factory=lambda: gzip.compress(b"hello gzip " * 500))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.seen[-1].headers}

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.seen[-1].headers if k.lower() == name.lower()]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.method, request.raw_path, list(request.headers.items())))
        if request.path == "/up/gzip":
            return web.Response(
                body=self.gzipped,
                headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
            )
        if request.path == "/up/cookies":
            cookies = web.Response(status=299, reason="Custom Reason", text="c")
            cookies.headers.add("Set-Cookie", "a=1; Path=/; HttpOnly")
            cookies.headers.add("Set-Cookie", "b=2; Path=/; Secure")
            cookies.headers["X-Custom"] = "kept as is"
            cookies.headers["Cache-Control"] = "private, max-age=5"
            return cookies
        if request.path in ("/up/chunked", "/up/sse"):
            sse = request.path == "/up/sse"
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream" if sse else "text/plain"}
            )
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(b"data: first\n\n" if sse else b"part1-")
            # Nothing more until the test saw the first part: proves the proxy does not buffer.
            async with asyncio.timeout(WAIT):
                await self.gate.wait()
            await resp.write(b"data: second\n\n" if sse else b"part2")
            await resp.write_eof()
            return resp
        return web.json_response({"ok": True})


@pytest.fixture
async def recorder_proxy(
    start_backend: StartBackend, start_proxy: StartProxy, routes_file: str
) -> tuple[Recorder, Proxy]:
    recorder = Recorder()
    upstream = await start_backend(recorder.app())
    proxy = await start_proxy(upstream.url, routes=routes_file, store=f"file:{SHIPPED_MEMBERS}")
    return recorder, proxy


async def start_raw_upstream(response: bytes) -> tuple[asyncio.Server, int, list[bytes]]:
    """An upstream speaking hand-written HTTP: records request heads, sends `response`, closes."""
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(response)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    return server, port, heads


# --- memory measurement ---------------------------------------------------------------------


def _current_rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        resident_pages = int(fh.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _reset_peak_rss() -> None:
    # ru_maxrss is a high-water mark: an earlier test's peak would hide our growth. Linux ≥ 4.0
    # resets it to the current RSS on "5" (proc(5), /proc/pid/clear_refs); best effort.
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


@dataclass
class RssProbe:
    """ru_maxrss before/after plus sampled current RSS (robust to an older, higher peak)."""

    start_current: int = field(default_factory=_current_rss_kib)
    start_max: int = 0
    highest: int = 0

    def __post_init__(self) -> None:
        _reset_peak_rss()
        self.start_max = _maxrss_kib()
        self.highest = self.start_current

    def sample(self) -> None:
        self.highest = max(self.highest, _current_rss_kib())

    def assert_bounded(self) -> None:
        self.sample()
        max_growth = _maxrss_kib() - self.start_max
        sampled_growth = self.highest - self.start_current
        assert max_growth < RSS_LIMIT_KIB, f"ru_maxrss grew by {max_growth} KiB"
        assert sampled_growth < RSS_LIMIT_KIB, f"RSS grew by {sampled_growth} KiB"


# --- streaming bodies -----------------------------------------------------------------------


async def test_100mb_upload_streams_through_in_bounded_memory(demo_proxy: Proxy) -> None:
    block = random.Random(7).randbytes(CHUNK)
    sent = hashlib.sha256()
    probe = RssProbe()

    async def body() -> AsyncIterator[bytes]:
        for i in range(BIG // CHUNK):
            chunk = i.to_bytes(8, "big") + block[8:]  # every chunk distinct: order matters
            sent.update(chunk)
            if i % 64 == 0:
                probe.sample()
            yield chunk

    received = hashlib.sha256()
    count = 0
    async with (
        ClientSession() as session,
        session.post(
            demo_proxy.url + "/_demo/echo",
            data=body(),
            headers={**BOB, "Content-Type": "application/octet-stream"},
        ) as resp,
    ):
        assert resp.status == 200
        async for chunk in resp.content.iter_chunked(CHUNK):
            received.update(chunk)  # hashed as it arrives: the test client buffers nothing
            count += len(chunk)
            if count % (64 * CHUNK) < len(chunk):
                probe.sample()
    assert count == BIG
    assert received.hexdigest() == sent.hexdigest()
    probe.assert_bounded()


async def test_100mb_download_streams_through_in_bounded_memory(demo_proxy: Proxy) -> None:
    pattern = bytes(range(256)) * (CHUNK // 256)  # the demo's /_demo/bytes pattern
    expected = hashlib.sha256()
    for _ in range(BIG // CHUNK):
        expected.update(pattern)
    probe = RssProbe()
    received = hashlib.sha256()
    count = 0
    async with (
        ClientSession() as session,
        session.get(demo_proxy.url + f"/_demo/bytes?n={BIG}", headers=BOB) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(BIG)
        async for chunk in resp.content.iter_chunked(CHUNK):
            received.update(chunk)
            count += len(chunk)
            if count % (64 * CHUNK) < len(chunk):
                probe.sample()
    assert count == BIG
    assert received.hexdigest() == expected.hexdigest()
    probe.assert_bounded()


async def test_chunked_request_body_is_streamed_to_the_upstream(
    demo_proxy: Proxy, backend: Backend
) -> None:
    raw = await exchange(
        port_of(demo_proxy),
        b"POST /_demo/echo HTTP/1.1\r\nHost: x\r\nX-User-Id: bob\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
        b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n",
    )
    assert raw.status == 200
    assert raw.body == b"hello world"
    assert backend.received[-1]["raw_path"] == "/_demo/echo"


async def test_chunked_response_parts_arrive_before_the_upstream_finishes(
    recorder_proxy: tuple[Recorder, Proxy],
) -> None:
    recorder, proxy = recorder_proxy
    async with (
        ClientSession() as session,
        session.get(proxy.url + "/up/chunked", headers=BOB) as resp,
    ):
        assert resp.status == 200
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        first = b""
        async with asyncio.timeout(WAIT):  # would hang if the proxy waited for the whole body
            while len(first) < len(b"part1-"):
                first += await resp.content.readany()
        assert first == b"part1-"
        assert not resp.content.at_eof()
        recorder.gate.set()
        assert await resp.content.read() == b"part2"


# --- Server-Sent Events and WebSocket -------------------------------------------------------


async def test_sse_first_event_arrives_while_the_stream_is_open(demo_proxy: Proxy) -> None:
    async with (
        ClientSession() as session,
        session.get(
            demo_proxy.url + f"{P}/task-history/stream?count=3&interval=0.2", headers=BOB
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async with asyncio.timeout(WAIT):
            first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"id: 0\n")
        assert not resp.content.at_eof()  # the stream is still open...
        rest = await resp.content.read()  # ...and later events follow
    assert b"id: 1\n" in rest
    assert b"id: 2\n" in rest


async def test_sse_is_not_buffered_by_the_proxy(recorder_proxy: tuple[Recorder, Proxy]) -> None:
    recorder, proxy = recorder_proxy
    async with (
        ClientSession() as session,
        session.get(proxy.url + "/up/sse", headers=BOB) as resp,
    ):
        async with asyncio.timeout(WAIT):  # the upstream sends nothing more until gate is set
            first = await resp.content.readuntil(b"\n\n")
        assert first == b"data: first\n\n"
        recorder.gate.set()
        assert await resp.content.read() == b"data: second\n\n"


async def test_websocket_echo_and_close_code_pass_through(demo_proxy: Proxy) -> None:
    async with (
        ClientSession() as session,
        session.ws_connect(demo_proxy.url + f"{P}/task-history/live", headers=BOB) as ws,
    ):
        await ws.send_str("hello")
        msg = await ws.receive(timeout=WAIT)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "hello")
        await ws.send_bytes(b"\x00\x01\xfe\xff")
        msg = await ws.receive(timeout=WAIT)
        assert (msg.type, msg.data) == (WSMsgType.BINARY, b"\x00\x01\xfe\xff")
        await ws.send_str("close:4001")
        msg = await ws.receive(timeout=WAIT)
        assert msg.type is WSMsgType.CLOSE
        assert msg.data == 4001
        assert ws.close_code == 4001


async def test_websocket_to_the_client_is_not_compressed(demo_proxy: Proxy) -> None:
    """The upstream leg is uncompressed; deflating only the client leg costs CPU per frame."""
    async with (
        ClientSession() as session,
        session.ws_connect(
            demo_proxy.url + f"{P}/task-history/live", headers=BOB, compress=15
        ) as ws,
    ):
        assert ws.compress == 0
        await ws.send_str("hello")
        msg = await ws.receive(timeout=WAIT)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "hello")


async def test_websocket_upgrade_on_a_route_without_websocket_is_400(
    demo_proxy: Proxy, backend: Backend
) -> None:
    raw = await exchange(
        port_of(demo_proxy),
        b"GET /_demo/bytes?n=1 HTTP/1.1\r\nHost: x\r\nX-User-Id: bob\r\n"
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        to_eof=False,
    )
    assert raw.status == 400
    assert backend.received == []


@pytest.mark.parametrize("path", [f"{P}/task-history/live", "/_demo/bytes?n=1"])
async def test_h2c_upgrade_is_400_everywhere(
    demo_proxy: Proxy, backend: Backend, path: str
) -> None:
    raw = await exchange(
        port_of(demo_proxy),
        f"GET {path} HTTP/1.1\r\nHost: x\r\nX-User-Id: bob\r\n"
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".encode(),
        to_eof=False,
    )
    assert raw.status == 400
    assert backend.received == []


# --- bodiless responses ---------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/_demo/status/200", "/_demo/bytes?n=1000"])
async def test_head_on_a_get_route_has_no_body(
    demo_proxy: Proxy, backend: Backend, target: str
) -> None:
    raw = await exchange(
        port_of(demo_proxy),
        f"HEAD {target} HTTP/1.1\r\nHost: x\r\nX-User-Id: bob\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert raw.status == 200
    assert raw.wire_body == b""
    assert raw.get("Transfer-Encoding") == []
    assert backend.received[-1]["method"] == "HEAD"


@pytest.mark.parametrize("code", [204, 304])
async def test_204_and_304_have_no_body(demo_proxy: Proxy, code: int) -> None:
    raw = await exchange(
        port_of(demo_proxy),
        f"GET /_demo/status/{code} HTTP/1.1\r\nHost: x\r\nX-User-Id: bob\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert raw.status == code
    assert raw.wire_body == b""
    # RFC 9112 §6.1: no Transfer-Encoding on a 204 (or a 304 to a plain GET).
    assert raw.get("Transfer-Encoding") == []


# --- status and headers ---------------------------------------------------------------------


async def test_status_reason_and_repeated_headers_pass_unchanged(
    recorder_proxy: tuple[Recorder, Proxy],
) -> None:
    _recorder, proxy = recorder_proxy
    raw = await exchange(
        port_of(proxy),
        b"GET /up/cookies HTTP/1.1\r\nHost: x\r\nX-User-Id: bob\r\nConnection: close\r\n\r\n",
    )
    assert (raw.status, raw.reason) == (299, "Custom Reason")
    assert raw.get("Set-Cookie") == ["a=1; Path=/; HttpOnly", "b=2; Path=/; Secure"]
    assert raw.get("X-Custom") == ["kept as is"]
    assert raw.get("Cache-Control") == ["private, max-age=5"]


async def test_demo_status_codes_pass_unchanged(demo_proxy: Proxy) -> None:
    async with ClientSession() as session:
        for code in (201, 404, 418, 500, 503):
            async with session.get(demo_proxy.url + f"/_demo/status/{code}", headers=BOB) as r:
                assert r.status == code
                assert (await r.json())["status"] == code


async def test_gzip_bytes_arrive_byte_identical(recorder_proxy: tuple[Recorder, Proxy]) -> None:
    recorder, proxy = recorder_proxy
    async with (
        ClientSession(auto_decompress=False) as session,
        session.get(proxy.url + "/up/gzip", headers={**BOB, "Accept-Encoding": "gzip"}) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Length"] == str(len(recorder.gzipped))
        assert await resp.read() == recorder.gzipped
    assert recorder.header("Accept-Encoding") == ["gzip"]


async def test_hop_by_hop_request_headers_are_removed(
    recorder_proxy: tuple[Recorder, Proxy],
) -> None:
    recorder, proxy = recorder_proxy
    raw = await exchange(
        port_of(proxy),
        b"GET /up/x HTTP/1.1\r\nHost: x\r\nX-User-Id: bob\r\n"
        b"Connection: close, X-Drop-Me\r\nX-Drop-Me: secret\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-Later\r\n"
        b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\nX-Kept: yes\r\n\r\n",
    )
    assert raw.status == 200
    names = recorder.names()
    for dropped in (
        "x-drop-me",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "proxy-authorization",
    ):
        assert dropped not in names, dropped
    assert "close" not in [v.lower() for v in recorder.header("Connection")]
    assert recorder.header("X-Kept") == ["yes"]


async def test_hop_by_hop_response_headers_are_removed(
    start_proxy: StartProxy, routes_file: str
) -> None:
    body = b"ok"
    server, port, _heads = await start_raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close, X-Resp-Hop\r\n"
        b"X-Resp-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\n"
        b"Proxy-Connection: close\r\nUpgrade: h2c\r\nX-Kept: yes\r\n\r\n" + body
    )
    async with server:
        proxy = await start_proxy(
            f"http://127.0.0.1:{port}", routes=routes_file, store=f"file:{SHIPPED_MEMBERS}"
        )
        raw = await exchange(
            port_of(proxy),
            b"GET /up/x HTTP/1.1\r\nHost: x\r\nX-User-Id: bob\r\nConnection: close\r\n\r\n",
        )
    assert raw.status == 200
    assert raw.body == body
    names = {k.lower() for k, _ in raw.headers}
    for dropped in (
        "x-resp-hop",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "upgrade",
    ):
        assert dropped not in names, dropped
    assert raw.get("X-Kept") == ["yes"]


async def test_no_content_type_is_added_to_an_untyped_response(
    start_proxy: StartProxy, routes_file: str
) -> None:
    # RFC 9110 §8.3: without Content-Type the recipient may sniff; the proxy must not decide
    # for it (aiohttp would default to application/octet-stream, forcing a download).
    server, port, _heads = await start_raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    )
    async with server:
        proxy = await start_proxy(
            f"http://127.0.0.1:{port}", routes=routes_file, store=f"file:{SHIPPED_MEMBERS}"
        )
        raw = await exchange(
            port_of(proxy),
            b"GET /up/x HTTP/1.1\r\nHost: x\r\nX-User-Id: bob\r\nConnection: close\r\n\r\n",
        )
    assert raw.status == 200
    assert raw.body == b"hello"
    assert raw.get("Content-Type") == []


async def test_x_forwarded_headers_are_set(recorder_proxy: tuple[Recorder, Proxy]) -> None:
    recorder, proxy = recorder_proxy
    raw = await exchange(
        port_of(proxy),
        b"GET /up/x HTTP/1.1\r\nHost: dash.example:8443\r\nX-User-Id: bob\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert raw.status == 200
    assert recorder.header("X-Forwarded-For") == ["127.0.0.1"]
    assert recorder.header("X-Forwarded-Proto") == ["http"]
    assert recorder.header("X-Forwarded-Host") == ["dash.example:8443"]
    # The request id the upstream got is the one the client gets back (SPEC §2).
    assert len(raw.get("X-Request-Id")) == 1
    assert recorder.header("X-Request-Id") == raw.get("X-Request-Id")


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("//up///a//b/?x=1&y=%2F&z=a+b", "/up/a/b/?x=1&y=%2F&z=a+b"),
        ("/up/a%20b?q=%20", "/up/a%20b?q=%20"),
        ("/up/caf%C3%A9/%7Euser", "/up/caf%C3%A9/~user"),
        ("/up/a//?", "/up/a/"),
    ],
)
async def test_upstream_receives_the_canonical_path_and_original_query(
    recorder_proxy: tuple[Recorder, Proxy], target: str, forwarded: str
) -> None:
    recorder, proxy = recorder_proxy
    raw = await exchange(
        port_of(proxy),
        f"GET {target} HTTP/1.1\r\nHost: x\r\nX-User-Id: bob\r\nConnection: close\r\n\r\n".encode(),
    )
    assert raw.status == 200
    assert recorder.seen[-1].raw_path == forwarded


async def test_expect_100_continue(demo_proxy: Proxy, backend: Backend) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(demo_proxy))
    try:
        writer.write(
            b"POST /_demo/echo HTTP/1.1\r\nHost: x\r\nX-User-Id: bob\r\nConnection: close\r\n"
            b"Content-Length: 11\r\nExpect: 100-continue\r\n\r\n"
        )
        await writer.drain()
        async with asyncio.timeout(WAIT):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"hello world")
        await writer.drain()
        async with asyncio.timeout(WAIT):
            final = parse_response(await reader.read(-1))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert final.status == 200
    assert final.body == b"hello world"
    received = backend.received[-1]
    headers = received["headers"]
    assert isinstance(headers, dict)
    assert "expect" not in headers  # answered by the proxy after authorizing, not forwarded


async def test_expect_100_continue_denied_gets_the_final_answer_only(
    demo_proxy: Proxy, backend: Backend
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(demo_proxy))
    try:
        writer.write(
            b"POST /_demo/echo HTTP/1.1\r\nHost: x\r\nX-User-Id: sue\r\nConnection: close\r\n"
            b"Content-Length: 11\r\nExpect: 100-continue\r\n\r\n"
        )
        await writer.drain()
        final = await read_response(reader)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert final.status == 403  # support lacks demo:use; the body was never requested
    assert backend.received == []


# ---------------------------------------------------------------- one-write relay of small answers

DATE = "Thu, 03 Dec 2026 19:00:00 GMT"
CANNED = {
    "nginx-like": (
        "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: {date}\r\nContent-Type: application/json\r\n"
        "Content-Length: 5\r\nConnection: keep-alive\r\nX-Other: a\r\n\r\nhello"
    ),
    "echoes-our-request-id-twice": (
        "HTTP/1.1 201 Created\r\nx-request-id: theirs\r\nServer: up\r\nDate: {date}\r\n"
        'Content-Length: 2\r\nX-Request-Id: again\r\nETag: "1"\r\n\r\nok'
    ),
    "connection-names-a-header": (
        "HTTP/1.1 200 OK\r\nServer: up\r\nDate: {date}\r\nConnection: keep-alive, X-Secret\r\n"
        "X-Secret: s\r\nKeep_Alive: timeout=5\r\nContent-Length: 3\r\nSet-Cookie: a=1\r\n"
        "Set-Cookie: b=2\r\n\r\nabc"
    ),
    "no-content-type-no-server": (
        "HTTP/1.1 404 Not Found\r\nDate: {date}\r\nContent-Length: 4\r\n\r\nnope"
    ),
    "chunked": (
        "HTTP/1.1 200 OK\r\nServer: up\r\nDate: {date}\r\nTransfer-Encoding: chunked\r\n\r\n"
        "3\r\nabc\r\n0\r\n\r\n"
    ),
    "empty-reason": "HTTP/1.1 200 \r\nServer: up\r\nDate: {date}\r\nContent-Length: 1\r\n\r\nx",
}


async def test_no_server_banner_the_upstream_did_not_send(start_proxy: StartProxy) -> None:
    """aiohttp would stamp "Server: Python/3.x aiohttp/3.y" on relayed answers (the backend
    never said so) and on the proxy's own ones: exact versions help anyone matching CVEs."""
    replies = {
        "none": "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "none-chunked": (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        ),
        "upstream": "HTTP/1.1 200 OK\r\nServer: up/1\r\nContent-Length: 2\r\n\r\nok",
    }
    seen: dict[str, list[str]] = {}
    for name, reply in replies.items():
        server, port = await _canned_upstream(reply.encode())
        try:
            proxy = await start_proxy(f"http://127.0.0.1:{port}")
            async with ClientSession() as session:
                async with session.get(proxy.url + f"{P}/workflows", headers=BOB) as resp:
                    assert resp.status == 200
                    seen[name] = resp.headers.getall("Server", [])
                async with session.get(proxy.url + "/api/org/billing", headers=BOB) as resp:
                    assert resp.status == 403
                    seen["own-403"] = resp.headers.getall("Server", [])
        finally:
            server.close()
            await server.wait_closed()
    assert seen == {
        "none": [],
        "none-chunked": [],
        "upstream": ["up/1"],
        "own-403": ["rbac-proxy"],
    }


async def _canned_upstream(reply: bytes) -> tuple[asyncio.Server, int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                # RFC 9110 §9.3.2: the answer to HEAD is the head alone.
                writer.write(
                    reply.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
                    if head.startswith(b"HEAD ")
                    else reply
                )
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _exchange(port: int, requests: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(requests)
    data = await asyncio.wait_for(reader.read(), WAIT)  # the last request asks to close
    writer.close()
    # A Date that aiohttp adds itself (error answers) is the clock's, not the upstream's.
    return re.sub(rb"Date: (?!" + DATE.encode() + rb")[^\r]*", b"Date: (now)", data)


def _requests(*heads: str) -> bytes:
    return b"".join(
        (
            f"{head}\r\nHost: dash.example\r\nX-User-Id: bob\r\nX-Request-Id: rid-{i}\r\n"
            + ("Connection: close\r\n" if i == len(heads) - 1 else "")
            + "\r\n"
        ).encode()
        for i, head in enumerate(heads)
    )


@pytest.mark.parametrize("name", sorted(CANNED))
async def test_the_one_write_relay_sends_what_aiohttp_would_send(
    name: str, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.web import forward

    server, port = await _canned_upstream(CANNED[name].format(date=DATE).encode())
    try:
        proxy = await start_proxy(f"http://127.0.0.1:{port}")
        proxy_port = proxy.server.proxy_port
        path = f"{P}/workflows"
        exchanges = [
            _requests(
                f"GET {path} HTTP/1.1",  # keep-alive: the one-write path when it applies
                f"HEAD {path} HTTP/1.1",
                f"GET {path} HTTP/1.1",  # Connection: close
            ),
            _requests(f"GET {path}?x=1 HTTP/1.0"),
        ]
        used: list[bool] = []
        real = forward._whole_answer

        def spy(*args: object, **kwargs: object) -> bytes | None:
            answer = real(*args, **kwargs)  # type: ignore[arg-type]
            used.append(answer is not None)
            return answer

        monkeypatch.setattr(forward, "_whole_answer", spy)
        fast = [await _exchange(proxy_port, requests) for requests in exchanges]
        monkeypatch.setattr(forward, "_whole_answer", lambda *a, **k: None)
        slow = [await _exchange(proxy_port, requests) for requests in exchanges]
    finally:
        server.close()
        await server.wait_closed()
    assert fast == slow
    assert [reply.count(b"HTTP/1.") for reply in fast] == [3, 1]
    expected = name in (
        "nginx-like",
        "echoes-our-request-id-twice",
        "connection-names-a-header",
        "no-content-type-no-server",  # neither path adds a Server the upstream left out
    )
    assert used[0] is expected
    assert not any(used[1:])
