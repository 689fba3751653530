"""The harness itself: the recorder sees exact bytes, the raw client sees every response."""

from __future__ import annotations

from tests.security.harness import Recorder, request, send_raw
from tests.web.conftest import Proxy


async def test_an_allowed_request_reaches_the_recorder_with_its_exact_target(
    guarded: Proxy, recorder: Recorder
) -> None:
    reply = await send_raw(
        guarded.server.proxy_port, request("/api/projects/proj-prod/workflows?x=%2F")
    )
    assert reply.status == 200
    assert recorder.targets() == [b"/api/projects/proj-prod/workflows?x=%2F"]
    assert recorder.requests[0].header("x-auth-user") == b"alice"


async def test_a_denied_request_never_reaches_the_recorder(
    guarded: Proxy, recorder: Recorder
) -> None:
    reply = await send_raw(guarded.server.proxy_port, request("/api/org/billing", user="sue"))
    assert reply.status == 403
    assert reply.closed
    assert recorder.requests == []


async def test_chunked_bodies_are_recorded_decoded(guarded: Proxy, recorder: Recorder) -> None:
    raw = (
        request(
            "/api/projects/proj-prod/workflows",
            method="POST",
            headers=["Transfer-Encoding: chunked"],
        )
        + b"5\r\nhello\r\n0\r\n\r\n"
    )
    reply = await send_raw(guarded.server.proxy_port, raw)
    assert reply.status == 200
    assert [r.body for r in recorder.requests] == [b"hello"]
    assert recorder.protocol_errors == []
