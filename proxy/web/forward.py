"""Streams an authorized request to the upstream and the answer back (HTTP and WebSocket)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from aiohttp import ClientSession, ClientWebSocketResponse, HttpVersion11, WSMsgType, hdrs, web
from aiohttp.client_exceptions import (
    ClientConnectionError,
    ClientConnectorError,
    ClientError,
    ClientResponseError,
    ServerDisconnectedError,
    WSServerHandshakeError,
)
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.web.upstream import BodyBroken, UpstreamFailure, UpstreamPool, request_head

# RFC 9110 §7.6.1: connection-specific fields never cross a proxy; plus the legacy
# Proxy-Connection and Keep-Alive, and Proxy-Authorization meant for us, not the backend.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "expect",  # we answer 100-continue ourselves after authorizing
    }
)
# Rewrite/override headers that let a client make the backend route or dispatch differently
# from what we authorized (path confusion à la CVE-2018-14773 Symfony X-Original-URL, and
# method override smuggling).
ALWAYS_STRIPPED = frozenset(
    {
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-uri",
    }
)
# Headers through which a proxy vouches for the original client; honoured from trusted peers
# only, like X-Forwarded-* (backends read them for IP allow-lists and rate limits).
CLIENT_IP_HEADERS = frozenset(
    {
        "forwarded",
        "x-real-ip",
        "true-client-ip",
        "x-client-ip",
        "cf-connecting-ip",
        "x-cluster-client-ip",
        "fastly-client-ip",
    }
)
CHUNK = 64 * 1024
# What aiohttp's header writer cannot relay byte for byte: controls (it raises, a 500) and
# lone surrogates, i.e. upstream bytes that are not UTF-8 (its C writer silently DROPS them,
# turning `Location: /\xff/evil.example` into `//evil.example`). Such a response is a 502.
_UNRELAYABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")


class UpstreamError(Exception):
    """The upstream could not be reached (`kind` = connect) or did not answer (timeout)."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class BrokenUpstream(Exception):
    """The upstream failed after the response started; `response` is what the client got."""

    def __init__(self, response: web.StreamResponse, message: str) -> None:
        self.response = response
        super().__init__(message)


def normalize(name: str) -> str:
    """Header identity as backends see it: case-insensitive, and `_` read as `-` (CGI/WSGI)."""
    return name.lower().replace("_", "-")


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    """What to strip and inject; built once from Settings."""

    stripped: frozenset[str]  # normalized names removed from every client request
    user: str
    org: str
    role: str
    permission: str
    request_id: str


@dataclass(frozen=True, slots=True)
class Injected:
    user: str | None
    org: str | None
    role: str | None
    permission: str | None
    request_id: str


def upstream_headers(
    incoming: CIMultiDictProxy[str],
    policy: HeaderPolicy,
    injected: Injected,
    *,
    peer: str | None,
    peer_trusted: bool,
    scheme: str,
    content_length: int | None = None,
) -> CIMultiDict[str]:
    """The headers sent upstream: client headers minus hop-by-hop and spoofable ones.

    The body's framing is the proxy's, never copied: `content_length` is the length aiohttp's
    parser framed the client body with (None: no body, or a chunked one, re-chunked upstream).
    A client `Connection: Content-Length` once removed the copied header while the body still
    went upstream unframed, where the backend read it as a second request (smuggling).
    """
    named_by_connection = {
        normalize(token.strip())
        for value in incoming.getall("Connection", ())
        for token in value.split(",")
        if token.strip()
    }
    out: CIMultiDict[str] = CIMultiDict()
    xff: list[str] = []
    xf_proto: str | None = None
    xf_host: str | None = None
    for name, value in incoming.items():
        key = normalize(name)
        if (
            key in policy.stripped
            or key in HOP_BY_HOP
            or key in named_by_connection
            or key == "content-length"
        ):
            continue
        if key in CLIENT_IP_HEADERS or key.startswith("x-forwarded-"):
            # Only a trusted proxy in front of us may speak for the original client, and only
            # in the standard spelling: an `X_Forwarded_Host` that a front proxy passed
            # through untouched is the client's, not the proxy's.
            if peer_trusted and "_" not in name:
                if key == "x-forwarded-for":
                    xff.append(value)
                elif key == "x-forwarded-proto":
                    xf_proto = xf_proto or value  # the first copy: duplicates are suspect
                elif key == "x-forwarded-host":
                    xf_host = xf_host or value
                else:
                    out.add(name, value)
            continue
        out.add(name, value)
    if peer is not None:
        xff.append(peer)
    if xff:
        out["X-Forwarded-For"] = ", ".join(xff)
    out["X-Forwarded-Proto"] = xf_proto or scheme
    host = xf_host or incoming.get("Host")
    if host:
        out["X-Forwarded-Host"] = host
    if injected.user is not None:
        out[policy.user] = injected.user
    if injected.org is not None:
        out[policy.org] = injected.org
    if injected.role is not None:
        out[policy.role] = injected.role
    if injected.permission is not None:
        out[policy.permission] = injected.permission
    out[policy.request_id] = injected.request_id
    if content_length is not None:
        out["Content-Length"] = str(content_length)
    return out


