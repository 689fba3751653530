"""Request smuggling and framing (issue 7, item 3): raw bytes against a real proxy.

Every case is one raw write on a fresh connection to rbac-proxy in front of the Recorder. The
assertion that matters: a second or injected request never reaches the backend as a request.
Each case is either refused by the proxy itself (a 4xx/5xx answer or a closed connection) with
nothing recorded, or forwarded as exactly the listed requests (method, canonical target, body,
the injected X-Auth-User) with no framing the Recorder could not parse. After every case a new
connection must still get a 200 (the proxy never crashes).

`llhttp:` in each case notes what aiohttp's C parser (llhttp, strict mode) does with it; most
framing tricks die there with a 400 and a closed connection before the handler runs.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import pytest

from tests.security.harness import Recorder, parse_statuses, request, send_raw
from tests.web.conftest import Proxy, StartProxy

WORKFLOWS = b"/api/projects/proj-prod/workflows"  # POST: workflows:create (alice, bob)
PROJECTS = b"/api/projects"  # GET: authenticated
LIVE = b"/api/projects/proj-prod/task-history/live"  # GET, websocket: true (task_history:read)

# Targets no case may ever deliver to the backend: sue (support) may not read billing, and
# nobody in these cases may delete a project. A smuggled request uses one of them.
NEVER = {b"/api/org/billing", b"/api/projects/proj-prod"}

# The proxy must deny this one if it parses it as a request (sue lacks billing:read) ...
DENIED = b"GET /api/org/billing HTTP/1.1\r\nHost: x\r\nX-User-Id: sue\r\nConnection: close\r\n\r\n"
# ... and this one carries forged identity headers: only harmful if it reaches the backend raw.
FORGED = (
    b"DELETE /api/projects/proj-prod HTTP/1.1\r\nHost: x\r\nX-Auth-User: alice\r\n"
    b"X-Auth-Org: acme\r\nX-Auth-Role: admin\r\nContent-Length: 0\r\n\r\n"
)
HELLO = b"5\r\nhello\r\n0\r\n\r\n"  # "hello", chunked
WS = [
    b"Upgrade: websocket",
    b"Connection: Upgrade",
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    b"Sec-WebSocket-Version: 13",
]
# A client text frame "hello" masked with key 01 02 03 04 (RFC 6455 §5.3).
MASKED_HELLO_FRAME = b"\x81\x85\x01\x02\x03\x04" + bytes(
    b ^ k for b, k in zip(b"hello", b"\x01\x02\x03\x04\x01\x02\x03\x04\x01", strict=False)
)
# What the proxy may answer by itself when it refuses a request.
REFUSALS = {400, 401, 403, 404, 405, 408, 411, 413, 414, 417, 431, 501, 505}


def raw(
    method: bytes,
    target: bytes,
    headers: list[bytes],
    body: bytes = b"",
    *,
    user: bytes | None = b"alice",
    version: bytes = b"HTTP/1.1",
    close: bool = True,
) -> bytes:
    """Exact bytes: request line, Host, X-User-Id, the given lines, optional close, body."""
    lines = [method + b" " + target + b" " + version, b"Host: dash.example"]
    if user is not None:
        lines.append(b"X-User-Id: " + user)
    lines += headers
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def post(headers: list[bytes], body: bytes, *, user: bytes = b"alice", close: bool = True) -> bytes:
    return raw(b"POST", WORKFLOWS, headers, body, user=user, close=close)


def te(body: bytes = HELLO, *extra: bytes, user: bytes = b"alice", close: bool = True) -> bytes:
    return post([b"Transfer-Encoding: chunked", *extra], body, user=user, close=close)


@dataclass(frozen=True)
class Fwd:
    """One request the backend must receive: method, canonical target, body, X-Auth-User."""

    method: bytes
    target: bytes
    body: bytes = b""
    user: bytes = b"alice"


@dataclass(frozen=True)
class Case:
    id: str
    cls: str
    raw: bytes
    llhttp: str  # what aiohttp's parser does with it
    # None: must be refused, nothing recorded. Else exactly these reach the backend.
    forwards: tuple[Fwd, ...] | None = None
    statuses: tuple[int, ...] = (200,)  # the final statuses of a forwarded case, in order
    # True: refused-with-nothing-recorded is acceptable too (the proxy may tighten later).
    either: bool = False


HELLO_POST = (Fwd(b"POST", WORKFLOWS, b"hello"),)

CASES = [
    # --- CL and TE together (RFC 9112 §6.1: a server ought to treat it as an error) ---------
    Case(
        "cl-te",
        "cl+te",
        post([b"Content-Length: 6", b"Transfer-Encoding: chunked"], b"0\r\n\r\nG"),
        "400 Transfer-Encoding can't be present with Content-Length",
    ),
    Case(
        "te-cl",
        "cl+te",
        post([b"Transfer-Encoding: chunked", b"Content-Length: 3"], HELLO),
        "400 Content-Length can't be present with Transfer-Encoding",
    ),
    Case(
        "cl-te-classic-smuggle",
        "cl+te",
        post(
            [b"Content-Length: %d" % (5 + len(DENIED)), b"Transfer-Encoding: chunked"],
            b"0\r\n\r\n" + DENIED,
            close=False,
        ),
        "400: the CL.TE prefix never gets a framing to disagree about",
    ),
    Case(
        "te-cl-classic-smuggle",
        "cl+te",
        post(
            [b"Transfer-Encoding: chunked", b"Content-Length: 4"],
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(FORGED), FORGED),
            close=False,
        ),
        "400: TE.CL refused the same way",
    ),
    # --- obfuscated Transfer-Encoding ----------------------------------------------------------
    Case(
        "te-xchunked-with-cl",
        "obfuscated-te",
        post([b"Transfer-Encoding: xchunked", b"Content-Length: 5"], b"hello"),
        "400 (any TE with CL)",
    ),
    Case(
        "te-xchunked",
        "obfuscated-te",
        post([b"Transfer-Encoding: xchunked"], b"hello"),
        "400: a request TE whose final coding is not chunked has no length",
    ),
    Case(
        "te-extra-space",
        "obfuscated-te",
        post([b"Transfer-Encoding:  chunked"], HELLO),
        "accepted: leading OWS is legal (RFC 9110 §5.5), framed as chunked",
        forwards=HELLO_POST,
    ),
    Case(
        "te-chunked-identity",
        "obfuscated-te",
        post([b"Transfer-Encoding: chunked, identity"], HELLO),
        "400 Invalid Transfer-Encoding (chunked must be last)",
    ),
    Case(
        "te-tab",
        "obfuscated-te",
        post([b"Transfer-Encoding:\tchunked"], HELLO),
        "accepted: HTAB is OWS, framed as chunked",
        forwards=HELLO_POST,
    ),
    Case(
        "te-space-before-colon",
        "obfuscated-te",
        post([b"Transfer-Encoding : chunked"], HELLO),
        "400 Invalid header field char (RFC 9112 §5.1)",
    ),
    Case(
        "te-duplicate-spellings",
        "obfuscated-te",
        post([b"Transfer-encoding: chunked", b"Transfer-Encoding: chunked"], HELLO),
        "400: two chunked codings",
    ),
    Case(
        "te-duplicate-identity-then-chunked",
        "obfuscated-te",
        post([b"Transfer-Encoding: identity", b"Transfer-Encoding: chunked"], HELLO),
        "400 Duplicate Transfer-Encoding",
    ),
    Case(
        "te-vertical-tab",
        "obfuscated-te",
        post([b"Transfer-Encoding:\x0bchunked"], HELLO),
        "400 Invalid header value char",
    ),
    Case(
        "te-quoted",
        "obfuscated-te",
        post([b'Transfer-Encoding: "chunked"'], HELLO),
        "400 invalid Transfer-Encoding",
    ),
    Case(
        "te-chunked-twice-in-list",
        "obfuscated-te",
        post([b"Transfer-Encoding: chunked, chunked"], HELLO),
        "400",
    ),
    Case(
        "te-chunked-with-parameter",
        "obfuscated-te",
        post([b"Transfer-Encoding: chunked;q=1"], HELLO),
        "400",
    ),
    Case(
        "te-empty",
        "obfuscated-te",
        post([b"Transfer-Encoding: "], b"hello"),
        "400",
    ),
    Case(
        "te-upper-case",
        "obfuscated-te",
        post([b"Transfer-Encoding: CHUNKED"], HELLO),
        "accepted: codings are case-insensitive",
        forwards=HELLO_POST,
    ),
    Case(
        "te-gzip-chunked",
        "obfuscated-te",
        post([b"Transfer-Encoding: gzip, chunked"], HELLO),
        "accepted as chunked by llhttp, which never decodes gzip; the proxy answers 501",
    ),
    Case(
        "te-identity-chunked",
        "obfuscated-te",
        post([b"Transfer-Encoding: identity, chunked"], HELLO),
        "accepted as chunked by llhttp; the proxy answers 501 (only plain chunked is relayed)",
    ),
    Case(
        "te-split-gzip-then-chunked",
        "obfuscated-te",
        post([b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"], HELLO),
        "refused: two Transfer-Encoding lines",
    ),
    # --- Content-Length ------------------------------------------------------------------------
    Case(
        "cl-duplicate-same",
        "content-length",
        post([b"Content-Length: 5", b"Content-Length: 5"], b"hello"),
        "400 Duplicate Content-Length (even with equal values)",
    ),
    Case(
        "cl-duplicate-different",
        "content-length",
        post([b"Content-Length: 5", b"Content-Length: %d" % (5 + len(FORGED))], b"hello" + FORGED),
        "400 Duplicate Content-Length",
    ),
    Case(
        "cl-list",
        "content-length",
        post([b"Content-Length: 5, 5"], b"hello"),
        "400 Invalid character in Content-Length",
    ),
    Case(
        "cl-negative",
        "content-length",
        post([b"Content-Length: -1"], b"hello"),
        "400 Invalid character in Content-Length",
    ),
    Case(
        "cl-plus",
        "content-length",
        post([b"Content-Length: +5"], b"hello"),
        "400 Invalid character in Content-Length",
    ),
    Case(
        "cl-hex",
        "content-length",
        post([b"Content-Length: 0x5"], b"hello"),
        "400 Invalid character in Content-Length",
    ),
    Case(
        "cl-overflow",
        "content-length",
        post([b"Content-Length: %d" % (2**64 + 5)], b"hello"),
        "400 Content-Length overflow",
    ),
    Case(
        "cl-empty",
        "content-length",
        post([b"Content-Length: "], b"hello"),
        "400",
    ),
    Case(
        "cl-leading-zeros",
        "content-length",
        post([b"Content-Length: 005"], b"hello"),
        "accepted: 1*DIGIT, length 5",
        forwards=HELLO_POST,
    ),
    # --- bare CR and bare LF -------------------------------------------------------------------
    Case(
        "bare-lf-everywhere",
        "line-endings",
        b"GET /api/projects HTTP/1.1\nHost: x\nX-User-Id: alice\n\n",
        "400 Expected CRLF after version (lenient line endings are off)",
    ),
    Case(
        "bare-cr-everywhere",
        "line-endings",
        b"GET /api/projects HTTP/1.1\rHost: x\rX-User-Id: alice\r\r",
        "400 Expected CRLF after version",
    ),
    Case(
        "bare-cr-hides-header",
        "line-endings",
        raw(b"GET", b"/api/org/billing", [b"X-Foo: a\rX-User-Id: alice"], user=b"sue"),
        "400 Missing expected LF after header value",
    ),
    Case(
        "bare-lf-hides-content-length",
        "line-endings",
        raw(b"GET", PROJECTS, [b"X-A: b\nContent-Length: %d" % len(FORGED)], FORGED),
        "400 Missing expected CR after header value",
    ),
    Case(
        "bare-lf-in-chunked-body",
        "line-endings",
        te(b"5\nhello\n0\n\n"),
        "400 Missing expected CR after chunk size",
    ),
    # --- obs-fold (RFC 9112 §5.2: reject or replace with SP) ------------------------------------
    Case(
        "obs-fold-plain-header",
        "obs-fold",
        raw(b"GET", PROJECTS, [b"X-Note: a", b" b"]),
        "400 Unexpected whitespace after header value",
    ),
    Case(
        "obs-fold-transfer-encoding",
        "obs-fold",
        post([b"Transfer-Encoding:", b" chunked"], HELLO),
        "400 Invalid header value char",
    ),
    Case(
        "obs-fold-user-header",
        "obs-fold",
        raw(b"GET", b"/api/org/billing", [b" alice"], user=b"sue"),
        "400: the fold never extends X-User-Id to 'sue alice'",
    ),
    # --- chunk extensions ----------------------------------------------------------------------
    Case(
        "chunk-extension",
        "chunk-extension",
        te(b"5;ext=x\r\nhello\r\n0\r\n\r\n"),
        "accepted and dropped (the proxy re-chunks)",
        forwards=HELLO_POST,
    ),
    Case(
        "chunk-extension-bare-cr",
        "chunk-extension",
        te(b"5;ext=x\rX\r\nhello\r\n0\r\n\r\n"),
        "400 Expected LF after chunk size",
    ),
    Case(
        "chunk-extension-bare-lf",
        "chunk-extension",
        te(b"5;ext=x\nhello\r\n0\r\n\r\n"),
        "400 Missing expected CR after chunk extension value",
    ),
    Case(
        "chunk-extension-quoted-crlf",
        "chunk-extension",
        te(b'5;ext="a\r\nb"\r\nhello\r\n0\r\n\r\n'),
        "400 Invalid character in chunk extensions quoted value",
    ),
    Case(
        "chunk-extension-long",
        "chunk-extension",
        te(b"5;ext=" + b"x" * 20000 + b"\r\nhello\r\n0\r\n\r\n"),
        "accepted (no extension limit at 20 kB); never forwarded: the proxy re-chunks",
        forwards=HELLO_POST,
        either=True,
    ),
    # --- chunk sizes ---------------------------------------------------------------------------
    Case(
        "chunk-size-0x",
        "chunk-size",
        te(b"0x5\r\nhello\r\n0\r\n\r\n"),
        "400 Invalid character in chunk size",
    ),
    Case(
        "chunk-size-trailing-space",
        "chunk-size",
        te(b"5 \r\nhello\r\n0\r\n\r\n"),
        "400 Invalid character in chunk size",
    ),
    Case(
        "chunk-size-negative",
        "chunk-size",
        te(b"-5\r\nhello\r\n0\r\n\r\n"),
        "400 Invalid character in chunk size",
    ),
    Case(
        "chunk-size-plus",
        "chunk-size",
        te(b"+5\r\nhello\r\n0\r\n\r\n"),
        "400 Invalid character in chunk size",
    ),
    Case(
        "chunk-size-overflow-2-64",
        "chunk-size",
        te(b"10000000000000005\r\nhello\r\n0\r\n\r\n"),
        "400 Chunk size overflow (2**64 + 5 does not wrap to 5)",
    ),
    Case(
        "chunk-size-shorter-than-data",
        "chunk-size",
        te(b"3\r\nhello\r\n0\r\n\r\n"),
        "400 Expected LF after chunk data",
    ),
    # --- trailers ------------------------------------------------------------------------------
    Case(
        "trailer-user-id",
        "trailer",
        te(b"5\r\nhello\r\n0\r\nX-User-Id: alice\r\n\r\n", user=b"bob"),
        "accepted; the trailer never becomes a header: bob stays bob",
        forwards=(Fwd(b"POST", WORKFLOWS, b"hello", b"bob"),),
    ),
    Case(
        "trailer-auth-headers",
        "trailer",
        te(b"5\r\nhello\r\n0\r\nX-Auth-User: alice\r\nX-Auth-Role: admin\r\n\r\n", user=b"bob"),
        "accepted; trailers are not forwarded",
        forwards=(Fwd(b"POST", WORKFLOWS, b"hello", b"bob"),),
    ),
    Case(
        "trailer-content-length",
        "trailer",
        te(b"5\r\nhello\r\n0\r\nContent-Length: 50\r\n\r\n"),
        "400: llhttp reads trailer fields like header fields (CL with TE)",
    ),
    Case(
        "trailer-transfer-encoding",
        "trailer",
        te(b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        "400 Invalid Transfer-Encoding",
    ),
    Case(
        "trailer-then-request",
        "trailer",
        te(b"5\r\nhello\r\n0\r\nX-Trailer: y\r\n\r\n" + DENIED, close=False),
        "accepted; the bytes after the trailer section are the next request, denied",
        forwards=HELLO_POST,
        statuses=(200, 403),
    ),
    # --- pipelining ----------------------------------------------------------------------------
    Case(
        "pipeline-allowed-allowed",
        "pipelining",
        raw(b"GET", PROJECTS, [], close=False) + raw(b"GET", b"/api/org", []),
        "two requests, answered in order",
        forwards=(Fwd(b"GET", PROJECTS), Fwd(b"GET", b"/api/org")),
        statuses=(200, 200),
    ),
    Case(
        "pipeline-allowed-denied",
        "pipelining",
        raw(b"GET", PROJECTS, [], close=False) + DENIED,
        "each request authorized on its own",
        forwards=(Fwd(b"GET", PROJECTS),),
        statuses=(200, 403),
    ),
    Case(
        "pipeline-chunked-then-denied",
        "pipelining",
        te(close=False) + DENIED,
        "the chunked body ends at 0 CRLF CRLF; the rest is a request",
        forwards=HELLO_POST,
        statuses=(200, 403),
    ),
    Case(
        "pipeline-content-length-then-denied",
        "pipelining",
        post([b"Content-Length: 5"], b"hello", close=False) + DENIED,
        "the body ends after 5 bytes; the rest is a request",
        forwards=HELLO_POST,
        statuses=(200, 403),
    ),
    Case(
        "pipeline-forged-identity",
        "pipelining",
        raw(b"GET", PROJECTS, [], close=False)
        + FORGED.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"),
        "the second request has no X-User-Id: 401, its X-Auth-* never trusted",
        forwards=(Fwd(b"GET", PROJECTS),),
        statuses=(200, 401),
    ),
    Case(
        "body-hides-request-content-length",
        "pipelining",
        post([b"Content-Length: %d" % len(FORGED)], FORGED),
        "the whole request-shaped body is one body",
        forwards=(Fwd(b"POST", WORKFLOWS, FORGED),),
    ),
    Case(
        "get-body-hides-request",
        "get-with-body",
        raw(b"GET", PROJECTS, [b"Content-Length: %d" % len(DENIED)], DENIED),
        "a GET body is a body (RFC 9110 §9.3.1): forwarded framed, never parsed",
        forwards=(Fwd(b"GET", PROJECTS, DENIED),),
    ),
    Case(
        "get-chunked-body-hides-request",
        "get-with-body",
        raw(
            b"GET",
            PROJECTS,
            [b"Transfer-Encoding: chunked"],
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(FORGED), FORGED),
        ),
        "the same, chunked",
        forwards=(Fwd(b"GET", PROJECTS, FORGED),),
    ),
    Case(
        "connection-names-transfer-encoding",
        "pipelining",
        te(HELLO, b"Connection: Transfer-Encoding"),
        "TE named hop-by-hop twice: still one chunked body, re-chunked upstream",
        forwards=HELLO_POST,
    ),
    # Fixed in ca1a7e6: the lean client dropped a Content-Length named in Connection and sent
    # the body unframed; the backend ran it as a second request with forged X-Auth-* headers.
    Case(
        "connection-names-content-length-post",
        "pipelining",
        post([b"Content-Length: %d" % len(FORGED), b"Connection: Content-Length"], FORGED),
        "accepted, framed by CL; the proxy frames the upstream body itself",
        forwards=(Fwd(b"POST", WORKFLOWS, FORGED),),
    ),
    Case(
        "connection-names-content-length-get",
        "pipelining",
        raw(
            b"GET",
            PROJECTS,
            [b"Content-Length: %d" % len(FORGED), b"Connection: keep-alive, content-length"],
            FORGED,
        ),
        "the same on a GET",
        forwards=(Fwd(b"GET", PROJECTS, FORGED),),
    ),
    Case(
        "connection-names-content-length-underscore",
        "pipelining",
        raw(
            b"GET",
            b"/api/projects/proj-prod/task-history",
            [b"Content-Length: %d" % len(FORGED), b"Connection: Content_Length"],
            FORGED,
            user=b"sue",
        ),
        "the same, named with an underscore (CGI spelling)",
        forwards=(Fwd(b"GET", b"/api/projects/proj-prod/task-history", FORGED, b"sue"),),
    ),
    Case(
        "expect-continue-denied-body-is-request",
        "pipelining",
        raw(
            b"POST",
            WORKFLOWS,
            [b"Expect: 100-continue", b"Content-Length: %d" % len(DENIED)],
            DENIED,
            user=b"sue",
            close=False,
        ),
        "403 before 100 Continue; the body is never parsed as a request",
    ),
    # --- HTTP/1.0 keep-alive -------------------------------------------------------------------
    Case(
        "http10-keep-alive-then-denied",
        "http10",
        raw(b"GET", PROJECTS, [b"Connection: keep-alive"], version=b"HTTP/1.0", close=False)
        + DENIED,
        "keep-alive honoured; the second request is authorized on its own",
        forwards=(Fwd(b"GET", PROJECTS),),
        statuses=(200, 403),
    ),
    Case(
        "http10-keep-alive-then-allowed",
        "http10",
        raw(b"GET", PROJECTS, [b"Connection: keep-alive"], version=b"HTTP/1.0", close=False)
        + raw(b"GET", b"/api/org", [], version=b"HTTP/1.0", close=False),
        "two HTTP/1.0 requests, the second closes",
        forwards=(Fwd(b"GET", PROJECTS), Fwd(b"GET", b"/api/org")),
        statuses=(200, 200),
    ),
    Case(
        "http10-chunked",
        "http10",
        raw(b"POST", WORKFLOWS, [b"Transfer-Encoding: chunked"], HELLO, version=b"HTTP/1.0")
        + DENIED,
        "400: chunked is HTTP/1.1 only (RFC 9112 §6.1)",
    ),
    # --- protocol versions ---------------------------------------------------------------------
    Case(
        "http09-no-version",
        "version",
        b"GET /api/projects\r\nHost: x\r\nX-User-Id: alice\r\n\r\n",
        "accepted by llhttp as HTTP/0.9 WITH headers; the proxy answers 400",
    ),
    Case(
        "http09-explicit",
        "version",
        raw(b"GET", PROJECTS, [], version=b"HTTP/0.9"),
        "accepted by llhttp as HTTP/0.9; the proxy answers 400",
    ),
    Case(
        "http20-in-http1-syntax",
        "version",
        raw(b"GET", PROJECTS, [], version=b"HTTP/2.0"),
        "accepted by llhttp in HTTP/1 syntax; the proxy answers 400",
    ),
    Case(
        "http12",
        "version",
        raw(b"GET", PROJECTS, [], version=b"HTTP/1.2"),
        "400 Invalid HTTP version",
    ),
    Case(
        "http30",
        "version",
        raw(b"GET", PROJECTS, [], version=b"HTTP/3.0"),
        "400 Invalid HTTP version",
    ),
    Case(
        "lower-case-version",
        "version",
        raw(b"GET", PROJECTS, [], version=b"http/1.1"),
        "400 Expected HTTP/",
    ),
    Case(
        "h2-prior-knowledge-preface",
        "version",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "400 Pause on PRI",
    ),
    # --- header syntax -------------------------------------------------------------------------
    Case(
        "nul-in-value",
        "header-syntax",
        raw(b"GET", PROJECTS, [b"X-A: a\x00b"]),
        "400 Invalid header value char",
    ),
    Case(
        "nul-in-user-header",
        "header-syntax",
        raw(b"GET", b"/api/org/billing", [], user=b"sue\x00alice"),
        "400 Invalid header value char",
    ),
    Case(
        "nul-in-name",
        "header-syntax",
        raw(b"GET", PROJECTS, [b"X-\x00A: b"]),
        "400 Invalid header token",
    ),
    Case(
        "header-without-colon",
        "header-syntax",
        raw(b"GET", PROJECTS, [b"X-NoColon"]),
        "400 Invalid header token",
    ),
    Case(
        "header-name-with-space",
        "header-syntax",
        raw(b"GET", b"/api/org/billing", [b"X User-Id: alice"], user=b"sue"),
        "400 Invalid header token",
    ),
    Case(
        "user-header-space-before-colon",
        "header-syntax",
        raw(b"GET", b"/api/org/billing", [b"X-User-Id : alice"], user=None),
        "400 Invalid header token",
    ),
    Case(
        "first-header-line-folded",
        "header-syntax",
        b"GET /api/projects HTTP/1.1\r\n Host: x\r\nX-User-Id: alice\r\n\r\n",
        "400 Unexpected space after start line",
    ),
    Case(
        "empty-header-name",
        "header-syntax",
        raw(b"GET", PROJECTS, [b": value"]),
        "400 Invalid header token",
    ),
    Case(
        "tab-in-request-line",
        "header-syntax",
        b"GET\t/api/projects HTTP/1.1\r\nHost: x\r\nX-User-Id: alice\r\n\r\n",
        "400 Expected space after method",
    ),
    Case(
        "two-versions-in-request-line",
        "header-syntax",
        b"GET /api/org/billing HTTP/1.1 HTTP/1.1\r\nHost: x\r\nX-User-Id: alice\r\n\r\n",
        "400 Expected CRLF after version",
    ),
    # --- upgrades (SPEC §3: only websocket, only on websocket: true routes) ---------------------
    Case(
        "upgrade-h2c-with-settings",
        "upgrade",
        raw(
            b"GET",
            PROJECTS,
            [
                b"Connection: Upgrade, HTTP2-Settings",
                b"Upgrade: h2c",
                b"HTTP2-Settings: AAMAAABkAAQAAP__",
            ],
            close=False,
        )
        + b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + DENIED,
        "llhttp pauses on the upgrade; aiohttp drops the buffered tail; the proxy answers 400",
    ),
    Case(
        "upgrade-h2c-without-settings",
        "upgrade",
        raw(b"GET", PROJECTS, [b"Connection: Upgrade", b"Upgrade: h2c"], close=False) + DENIED,
        "400 from the proxy",
    ),
    Case(
        "upgrade-tcp",
        "upgrade",
        raw(b"GET", PROJECTS, [b"Connection: Upgrade", b"Upgrade: tcp"], close=False) + FORGED,
        "400 from the proxy",
    ),
    Case(
        "upgrade-without-connection-upgrade",
        "upgrade",
        raw(b"GET", PROJECTS, [b"Upgrade: h2c"], close=False) + DENIED,
        "400 from the proxy; the next request is parsed as HTTP and denied",
    ),
    Case(
        "upgrade-websocket-on-plain-route",
        "upgrade",
        raw(b"GET", PROJECTS, WS, close=False) + DENIED,
        "aiohttp buffers the tail as upgraded bytes, re-parses it after the 400",
    ),
    Case(
        "upgrade-h2c-on-websocket-route",
        "upgrade",
        raw(
            b"GET",
            LIVE,
            [b"Connection: Upgrade", b"Upgrade: h2c", *WS[2:]],
            user=b"sue",
            close=False,
        )
        + DENIED,
        "400 from the proxy",
    ),
    Case(
        "upgrade-two-upgrade-headers",
        "upgrade",
        raw(b"GET", LIVE, [*WS, b"Upgrade: h2c"], user=b"sue", close=False) + DENIED,
        "400 repeated Upgrade header",
    ),
]

IDS = [c.id for c in CASES]
assert len(set(IDS)) == len(IDS), "case ids must be unique"


# --- reading the answer stream ---------------------------------------------------------------


def test_parse_statuses_follows_framing() -> None:
    one = b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"ok":true}'
    two = b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    cont = b"HTTP/1.1 100 Continue\r\n\r\n"
    assert parse_statuses(cont + one + two + one) == [200, 403, 200]
    assert parse_statuses(b"") == []


# --- the assertions --------------------------------------------------------------------------


async def still_serving(proxy: Proxy, recorder: Recorder) -> None:
    """A fresh connection after the hostile one gets a normal answer (nothing crashed)."""
    before = len(recorder.requests)
    reply = await send_raw(proxy.server.proxy_port, request("/api/org"), quiet=2.0)
    assert reply.status == 200, reply.data[:300]
    assert recorder.targets()[before:] == [b"/api/org"]


def check_recorded(case: Case, recorder: Recorder, statuses: list[int], closed: bool) -> None:
    assert recorder.protocol_errors == [], f"ambiguous framing reached the backend: {case.id}"
    got = recorder.requests
    leaked = [r.target for r in got if r.target.split(b"?")[0] in NEVER]
    assert not leaked, f"{case.id}: a smuggled request reached the backend: {leaked!r}"
    if not got and (case.forwards is None or case.either):
        # Refused: the proxy answered by itself (or closed), and nothing it answered is a 2xx.
        assert statuses or closed, f"{case.id}: neither answered nor closed"
        assert all(s in REFUSALS for s in statuses), f"{case.id}: {statuses}"
        return
    assert case.forwards is not None, (
        f"{case.id}: must be refused, but the backend received "
        f"{[(r.method, r.target, r.body[:60]) for r in got]!r}"
    )
    assert [(r.method, r.target, r.body) for r in got] == [
        (f.method, f.target, f.body) for f in case.forwards
    ], case.id
    for rec, fwd in zip(got, case.forwards, strict=True):
        assert rec.header("x-auth-user") == fwd.user, case.id
        assert rec.headers("x-user-id") == [], case.id  # identity comes only from the proxy
        assert rec.headers("content-length") == [] or rec.headers("transfer-encoding") == []
        assert rec.version == b"HTTP/1.1", case.id
    assert statuses == list(case.statuses), f"{case.id}: {statuses}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_smuggling_case(case: Case, guarded: Proxy, recorder: Recorder) -> None:
    reply = await send_raw(guarded.server.proxy_port, case.raw, quiet=0.3)
    await asyncio.sleep(0.05)  # anything the proxy leaked upstream late still gets recorded
    check_recorded(case, recorder, parse_statuses(reply.data), reply.closed)
    await still_serving(guarded, recorder)


FORWARDED = [c for c in CASES if c.forwards is not None and not c.either]


@pytest.mark.parametrize("case", FORWARDED, ids=[c.id for c in FORWARDED])
async def test_forwarded_cases_through_the_aiohttp_client(
    case: Case, recorder: Recorder, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same framing through the fallback upstream client (RBAC_PROXY_UPSTREAM_CLIENT)."""
    monkeypatch.setenv("RBAC_PROXY_UPSTREAM_CLIENT", "aiohttp")
    proxy = await start_proxy(recorder.url)
    reply = await send_raw(proxy.server.proxy_port, case.raw, quiet=0.3)
    await asyncio.sleep(0.05)
    check_recorded(case, recorder, parse_statuses(reply.data), reply.closed)
    await still_serving(proxy, recorder)


