"""Attacker's tools: a recording backend that keeps the exact bytes it received, a raw client.

The recording backend is a hand-written HTTP/1.1 server on a loopback port, not aiohttp: an
aiohttp backend would normalise the request before a test could look at it, which is exactly
the gap these tests measure. It records the method, the raw request-target bytes, every header
line as sent and the body, then answers 200 with a small JSON body (keep-alive).

The raw client writes exact bytes to the proxy and reads everything until the proxy closes or
goes quiet; `statuses` parses every response in the stream (pipelining answers several).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from dataclasses import dataclass, field

MAX_HEAD = 256 * 1024
BODY = b'{"ok":true}'


@dataclass(frozen=True)
class Received:
    """One request as the backend read it off the wire."""

    method: bytes
    target: bytes
    version: bytes
    header_lines: tuple[bytes, ...]
    body: bytes

    def headers(self, name: str) -> list[bytes]:
        """Values of every header line whose name equals `name` (case-insensitive)."""
        wanted = name.lower().encode("latin-1")
        out: list[bytes] = []
        for line in self.header_lines:
            key, _, value = line.partition(b":")
            if key.strip().lower() == wanted:
                out.append(value.strip())
        return out

    def header(self, name: str) -> bytes | None:
        values = self.headers(name)
        assert len(values) <= 1, f"{name} reached the backend {len(values)} times: {values!r}"
        return values[0] if values else None


@dataclass
class Recorder:
    """The recording backend; `requests` lists what reached it, in arrival order."""

    requests: list[Received] = field(default_factory=list)
    port: int = 0
    protocol_errors: list[str] = field(default_factory=list)
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def targets(self) -> list[bytes]:
        return [r.target for r in self.requests]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                except asyncio.LimitOverrunError:
                    self.protocol_errors.append("head too long")
                    return
                if len(head) > MAX_HEAD:
                    self.protocol_errors.append("head too long")
                    return
                request_line, *lines = head[:-4].split(b"\r\n")
                parts = request_line.split(b" ")
                if len(parts) != 3:
                    self.protocol_errors.append(f"bad request line {request_line!r}")
                    return
                method, target, version = parts
                received = Received(method, target, version, tuple(lines), b"")
                body = await self._read_body(reader, received)
                if body is None:
                    return
                self.requests.append(Received(method, target, version, tuple(lines), body))
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return  # the sender left mid-request: nothing complete was received
        finally:
            writer.close()

    async def _read_body(self, reader: asyncio.StreamReader, req: Received) -> bytes | None:
        te = [v.lower() for v in req.headers("transfer-encoding")]
        cl = req.headers("content-length")
        if te:
            if te != [b"chunked"] or cl:
                self.protocol_errors.append(f"ambiguous framing te={te!r} cl={cl!r}")
                return None
            return await self._read_chunked(reader)
        if cl:
            if len(cl) != 1 or not cl[0].isdigit():
                self.protocol_errors.append(f"bad content-length {cl!r}")
                return None
            return await reader.readexactly(int(cl[0]))
        return b""

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes | None:
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size_text = size_line[:-2].split(b";", 1)[0].strip()
            if not re.fullmatch(rb"[0-9a-fA-F]+", size_text):
                self.protocol_errors.append(f"bad chunk size {size_line!r}")
                return None
            size = int(size_text, 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailer lines
                return bytes(body)
            body += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                self.protocol_errors.append("chunk not followed by CRLF")
                return None


@dataclass(frozen=True)
class RawReply:
    """Everything the proxy sent back on one connection, and whether it closed it."""

    data: bytes
    closed: bool

    @property
    def statuses(self) -> list[int]:
        """Final status of every response in the stream, in order (see parse_statuses)."""
        return parse_statuses(self.data)

    @property
    def status(self) -> int | None:
        """The first final (non-1xx) status, or None when the proxy answered nothing."""
        finals = self.statuses
        return finals[0] if finals else None


_STATUS_LINE = re.compile(rb"HTTP/\d\.\d (\d{3})[^\r\n]*\r\n")


def parse_statuses(data: bytes) -> list[int]:
    """Every final response status in a stream, following each response's own framing, so a
    pipelined answer right after a body is found too. Any HTTP version counts (an `HTTP/0.9`
    or `HTTP/2.0` status line is an answer, not silence). 1xx interim answers are skipped;
    bytes that are not a status line end the stream (a close-delimited body takes the rest).
    """
    out: list[int] = []
    pos = 0
    for _ in range(64):  # bounded: more answers than that on one connection is a failure anyway
        m = _STATUS_LINE.match(data, pos)
        if m is None:
            break
        status = int(m.group(1))
        end = data.find(b"\r\n\r\n", m.start())
        if end < 0:
            out.append(status)
            break
        head = data[m.end() : end].split(b"\r\n")
        pos = end + 4
        if 100 <= status < 200:
            continue
        out.append(status)
        fields = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in head)
        }
        if b"content-length" in fields:
            pos += int(fields[b"content-length"])
        elif b"chunked" in fields.get(b"transfer-encoding", b"").lower():
            while (nl := data.find(b"\r\n", pos)) >= 0:
                size = int(data[pos:nl].split(b";")[0], 16)
                pos = nl + 2 + size + 2
                if size == 0:
                    break
        elif status not in (204, 304):
            break  # close-delimited: the rest of the stream is this body
    return out


async def send_raw(
    port: int,
    data: bytes,
    *,
    quiet: float = 0.5,
    limit: float = 5.0,
    local_host: str | None = None,
) -> RawReply:
    """Write `data` to 127.0.0.1:port; read until the proxy closes, or `quiet` s pass with no
    new bytes (a kept-alive connection), or `limit` s in all."""
    local_addr = (local_host, 0) if local_host else None
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local_addr)
    chunks: list[bytes] = []
    closed = False
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while (left := deadline - loop.time()) > 0:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), min(quiet, left))
            except TimeoutError:
                break
            except ConnectionError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return RawReply(b"".join(chunks), closed)


def request(
    target: str | bytes,
    *,
    method: str | bytes = "GET",
    user: str | None = "alice",
    headers: list[str] | list[bytes] | None = None,
    body: bytes = b"",
    close: bool = True,
) -> bytes:
    """One HTTP/1.1 request as bytes, header lines exactly as given (no normalisation)."""
    m = method.encode("latin-1") if isinstance(method, str) else method
    t = target.encode("latin-1") if isinstance(target, str) else target
    out = [m + b" " + t + b" HTTP/1.1", b"Host: dash.example"]
    if user is not None:
        out.append(b"X-User-Id: " + user.encode("latin-1"))
    for line in headers or []:
        out.append(line.encode("latin-1") if isinstance(line, str) else line)
    if body:
        out.append(b"Content-Length: %d" % len(body))
    if close:
        out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n" + body


async def open_non_reader(port: int) -> asyncio.StreamWriter:
    """A connection to 127.0.0.1:port whose receive buffer is as small as the kernel allows
    (2 KiB asked): with nothing read, the sender's socket fills after a fixed ~2 MB."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    _, writer = await asyncio.open_connection(sock=sock, limit=4096)
    return writer
