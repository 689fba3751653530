"""The proxy port's connections: aiohttp's HTTP/1.1 protocol plus a request-head deadline, a
send deadline (--send-timeout), a drain that keeps its bound, and precise 400/414/431
answers to requests its parser refuses.

aiohttp itself has no header-read deadline: a client sending one byte a second (slowloris)
holds its connection until the keep-alive timer (75 s here) fires. And it answers every parse
failure with a text/plain 400, outside the handler, so no metric or audit line saw them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("rbac_proxy.proxy")

# The request target may be 8190 bytes (aiohttp's default line limit) and each header line
# (name and value) 8192. The two differ on purpose: aiohttp raises the same LineTooLong for
# both and only the limit it carries tells which one was exceeded (414 vs 431).
MAX_TARGET = 8190
MAX_FIELD = 8192
MAX_HEADERS = 128
# aiohttp has no exception type for "too many header lines": a plain BadHttpMessage with this
# text (aiohttp/_http_parser.pyx). If a release rewords it the answer falls back to 400: safe.
_TOO_MANY_HEADERS = "Too many headers received"


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client connection may cost before it sent a whole request head."""

    header_timeout: float  # seconds from the first byte of a head to its end; 0: no deadline
    send_timeout: float = 0.0  # seconds the answer may stay blocked on a non-reading client


# Called for each request the parser refused: (status, what was wrong, peer address).
OnMalformed = Callable[[int, str, str | None], web.StreamResponse]


def classify(exc: BaseException) -> tuple[int, str]:
    """A parse error → (status, a short header-free description) for the client and the logs."""
    if isinstance(exc, LineTooLong):
        if exc.args[1:2] == (MAX_TARGET,):
            return 414, f"request target longer than {MAX_TARGET} bytes"
        return 431, f"header line longer than {MAX_FIELD} bytes"
    if isinstance(exc, HttpProcessingError) and exc.message == _TOO_MANY_HEADERS:
        return 431, f"more than {MAX_HEADERS} header lines"
    # The parser's own text quotes the offending bytes (header values, tokens): never echo it.
    return 400, "malformed HTTP request"


class GuardedServer(web.Server):
    """web.Server whose connections are GuardedRequestHandlers."""

    def __init__(
        self,
        handler: Any,
        *,
        limits: Limits,
        on_malformed: OnMalformed,
        **kwargs: Any,
    ) -> None:
        kwargs.update(max_line_size=MAX_TARGET, max_field_size=MAX_FIELD, max_headers=MAX_HEADERS)
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.on_malformed = on_malformed

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