def response_headers(upstream: CIMultiDictProxy[str], into: CIMultiDict[str]) -> None:
    named = {normalize(t.strip()) for v in upstream.getall("Connection", ()) for t in v.split(",")}
    for name, value in upstream.items():
        key = normalize(name)
        if key in HOP_BY_HOP or key in named:
            continue
        if _UNRELAYABLE.search(value) is not None:
            raise UpstreamError("connect", "upstream response header cannot be relayed as sent")
        into.add(name, value)


def _reason(reason: str | None) -> str | None:
    """The upstream's reason phrase, or aiohttp's standard one when it cannot be relayed."""
    return reason if reason and _UNRELAYABLE.search(reason) is None else None


class _RelayedResponse(web.StreamResponse):
    """A StreamResponse that adds no Content-Type the upstream did not send.

    aiohttp defaults a body without Content-Type to application/octet-stream. RFC 9110 §8.3
    leaves a missing type to the recipient (a browser sniffs it; octet-stream would force a
    download), so the proxy passes the absence on. `_prepare_headers` is aiohttp's (≥ 3.9)
    internal header step; tests/web/test_forwarding.py catches it changing.
    """

    async def _prepare_headers(self) -> None:
        typed = hdrs.CONTENT_TYPE in self.headers
        await super()._prepare_headers()
        if not typed:
            self.headers.popall(hdrs.CONTENT_TYPE, None)


class _WholeRelayedResponse(_RelayedResponse):
    """A relayed response whose body is already here: the head waits for it (one write)."""

    _send_headers_immediately = False


class BodyStalled(Exception):
    """The client left its request body idle longer than --body-timeout."""


class ClientBody:
    """The client's request body, streamed (never request.read(): a 1 GiB upload stays in
    bounded memory), with a deadline on each read (--body-timeout, like nginx's
    client_body_timeout). Without it a client that starts a body and stops holds an upstream
    connection for as long as it likes, on a public route without even an identity."""

    __slots__ = ("_idle", "_request", "stalled")

    def __init__(self, request: web.BaseRequest, idle: float) -> None:
        self._request = request
        self._idle = idle if idle > 0 else None
        self.stalled = False

    async def chunks(self, on_end: Callable[[], None] | None = None) -> AsyncIterator[bytes]:
        content = self._request.content
        while True:
            try:
                async with asyncio.timeout(self._idle):
                    chunk = await content.read(CHUNK)
            except TimeoutError:
                self.stalled = True
                raise BodyStalled("request body idle longer than --body-timeout") from None
            if not chunk:
                break
            yield chunk
        if on_end is not None:
            on_end()

    def failure(self, error: UpstreamError) -> Exception:
        """What an upstream failure really was: the client's stall, if it stalled."""
        return BodyStalled(str(error)) if self.stalled else error


