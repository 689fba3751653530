"""Regression: a client's `Connection` header may not take the body's framing away.

`Connection: Content-Length` used to drop the copied Content-Length while the body still went
upstream unframed: the backend read the body as a second request, with forged X-Auth-* headers
(found by the threat-model review, issue 7). Both upstream clients are checked.
"""

from __future__ import annotations

import pytest

from tests.security.harness import Recorder, request, send_raw
from tests.web.conftest import StartProxy

SMUGGLED = (
    b"PUT /api/org/billing HTTP/1.1\r\nHost: x\r\nX-Auth-User: alice\r\n"
    b"X-Auth-Role: admin\r\nContent-Length: 0\r\n\r\n"
)


@pytest.fixture(params=["lean", "aiohttp"])
def client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("RBAC_PROXY_UPSTREAM_CLIENT", request.param)
    return str(request.param)


@pytest.mark.parametrize(
    "connection",
    [
        "Connection: keep-alive, Content-Length",
        "Connection: content-length",
        "Connection: Content_Length",
        "Connection: close, Transfer-Encoding, Content-Length, Host",
    ],
)
async def test_a_body_named_in_connection_stays_one_framed_request(
    client: str, connection: str, start_proxy: StartProxy, recorder: Recorder
) -> None:
    proxy = await start_proxy(recorder.url)
    raw = request(
        "/api/projects/proj-prod/task-history/e1/replay",
        method="POST",
        user="sue",
        headers=[connection],
        body=SMUGGLED,
        close=False,
    )
    reply = await send_raw(proxy.server.proxy_port, raw)
    assert reply.statuses == [200]
    assert [(r.method, r.target, r.body) for r in recorder.requests] == [
        (b"POST", b"/api/projects/proj-prod/task-history/e1/replay", SMUGGLED)
    ]
    assert recorder.requests[0].header("content-length") == str(len(SMUGGLED)).encode()
    assert recorder.protocol_errors == []


async def test_a_chunked_body_is_rechunked_whatever_connection_names(
    client: str, start_proxy: StartProxy, recorder: Recorder
) -> None:
    proxy = await start_proxy(recorder.url)
    raw = request(
        "/api/projects/proj-prod/task-history/e1/replay",
        method="POST",
        user="sue",
        headers=["Connection: Content-Length, Transfer-Encoding", "Transfer-Encoding: chunked"],
        close=False,
    ) + b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    reply = await send_raw(proxy.server.proxy_port, raw)
    assert reply.statuses == [200]
    assert [r.body for r in recorder.requests] == [SMUGGLED]
    assert recorder.protocol_errors == []


@pytest.mark.parametrize("target", ["/api/projects/proj-prod", "/healthz"])
async def test_head_to_a_backend_that_sends_a_body_anyway_is_a_clean_200(
    target: str, start_proxy: StartProxy, recorder: Recorder
) -> None:
    """The Recorder answers HEAD with a body in the same write (wrong, and common): the lean
    client drops the stray bytes instead of failing the exchange with a 502 (found by the
    fuzz suite). The connection is never reused after HEAD, so nothing else can read them."""
    proxy = await start_proxy(recorder.url)
    port = proxy.server.proxy_port
    reply = await send_raw(port, request(target, method="HEAD", close=False), quiet=0.3)
    assert reply.statuses == [200]
    assert reply.data.endswith(b"\r\n\r\n")  # a head and nothing after it
    follow = await send_raw(port, request(target))
    assert follow.status == 200
    assert [(r.method, r.target) for r in recorder.requests] == [
        (b"HEAD", target.encode()),
        (b"GET", target.encode()),
    ]