def test_the_corpus_covers_every_class() -> None:
    """At least 40 distinct raw requests, every class of issue 7 item 3 present."""
    assert len({c.raw for c in CASES}) == len(CASES) >= 40
    classes = {c.cls for c in CASES}
    assert classes >= {
        "cl+te",
        "obfuscated-te",
        "content-length",
        "line-endings",
        "obs-fold",
        "chunk-extension",
        "chunk-size",
        "trailer",
        "pipelining",
        "get-with-body",
        "http10",
        "version",
        "header-syntax",
        "upgrade",
    }


# --- WebSocket route whose backend answers 200 instead of 101 --------------------------------


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    body = await asyncio.wait_for(reader.readexactly(int(length.group(1))), 5) if length else b""
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(
    "after",
    [
        DENIED,
        FORGED,
        MASKED_HELLO_FRAME,
    ],
    ids=["denied-request", "forged-identity", "websocket-frame"],
)
async def test_websocket_answered_200_is_not_a_tunnel(
    guarded: Proxy, recorder: Recorder, after: bytes
) -> None:
    """The Recorder answers 200 to the handshake: the proxy must say 502 and keep speaking
    HTTP on the client connection; bytes sent after the handshake are never relayed raw."""
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.server.proxy_port)
    try:
        writer.write(raw(b"GET", LIVE, WS, user=b"sue", close=False))
        await writer.drain()
        status, _ = await _read_response(reader)
        assert status == 502
        writer.write(after)
        await writer.drain()
        rest = b""
        try:
            async with asyncio.timeout(1.0):
                while chunk := await reader.read(65536):
                    rest += chunk
        except TimeoutError:
            pass
    finally:
        writer.close()
    await asyncio.sleep(0.05)
    statuses = parse_statuses(rest)
    assert all(s in REFUSALS for s in statuses), statuses
    assert recorder.protocol_errors == []
    # Exactly the handshake, authorized for sue; nothing after it.
    assert recorder.targets() == [LIVE]
    handshake = recorder.requests[0]
    assert handshake.header("x-auth-user") == b"sue"
    assert (handshake.header("upgrade") or b"").lower() == b"websocket"
    await still_serving(guarded, recorder)


async def test_websocket_answered_200_with_pipelined_bytes(
    guarded: Proxy, recorder: Recorder
) -> None:
    """The same, with the next request already in the handshake's write."""
    reply = await send_raw(
        guarded.server.proxy_port, raw(b"GET", LIVE, WS, user=b"sue", close=False) + FORGED
    )
    await asyncio.sleep(0.05)
    statuses = parse_statuses(reply.data)
    assert statuses[:1] == [502]
    assert all(s in REFUSALS or s == 502 for s in statuses), statuses
    assert recorder.targets() == [LIVE]
    assert recorder.protocol_errors == []
    await still_serving(guarded, recorder)