async def forward_http(
    request: web.BaseRequest,
    session: ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    *,
    upstream_timeout: float,
    body_timeout: float,
    extra_response_headers: Iterable[tuple[str, str]],
) -> tuple[web.StreamResponse, float]:
    """Send upstream and stream the answer back. Returns the response and time-to-headers.

    Raises UpstreamError (or BodyStalled) before anything was sent to the client; after that,
    failures abort the client connection (the status line is already out).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    body = ClientBody(request, body_timeout) if request.body_exists else None
    try:
        # The timeout covers only the wait for response headers: a long download or a
        # Server-Sent Events stream may legitimately last longer, and so may an upload (the
        # clock starts once the body is sent).
        async with asyncio.timeout(None if body else upstream_timeout) as limit:
            data = (
                body.chunks(lambda: limit.reschedule(loop.time() + upstream_timeout))
                if body
                else None
            )
            upstream = await session.request(
                request.method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                compress=None,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            )
    except TimeoutError:
        error = UpstreamError("timeout", "upstream did not answer in time")
        raise (body.failure(error) if body else error) from None
    except (ClientConnectorError, ServerDisconnectedError, ClientConnectionError) as exc:
        error = UpstreamError("connect", f"upstream unavailable: {type(exc).__name__}")
        raise (body.failure(error) if body else error) from None
    except (ClientResponseError, ClientError) as exc:
        error = UpstreamError("connect", f"upstream error: {type(exc).__name__}")
        raise (body.failure(error) if body else error) from None
    to_headers = loop.time() - started
    try:
        response = _RelayedResponse(status=upstream.status, reason=_reason(upstream.reason))
        try:
            response_headers(upstream.headers, response.headers)
        except UpstreamError:
            upstream.close()
            raise
        for name, value in extra_response_headers:
            response.headers[name] = value
        # An HTTP/1.0 client cannot take chunks (aiohttp raises): without a length, aiohttp
        # chunks for 1.1 by itself and sends 1.0 a close-delimited body.
        if (
            "Content-Length" not in upstream.headers
            and request.method != "HEAD"
            and request.version >= HttpVersion11
        ):
            response.enable_chunked_encoding()
        await response.prepare(request)
        if request.method != "HEAD" and upstream.status not in (204, 304):
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        await response.write_eof()
    except ConnectionError:
        # First: a write to a client that left raises ClientConnectionResetError, which is a
        # ClientError too and was miscounted as a broken upstream.
        upstream.close()  # the client left: drop the upstream request too
        raise
    except (ClientError, asyncio.IncompleteReadError) as exc:
        # The upstream broke mid-stream: the status line is out, so the only honest signal
        # left is to cut the client connection (never a clean, truncated body).
        upstream.close()
        if request.transport is not None:
            request.transport.close()
        raise BrokenUpstream(response, type(exc).__name__) from None
    finally:
        upstream.release()
    return response, to_headers


async def forward_lean(
    request: web.BaseRequest,
    pool: UpstreamPool,
    target: str,
    headers: CIMultiDict[str],
    *,
    upstream_timeout: float,
    body_timeout: float,
    extra_response_headers: Iterable[tuple[str, str]],
) -> tuple[web.StreamResponse, float]:
    """forward_http over the lean pool (proxy/web/upstream.py): same contract, less work.

    `target` is the canonical path plus the original query, sent as the request-target.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    method = request.method
    body = ClientBody(request, body_timeout) if request.body_exists else None
    # A client body without Content-Length came chunked (its Transfer-Encoding is hop-by-hop
    # and was dropped): re-chunk it for the upstream, streaming.
    chunked = body is not None and hdrs.CONTENT_LENGTH not in headers
    try:
        head = request_head(method, target, headers, pool.authority, chunked=chunked)
    except ValueError as exc:
        raise UpstreamError("connect", str(exc)) from None
    try:
        upstream = await pool.request(
            method, head, body.chunks() if body else None, chunked=chunked, timeout=upstream_timeout
        )
    except UpstreamFailure as exc:
        error = UpstreamError(exc.kind, str(exc))
        raise (body.failure(error) if body else error) from None
    to_headers = loop.time() - started
    reader = upstream.body
    with_body = method != "HEAD" and upstream.status not in (204, 304)
    # A small answer is usually complete by now: head and body then leave in one write.
    # Anything still arriving (downloads, SSE) gets its head at once and streams.
    whole = not with_body or reader.is_eof()
    response = (_WholeRelayedResponse if whole else _RelayedResponse)(
        status=upstream.status, reason=_reason(upstream.reason)
    )
    clean = False
    try:
        response_headers(upstream.headers, response.headers)
        for name, value in extra_response_headers:
            response.headers[name] = value
        if (
            hdrs.CONTENT_LENGTH not in upstream.headers
            and method != "HEAD"
            and request.version >= HttpVersion11
        ):
            response.enable_chunked_encoding()
        await response.prepare(request)
        if whole:
            await response.write_eof(reader.read_nowait(-1) if with_body else b"")
        else:
            while chunk := await reader.readany():
                await response.write(chunk)
            await response.write_eof()
        clean = True
    except BodyBroken as exc:
        # As in forward_http: the status line is out, so cut the client connection.
        if request.transport is not None:
            request.transport.close()
        raise BrokenUpstream(response, f"upstream body: {exc}") from None
    finally:
        # Reused only after a clean, complete exchange; a client that left (ConnectionError,
        # cancellation) or a failure drops the upstream connection too.
        if clean:
            upstream.release()
        else:
            upstream.close()
    return response, to_headers


