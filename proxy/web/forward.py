"""Streams an authorized request to the upstream and the answer back (HTTP and WebSocket)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

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
    # False when two of the fields the proxy sets itself (X-Forwarded-*, Host, Content-Length
    # and the injected names) are the same header: then a later one replaces an earlier one,
    # as a CIMultiDict assignment would. Computed, never passed.
    distinct: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        names = [self.user, self.org, self.role, self.permission, self.request_id]
        names += ["X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Host"]
        names += ["Content-Length"]
        object.__setattr__(self, "distinct", len({n.lower() for n in names}) == len(names))


_NO_NAMES: frozenset[str] = frozenset()


# Only short Connection values are cached: a client may send ~128 header lines of 8 KiB,
# and a cache of such keys (and their token sets) held gigabytes for 256 hostile requests.
_CACHED_CONNECTION = 64


def _connection_names(values: tuple[str, ...]) -> frozenset[str]:
    return frozenset(
        normalize(token.strip()) for value in values for token in value.split(",") if token.strip()
    )


_cached_connection_names = functools.lru_cache(maxsize=256)(_connection_names)


def connection_names(values: tuple[str, ...]) -> frozenset[str]:
    """The header names a Connection header lists (RFC 9110 §7.6.1), normalized.

    Cached when short: a peer sends the same few values ("keep-alive") on every message.
    """
    if len(values) == 1 and len(values[0]) <= _CACHED_CONNECTION:
        return _cached_connection_names(values)
    return _connection_names(values)


def upstream_fields(
    incoming: CIMultiDictProxy[str],
    policy: HeaderPolicy,
    *,
    user: str | None,
    org: str | None,
    role: str | None,
    permission: str | None,
    request_id: str,
    peer: str | None,
    peer_trusted: bool,
    scheme: str,
    content_length: int | None = None,
) -> list[tuple[str, str]]:
    """The headers sent upstream: client headers minus hop-by-hop and spoofable ones.

    One pass over the client's headers that yields the final (name, value) list; the lean
    client serializes it as is, the aiohttp paths wrap it in a CIMultiDict.

    The body's framing is the proxy's, never copied: `content_length` is the length aiohttp's
    parser framed the client body with (None: no body, or a chunked one, re-chunked upstream).
    A client `Connection: Content-Length` once removed the copied header while the body still
    went upstream unframed, where the backend read it as a second request (smuggling).
    """
    connection = incoming.getall("Connection", None)
    named_by_connection = connection_names(tuple(connection)) if connection else _NO_NAMES
    stripped = policy.stripped
    out: list[tuple[str, str]] = []
    xff: list[str] = []
    xf_proto: str | None = None
    xf_host: str | None = None
    for name, value in incoming.items():
        key = name.lower()
        if "_" in key:
            key = key.replace("_", "-")  # normalize(): `_` read as `-` (CGI/WSGI)
        if (
            key in stripped
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
                    out.append((name, value))
            continue
        out.append((name, value))
    # The fields we set ourselves. No client header can share their names (stripped above),
    # so appending is what assignment would do, unless two of them share a name.
    ours: list[tuple[str, str]] = []
    if peer is not None:
        xff.append(peer)
    if xff:
        ours.append(("X-Forwarded-For", ", ".join(xff)))
    ours.append(("X-Forwarded-Proto", xf_proto or scheme))
    host = xf_host or incoming.get("Host")
    if host:
        ours.append(("X-Forwarded-Host", host))
    if user is not None:
        ours.append((policy.user, user))
    if org is not None:
        ours.append((policy.org, org))
    if role is not None:
        ours.append((policy.role, role))
    if permission is not None:
        ours.append((policy.permission, permission))
    ours.append((policy.request_id, request_id))
    if content_length is not None:
        ours.append(("Content-Length", str(content_length)))
    if policy.distinct:
        out += ours
        return out
    merged: CIMultiDict[str] = CIMultiDict(out)
    for name, value in ours:
        merged[name] = value
    return list(merged.items())


def upstream_headers(
    incoming: CIMultiDictProxy[str],
    policy: HeaderPolicy,
    *,
    user: str | None,
    org: str | None,
    role: str | None,
    permission: str | None,
    request_id: str,
    peer: str | None,
    peer_trusted: bool,
    scheme: str,
    content_length: int | None = None,
) -> CIMultiDict[str]:
    """upstream_fields as a CIMultiDict (the aiohttp client paths)."""
    return CIMultiDict(
        upstream_fields(
            incoming,
            policy,
            user=user,
            org=org,
            role=role,
            permission=permission,
            request_id=request_id,
            peer=peer,
            peer_trusted=peer_trusted,
            scheme=scheme,
            content_length=content_length,
        )
    )


def relayed_response_headers(upstream: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """The upstream's response headers minus hop-by-hop ones and those its Connection names."""
    connection = upstream.getall("Connection", None)
    named = connection_names(tuple(connection)) if connection else _NO_NAMES
    kept: list[tuple[str, str]] = []
    for name, value in upstream.items():
        key = name.lower()
        if "_" in key:
            key = key.replace("_", "-")
        if key in HOP_BY_HOP or key in named:
            continue
        if _UNRELAYABLE.search(value) is not None:
            raise UpstreamError("connect", "upstream response header cannot be relayed as sent")
        kept.append((name, value))
    return kept


