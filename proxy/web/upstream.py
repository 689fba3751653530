"""A lean keep-alive HTTP/1.1 client to the one upstream, for the plain forwarding path."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterable, Iterable
from typing import Any

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpResponseParser, RawResponseMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDict
from yarl import URL

# RFC 9112 §2.3 puts no limit on a header section; we do, so a hostile or broken upstream
# cannot make us buffer without bound. More than this is an upstream error (502).
MAX_HEAD = 64 * 1024
# The response body buffer: the parser pauses the socket above 2x this (aiohttp's default).
READ_LIMIT = 64 * 1024
# RFC 9110 §9.2.2: methods a client may repeat without changing the result; only these are
# retried, and only when the request carried no body and no response byte had arrived.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class UpstreamFailure(Exception):
    """No usable response head: `kind` is connect (refused, reset, malformed) or timeout."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class BodyBroken(Exception):
    """The upstream failed after the response head (truncated or malformed body)."""


class _Stale(Exception):
    """A reused connection closed before any byte of the response: safe to retry once."""


class _Connection(BaseProtocol):
    """One upstream TCP (or TLS) connection, driven by aiohttp's C response parser."""

    __slots__ = (
        "_body_task",
        "_head_bytes",
        "_head_only",
        "_head_tail",
        "_pool",
        "_timeout",
        "_timer",
        "_waiter",
        "closed",
        "idle_since",
        "payload",
        "reused",
        "started",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: UpstreamPool) -> None:
        super().__init__(loop)
        self._pool = pool
        self._waiter: asyncio.Future[RawResponseMessage] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = 0.0
        self._body_task: asyncio.Task[None] | None = None
        self._head_bytes = 0
        self._head_only = False
        self._head_tail = b""
        self.payload: StreamReader | None = None
        self.closed = False
        self.reused = False
        self.started = False  # a response byte arrived for the current request
        self.idle_since = 0.0

    # --- asyncio.Protocol ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._head_only and self._parser is not None:
            self._feed_head_only(data)
        else:
            self._feed(data)

    def _feed_head_only(self, data: bytes) -> None:
        """A response to HEAD ends with its header section (RFC 9110 §9.3.2).

        Backends often send their GET body anyway, frequently in the same read as the head;
        fed to the parser, those bytes look like a malformed next response and failed the
        whole exchange (502). Feed up to each end of a header section (1xx heads included)
        and drop whatever follows the final one: the connection is never reused after HEAD.
        """
        joined = self._head_tail + data
        shift = len(self._head_tail)
        self._head_tail = joined[-3:]
        start = 0
        while start < len(data):
            waiter = self._waiter
            if self._parser is None or waiter is None or waiter.done():
                return  # after the final head (or a failure): a stray body, never parsed
            # The first search starts in the kept tail: a CRLFCRLF may straddle two reads.
            end = joined.find(b"\r\n\r\n", start + shift if start else 0)
            stop = len(data) if end < 0 else end + 4 - shift
            self._feed(data[start:stop])
            start = stop

    def _feed(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            # Bytes nobody asked for (or after a finished response): the connection's framing
            # can no longer be trusted.
            if data:
                self.close()
            return
        self.started = True
        waiter = self._waiter
        if waiter is not None:
            self._head_bytes += len(data)
        try:
            messages, upgraded, _tail = parser.feed_data(data)
        except Exception as exc:  # any parser error: the framing is lost (RFC 9112 §6.3)
            self._fail(exc)
            return
        if upgraded:
            self._fail(ValueError("unrequested protocol switch"))
            return
        for message, payload in messages:
            if waiter is None or waiter.done():
                # A second final response to one request: response splitting, never relayed.
                self._fail(ValueError("extra response"))
                return
            code = message.code
            if not 100 <= code <= 599:
                # RFC 9110 §15: three digits, 1xx-5xx; aiohttp would relay "0 Weird" as sent.
                self._fail(ValueError("invalid status code"))
                return
            if 100 <= code < 200:
                # RFC 9110 §15.2: interim responses (100 Continue, 103 Early Hints) are not
                # the answer; 101 was never asked for on this path.
                if code == 101:
                    self._fail(ValueError("unrequested 101 Switching Protocols"))
                    return
                continue
            if self._head_bytes > MAX_HEAD and _head_size(message) > MAX_HEAD:
                self._fail(ValueError("response header section too large"))
                return
            self.payload = payload
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            waiter.set_result(message)
        if waiter is not None and not waiter.done() and self._head_bytes > MAX_HEAD:
            self._fail(ValueError("response header section too large"))

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.closed = True
        self._pool._forget(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        parser = self._parser
        self._parser = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self.reused and not self.started:
                waiter.set_exception(_Stale())
            else:
                waiter.set_exception(ConnectionResetError("upstream closed the connection"))
            return
        payload = self.payload
        if parser is not None and payload is not None and not payload.is_eof():
            try:
                # Completes a close-delimited body; raises for a truncated one.
                parser.feed_eof()
            except Exception as err:
                payload.set_exception(BodyBroken(type(err).__name__))
            else:
                if not payload.is_eof():
                    payload.set_exception(BodyBroken("connection closed"))
        if self._body_task is not None:
            self._body_task.cancel()

    # --- one exchange ------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            # Never the parser's text: it quotes the upstream's header bytes (cookies, tokens)
            # and this message becomes the client's 502 body. Our own ValueErrors are fixed text.
            what = str(exc) if type(exc) is ValueError else type(exc).__name__
            waiter.set_exception(UpstreamFailure("connect", f"bad upstream response: {what}"))
        elif self.payload is not None and not self.payload.is_eof():
            self.payload.set_exception(BodyBroken(type(exc).__name__))
        self._parser = None
        self.close()

    def _on_timeout(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())
        self.close()

    def close(self) -> None:
        """Drop the connection (it never goes back to the pool)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        if self._body_task is not None and not self._body_task.done():
            self._body_task.cancel()

    def begin(
        self, head: bytes, *, with_body: bool, deadline: float, timeout: float, body: bool = False
    ) -> asyncio.Future[RawResponseMessage]:
        loop = self._loop
        self._parser = HttpResponseParser(
            self,
            loop,
            READ_LIMIT,
            max_line_size=8190,
            max_headers=256,
            max_field_size=MAX_HEAD,
            response_with_body=with_body,
            read_until_eof=True,  # a response without framing ends at close (RFC 9112 §6.3)
            auto_decompress=False,  # the client gets the upstream's bytes unchanged
        )
        self._head_bytes = 0
        self._head_only = not with_body
        self._head_tail = b""
        self.started = False
        self.payload = None
        self._waiter = waiter = loop.create_future()
        # Time to response headers counts from the end of the request: with a body the timer
        # starts in _pump once the last byte is written (a slow upload is not an upstream
        # timeout). The connect time is already bounded by --connect-timeout.
        self._timeout = timeout
        self._timer = None if body else loop.call_at(deadline, self._on_timeout)
        assert self.transport is not None
        self.transport.write(head)
        return waiter

    def send_body(self, body: AsyncIterable[bytes], chunked: bool) -> None:
        self._body_task = asyncio.get_running_loop().create_task(self._pump(body, chunked))

    async def _pump(self, body: AsyncIterable[bytes], chunked: bool) -> None:
        try:
            async for chunk in body:
                transport = self.transport
                if transport is None:
                    return
                if chunked:
                    if chunk:
                        # RFC 9112 §7.1: size in hex, CRLF, data, CRLF.
                        transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                if self._paused:
                    await self._drain_helper()  # bounded memory for big uploads
            if chunked and self.transport is not None:
                self.transport.write(b"0\r\n\r\n")
            waiter = self._waiter
            if waiter is not None and not waiter.done() and self._timer is None:
                self._timer = self._loop.call_later(self._timeout, self._on_timeout)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The client's body failed (it left, or sent bad chunking): the upstream must
            # not see a request that looks complete.
            self.close()

    def finish(self) -> bool:
        """After the response: True if the connection can carry another request."""
        self._waiter = None
        body_task = self._body_task
        self._body_task = None
        payload = self.payload
        self.payload = None
        parser = self._parser
        self._parser = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if (
            self.closed
            or parser is None
            or payload is None
            or not payload.is_eof()
            or payload.exception() is not None
            or (body_task is not None and (not body_task.done() or body_task.cancelled()))
        ):
            return False
        try:
            # Bytes after the response's end that began another message (in the same read):
            # an unasked-for answer the next request would otherwise inherit.
            return parser.feed_eof() is None
        except Exception:
            return False


def _head_size(message: RawResponseMessage) -> int:
    return sum(len(name) + len(value) + 4 for name, value in message.raw_headers)


class UpstreamResponse:
    """A response head plus its streaming body; `release()` returns the connection if clean."""

    __slots__ = ("_conn", "_keep", "body", "headers", "reason", "reusable", "status")

    def __init__(self, conn: _Connection, message: RawResponseMessage) -> None:
        self._conn = conn
        self._keep = not message.should_close
        self.reusable = True
        self.status: int = message.code
        self.reason: str = message.reason
        self.headers: Any = message.headers  # CIMultiDictProxy[str]
        payload = conn.payload
        assert payload is not None
        self.body: StreamReader = payload

    def release(self) -> None:
        """Back to the pool when the body was read to its end and nobody said close."""
        conn = self._conn
        if conn.finish() and self._keep and self.reusable:
            conn._pool._release(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection: the response was not read to its end (client left, error)."""
        self._conn.finish()
        self._conn.close()


class UpstreamPool:
    """Keep-alive connections to one upstream host:port; idle ones reused most-recent first."""

    def __init__(
        self,
        url: URL,
        *,
        connect_timeout: float,
        max_idle: int = 256,
        idle_timeout: float = 30.0,
    ) -> None:
        self.host = url.raw_host or ""
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if url.scheme == "https" else None
        )
        # RFC 9110 §7.2: the Host an HTTP/1.0 client left out is the upstream's authority.
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host if url.explicit_port is None else f"{host}:{self.port}"
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._closed = False

    async def request(
        self,
        method: str,
        head: bytes,
        body: AsyncIterable[bytes] | None,
        *,
        chunked: bool,
        timeout: float,
    ) -> UpstreamResponse:
        """Send a request head (and stream its body); wait for the response head.

        `timeout` bounds the time to the response head, connect included. Raises
        UpstreamFailure; a reused connection that turned out closed is retried once on a new
        connection when the request is idempotent and bodiless.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = self._take(loop.time())
        if conn is None:
            conn = await self._connect(deadline)
        try:
            message = await self._exchange(conn, method, head, body, chunked, deadline, timeout)
        except _Stale:
            if body is not None or method not in IDEMPOTENT:
                raise UpstreamFailure(
                    "connect", "upstream closed a kept-alive connection"
                ) from None
            conn = await self._connect(deadline)
            try:
                message = await self._exchange(conn, method, head, body, chunked, deadline, timeout)
            except _Stale:  # a fresh connection is never marked reused; kept for mypy
                raise UpstreamFailure("connect", "upstream closed the connection") from None
        response = UpstreamResponse(conn, message)
        if method == "HEAD":
            # Backends often (wrongly) send the GET body after a HEAD head; bytes that arrive
            # late would be read as the NEXT caller's response. Never reuse after HEAD.
            response.reusable = False
        return response

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        head: bytes,
        body: AsyncIterable[bytes] | None,
        chunked: bool,
        deadline: float,
        timeout: float,
    ) -> RawResponseMessage:
        self._busy.add(conn)
        ok = False
        try:
            waiter = conn.begin(
                head,
                with_body=method != "HEAD",
                deadline=deadline,
                timeout=timeout,
                body=body is not None,
            )
            if body is not None:
                conn.send_body(body, chunked)
            message = await waiter
            ok = True
            return message
        except TimeoutError:
            raise UpstreamFailure("timeout", "upstream did not answer in time") from None
        except ConnectionError as exc:
            raise UpstreamFailure("connect", f"upstream closed: {type(exc).__name__}") from None
        finally:
            if not ok:  # cancelled (client left), failed or timed out: never reused
                conn.finish()
                conn.close()

    async def _connect(self, deadline: float) -> _Connection:
        if self._closed:
            raise UpstreamFailure("connect", "upstream pool closed")
        loop = asyncio.get_running_loop()
        limit = min(deadline, loop.time() + self._connect_timeout)
        try:
            async with asyncio.timeout_at(limit):
                _transport, conn = await loop.create_connection(
                    lambda: _Connection(loop, self),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
        except TimeoutError:
            # Like nginx's proxy_connect_timeout: no timely answer from the upstream is a 504.
            raise UpstreamFailure("timeout", "upstream connect timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamFailure(
                "connect", f"upstream unavailable: {type(exc).__name__}"
            ) from None
        return conn

    def _take(self, now: float) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport is None:
                continue
            if now - conn.idle_since > self._idle_timeout:
                conn.close()
                continue
            conn.reused = True
            return conn
        return None

    def _release(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        if self._closed or len(self._idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = conn._loop.time()
        idle = self._idle
        idle.append(conn)
        # Most-recent-first reuse leaves the oldest at the bottom: expire it lazily here.
        oldest = idle[0]
        if conn.idle_since - oldest.idle_since > self._idle_timeout:
            idle.pop(0)
            oldest.close()

    def _forget(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    @property
    def idle(self) -> int:
        """Connections waiting in the pool (for tests and debugging)."""
        return len(self._idle)

    async def close(self) -> None:
        """Close every connection, idle and busy (shutdown, after draining)."""
        self._closed = True
        conns = [*self._idle, *self._busy]
        self._idle.clear()
        self._busy.clear()
        for conn in conns:
            conn.close()
        # Let the transports deliver connection_lost before the loop goes away.
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)


def request_head(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]] | CIMultiDict[str],
    authority: str,
    *,
    chunked: bool,
) -> bytes:
    """The request line and header section as one buffer (one transport.write).

    `headers` are the filtered, injected headers: (name, value) pairs or a CIMultiDict. A CR
    or LF inside a name or value would let a value (say a JWT claim) inject a header or a
    second request (request splitting, CWE-113), so any such value refuses the request.
    """
    pairs = headers.items() if isinstance(headers, CIMultiDict) else headers
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    has_host = False
    for name, value in pairs:
        lines.append(f"{name}: {value}\r\n")
        if not has_host and len(name) == 4 and name.lower() == "host":
            has_host = True
    if not has_host:
        lines.append(f"Host: {authority}\r\n")
    if chunked:
        lines.append("Transfer-Encoding: chunked\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    expected = len(lines)
    if text.count("\n") != expected or text.count("\r") != expected:
        raise ValueError("CR or LF in a forwarded header")
    return text.encode("utf-8", "surrogateescape")