async def forward_websocket(
    request: web.BaseRequest,
    session: ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    *,
    upstream_timeout: float,
    extra_response_headers: Iterable[tuple[str, str]],
) -> tuple[web.StreamResponse, float]:
    """Bridge a WebSocket: handshake upstream first (so a refusal is a clean 502), then pump."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    for name in list(headers):
        if normalize(name).startswith("sec-websocket-"):
            del headers[name]
    protocols = [
        p.strip()
        for v in request.headers.getall("Sec-WebSocket-Protocol", ())
        for p in v.split(",")
        if p.strip()
    ]
    try:
        async with asyncio.timeout(upstream_timeout):
            upstream = await session.ws_connect(
                url, headers=headers, protocols=protocols, autoclose=False, autoping=True
            )
    except TimeoutError:
        raise UpstreamError("timeout", "upstream did not answer in time") from None
    except (WSServerHandshakeError, ClientError) as exc:
        raise UpstreamError(
            "connect", f"upstream WebSocket refused: {type(exc).__name__}"
        ) from None
    to_headers = loop.time() - started
    client = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        autoclose=False,
        autoping=True,
        # The upstream side is uncompressed (ws_connect's default): compressing only towards
        # the client would cost the proxy CPU on every frame for nothing it was asked to do.
        compress=False,
    )
    for name, value in extra_response_headers:
        client.headers[name] = value
    try:
        await client.prepare(request)
        await _bridge(client, upstream)
    finally:
        await upstream.close()
    return client, to_headers


async def _bridge(client: web.WebSocketResponse, upstream: ClientWebSocketResponse) -> None:
    async def pump(
        src: web.WebSocketResponse | ClientWebSocketResponse,
        dst: web.WebSocketResponse | ClientWebSocketResponse,
    ) -> None:
        async for msg in src:
            if msg.type is WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type is WSMsgType.ERROR:
                break
        # src closed: pass its close code on (RFC 6455 §7.4), then finish our side.
        code = src.close_code if src.close_code is not None else 1000
        with contextlib.suppress(Exception):
            await dst.close(code=code)
        with contextlib.suppress(Exception):
            await src.close(code=code)

    tasks = [
        asyncio.create_task(pump(client, upstream)),
        asyncio.create_task(pump(upstream, client)),
    ]
    try:
        _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            await asyncio.wait_for(asyncio.shield(task), timeout=5)
    except TimeoutError:
        pass
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