def response_headers(upstream: CIMultiDictProxy[str], into: CIMultiDict[str]) -> None:
    for name, value in relayed_response_headers(upstream):
        into.add(name, value)


def _reason(reason: str | None) -> str | None:
    """The upstream's reason phrase, or aiohttp's standard one when it cannot be relayed."""
    return reason if reason and _UNRELAYABLE.search(reason) is None else None


# Control characters aiohttp refuses in a header section (it raises ValueError); CR and LF
# are counted separately in _whole_answer.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _whole_answer(
    request: web.BaseRequest,
    status: int,
    reason: str,
    headers: CIMultiDictProxy[str],
    body: bytes,
    extra: Iterable[tuple[str, str]],
) -> bytes | None:
    """The exact bytes aiohttp would send for a complete relayed answer, or None.

    Only for the common case, where aiohttp's own header step (StreamResponse._prepare_headers)
    adds and removes nothing: an HTTP/1.1 keep-alive request, a body framed by one exact
    Content-Length, Date from the upstream (a missing Server stays missing), ASCII only.
    Everything else (and any control character, which aiohttp refuses) returns None and takes
    the StreamResponse path.
    """
    if not reason or request.version != HttpVersion11 or not request.keep_alive:
        return None
    lengths = headers.getall(hdrs.CONTENT_LENGTH, ())
    if len(lengths) != 1 or lengths[0] != str(len(body)):
        return None
    if hdrs.DATE not in headers:
        return None
    # `response.headers[name] = value` semantics: replaces the first header of that name in
    # place (drops any further ones), else appends.
    ours = {name.lower(): f"{name}: {value}\r\n" for name, value in extra}
    placed: set[str] = set()
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    for name, value in relayed_response_headers(headers):
        lower = name.lower()
        if lower in ours:
            if lower not in placed:
                placed.add(lower)
                lines.append(ours[lower])
            continue
        lines.append(f"{name}: {value}\r\n")
    for lower, line in ours.items():
        if lower not in placed:
            lines.append(line)
    lines.append("\r\n")
    text = "".join(lines)
    expected = len(lines)
    if (
        not text.isascii()
        or text.count("\r") != expected
        or text.count("\n") != expected
        or _CONTROL.search(text) is not None
    ):
        return None
    return text.encode("ascii") + body


class _SentResponse(web.StreamResponse):
    """An answer already written whole (see _whole_answer); aiohttp has nothing left to do."""

    @property
    def keep_alive(self) -> bool:
        return True  # _whole_answer only applies to keep-alive requests

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes | bytearray | memoryview = b"") -> None:
        return None


class _RelayedResponse(web.StreamResponse):
    """A StreamResponse that adds no Content-Type or Server the upstream did not send.

    aiohttp defaults a body without Content-Type to application/octet-stream. RFC 9110 §8.3
    leaves a missing type to the recipient (a browser sniffs it; octet-stream would force a
    download), so the proxy passes the absence on. `_prepare_headers` is aiohttp's (≥ 3.9)
    internal header step; tests/web/test_forwarding.py catches it changing.
    """

    async def _prepare_headers(self) -> None:
        typed = hdrs.CONTENT_TYPE in self.headers
        served = hdrs.SERVER in self.headers
        await super()._prepare_headers()
        if not typed:
            self.headers.popall(hdrs.CONTENT_TYPE, None)
        if not served:
            # aiohttp would add "Server: Python/3.x aiohttp/3.y": the backend never said that,
            # and exact versions only help someone looking for a known CVE.
            self.headers.popall(hdrs.SERVER, None)


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
    except (ConnectionError, asyncio.CancelledError):
        # First: a write to a client that left raises ClientConnectionResetError, which is a
        # ClientError too and was miscounted as a broken upstream. A cancelled handler (the
        # client left while the proxy waited) must not hand a half-read answer back either.
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
    headers: list[tuple[str, str]],
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
    chunked = body is not None and not any(name == "Content-Length" for name, _ in headers)
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
    data = reader.read_nowait(-1) if whole and with_body else b""
    clean = False
    try:
        answer = (
            _whole_answer(
                request,
                upstream.status,
                upstream.reason,
                upstream.headers,
                data,
                extra_response_headers,
            )
            if data
            else None
        )
        if answer is not None:
            # The common small answer: head and body in one write, no StreamResponse work.
            # The upstream answer is complete, so its connection goes back to the pool
            # whatever the client then does (it may leave, or be cut by --send-timeout).
            clean = True
            await request.writer.write_eof(answer)
            return _SentResponse(status=upstream.status, reason=upstream.reason), to_headers
        response = (_WholeRelayedResponse if whole else _RelayedResponse)(
            status=upstream.status, reason=_reason(upstream.reason)
        )
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
            clean = True  # as above: the upstream side is done
            await response.write_eof(data)
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
        # Reused only once the upstream answer was read whole; a client that left while it
        # streamed (ConnectionError, cancellation) or a failure drops the upstream connection.
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