class GuardedRequestHandler(RequestHandler):
    """One client connection.

    The head deadline starts at the first byte received while the connection waits for a new
    request, and ends when the parser has a whole head. A connection that sends nothing is
    left to the keep-alive timer. Bytes of a pipelined head that arrive while a request is
    still being answered are bounded by that timer too, not by this deadline.
    """

    __slots__ = ("_head_deadline", "_limits", "_on_malformed", "_send_deadline", "_socket")

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = manager.limits
        self._on_malformed = manager.on_malformed
        self._head_deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        self._socket: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # aiohttp's force_close() forgets self.transport while unsent bytes may still wait
        # in it (an answer before a 408, a keep-alive expiry): --send-timeout needs this one.
        # (uvloop's transports are not asyncio.Transport subclasses; aiohttp casts too.)
        self._socket = cast(asyncio.Transport, transport)
        if self._limits.send_timeout > 0:
            # Pause (and arm the deadline) as soon as one byte cannot go to the socket. With
            # the default 64 KiB high-water mark the tail of an answer, or a whole small one,
            # could wait forever behind a full socket without ever pausing.
            self._socket.set_write_buffer_limits(high=0)

    def data_received(self, data: bytes) -> None:
        # Private aiohttp state, read only: `_waiter` is pending exactly while start() waits
        # for the next request, so bytes arriving then belong to a request head.
        waiting = self._waiter is not None and not self._waiter.done()
        if waiting and self._head_deadline is None and self._limits.header_timeout > 0:
            self._head_deadline = self._loop.call_later(
                self._limits.header_timeout, self._head_timed_out
            )
        super().data_received(data)
        if self._head_deadline is not None and (self._waiter is None or self._waiter.done()):
            self._head_deadline.cancel()  # a whole head arrived (or the connection closed)
            self._head_deadline = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None
        self._socket = None
        super().connection_lost(exc)

    # --send-timeout (like nginx's send_timeout). The transport pauses writing when bytes are
    # left that the client's full socket cannot take (high-water mark 0, see connection_made);
    # from then on every write of the answer waits. Flow control keeps memory bounded, but the
    # connection and its upstream request would be held for as long as the client stays
    # connected. A deadline armed only while paused costs nothing on the common path (no
    # timer per write) and covers every byte: relayed answers, the proxy's own, WebSocket
    # frames, the tail of an answer whose handler has already returned.
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._limits.send_timeout > 0 and self._send_deadline is None:
            self._send_deadline = self._loop.call_later(
                self._limits.send_timeout, self._send_timed_out
            )

    def resume_writing(self) -> None:
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None
        super().resume_writing()

    def _send_timed_out(self) -> None:
        self._send_deadline = None
        if self._socket is None:
            return
        log.debug("client read nothing for %ss: closing", self._limits.send_timeout)
        # The waiting write fails like a write to a client that left (the handler drops the
        # upstream request and audits 499); abort drops the unsent bytes at once.
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            self._drain_waiter = None
            waiter.set_exception(
                ConnectionResetError("client did not read the response within --send-timeout")
            )
        self._socket.abort()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        # aiohttp waits `timeout` for a running handler, then "cancels" its request (which
        # only fails a pending body read) and waits `timeout` again before cancelling the
        # handler itself: a stream, a slow upstream or a client that reads nothing held the
        # drain for twice --shutdown-timeout, past the supervisor's and Kubernetes' grace.
        # Here the handler is cancelled when the first wait ends (it audits the exchange as
        # cut, 499) and unsent bytes are dropped, so the drain keeps its documented bound.
        task = self._task_handler  # private aiohttp state, read only: the connection's task
        cut = None
        if timeout is not None and task is not None and not task.done():
            cut = self._loop.call_later(timeout, self._cut_for_shutdown)
        try:
            await super().shutdown(timeout)
        finally:
            if cut is not None:
                cut.cancel()

    def _cut_for_shutdown(self) -> None:
        task = self._task_handler
        if task is None or task.done():
            return
        log.debug("request still running when the drain ended: cut")
        task.cancel()
        if self._socket is not None and self._socket.get_write_buffer_size():
            self._socket.abort()

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._waiter is None or self._waiter.done() or self.transport is None:
            return
        peer = self.transport.get_extra_info("peername")
        log.debug("request head not complete within %ss from %s", self._limits.header_timeout, peer)
        resp = self._on_malformed(408, "request head not complete in time", _host(peer))
        # RFC 9110 §15.5.9: 408 then close; the client may retry on a new connection. No
        # request object exists yet, so the JSON answer is written to the socket as it is.
        body = resp.body if isinstance(resp, web.Response) and isinstance(resp.body, bytes) else b""
        head = "HTTP/1.1 408 Request Timeout\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in resp.headers.items()
        )
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        self.transport.write(head.encode("latin-1") + body)
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, ConnectionError):
            # The client left mid-response, or the proxy cut it (--send-timeout): nothing can
            # be sent and it is no server error (the handler counted and audited it). aiohttp
            # itself treats a ConnectionError from here as a premature disconnection.
            raise ConnectionError("client connection closed") from exc
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        code, what = classify(exc)
        log.debug("refused a malformed request from %s: %s", request.remote, what)
        resp = self._on_malformed(code, what, request.remote)
        resp.force_close()  # the parser lost the framing: nothing after this can be trusted
        return resp


def _host(peer: object) -> str | None:
    return str(peer[0]) if isinstance(peer, tuple) and peer else None
