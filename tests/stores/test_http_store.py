"""Tests for proxy.stores.http: the SPEC §6 HTTP API, its failure modes, encoding and limits."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import MappingProxyType

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from proxy.policy.model import Membership
from proxy.stores.base import RoleStore, StoreError, StoreRefused
from proxy.stores.http import MAX_BODY, PING_USER, HttpStore

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CAROL = {
    "user": "carol",
    "memberships": [
        {"org": "zeta", "plan": "pro", "role": "developer", "projects": {}},
        {
            "org": "acme",
            "plan": "enterprise",
            "role": None,
            "projects": {"proj-staging": "developer"},
        },
    ],
}


@dataclass
class FakeService:
    """A role service on 127.0.0.1 whose answer each test sets; it records what it saw."""

    url: str
    handler: Handler | None = None
    seen: list[web.Request] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def answer(self, status: int = 200, body: object = None, *, raw: bytes | None = None) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            data = raw if raw is not None else json.dumps(body).encode()
            return web.Response(status=status, body=data, content_type="application/json")

        self.handler = handler


@pytest.fixture
async def service(aiohttp_server: AiohttpServer) -> AsyncIterator[FakeService]:
    holder: list[FakeService] = []

    async def dispatch(request: web.Request) -> web.StreamResponse:
        svc = holder[0]
        svc.seen.append(request)
        assert svc.handler is not None, "test forgot to set an answer"
        return await svc.handler(request)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", dispatch)
    server = await aiohttp_server(app)
    svc = FakeService(str(server.make_url("/")).rstrip("/"))
    holder.append(svc)
    yield svc
    svc.release.set()  # let any deliberately hanging handler finish before shutdown


@pytest.fixture
async def store(service: FakeService) -> AsyncIterator[HttpStore]:
    s = HttpStore(service.url, timeout=0.5)
    await s.open()
    yield s
    await s.close()


def test_satisfies_the_role_store_protocol() -> None:
    store: RoleStore = HttpStore("http://127.0.0.1:1")
    assert store.backend == "http"


async def test_memberships_are_parsed_validated_and_sorted(
    service: FakeService, store: HttpStore
) -> None:
    service.answer(body=CAROL)
    found = await store.memberships("carol")
    assert found == (
        Membership("acme", "enterprise", None, MappingProxyType({"proj-staging": "developer"})),
        Membership("zeta", "pro", "developer", MappingProxyType({})),
    )
    assert all(isinstance(m.projects, MappingProxyType) for m in found)  # frozen values
    assert service.seen[0].path == "/members/carol"
    assert service.seen[0].method == "GET"


async def test_projects_key_may_be_missing_or_null(service: FakeService, store: HttpStore) -> None:
    service.answer(
        body={"user": "bob", "memberships": [{"org": "acme", "plan": "x", "role": "developer"}]}
    )
    assert await store.memberships("bob") == (Membership("acme", "x", "developer"),)
    service.answer(
        body={
            "user": "bob",
            "memberships": [{"org": "acme", "plan": "x", "role": "admin", "projects": None}],
        }
    )
    assert await store.memberships("bob") == (Membership("acme", "x", "admin"),)


@pytest.mark.parametrize(
    "body",
    [
        {"memberships": [{"org": "acme", "plan": "x", "role": "admin"}]},
        {"user": None, "memberships": []},
        {"user": "x/../../admin", "memberships": [{"org": "acme", "plan": "x", "role": "admin"}]},
    ],
)
async def test_an_answer_that_does_not_name_its_user_is_a_store_error(
    service: FakeService, store: HttpStore, body: dict[str, object]
) -> None:
    """A front proxy that decodes %2F and resolves `..` could route /members/x%2F..%2Fadmin
    to another user's answer: only an answer naming the user asked about counts."""
    service.answer(body=body)
    with pytest.raises(StoreError, match="does not name the user"):
        await store.memberships("x/../../bob")


async def test_an_answer_that_does_not_name_its_project_is_a_store_error(
    service: FakeService, store: HttpStore
) -> None:
    service.answer(body={"org": "acme"})
    with pytest.raises(StoreError, match="does not name the project"):
        await store.project_org("proj-prod")


async def test_not_found_means_no_membership_and_unknown_project(
    service: FakeService, store: HttpStore
) -> None:
    service.answer(404, {"error": "not found"})
    assert await store.memberships("nobody") == ()
    assert await store.project_org("nope") is None
    assert [r.path for r in service.seen] == ["/members/nobody", "/projects/nope"]


async def test_empty_memberships_list_is_no_membership(
    service: FakeService, store: HttpStore
) -> None:
    service.answer(body={"user": "x", "memberships": []})
    assert await store.memberships("x") == ()


async def test_project_org(service: FakeService, store: HttpStore) -> None:
    service.answer(body={"project": "proj-staging", "org": "acme"})
    assert await store.project_org("proj-staging") == "acme"


@pytest.mark.parametrize(
    ("key", "raw_segment"),
    [
        ("a/b", "a%2Fb"),
        ("..", "%2E%2E"),
        (".", "%2E"),
        ("../projects/p1", "..%2Fprojects%2Fp1"),
        ("100%", "100%25"),
        ("é ?#", "%C3%A9%20%3F%23"),
    ],
)
async def test_the_key_is_one_encoded_path_segment(
    service: FakeService, store: HttpStore, key: str, raw_segment: str
) -> None:
    service.answer(404)
    assert await store.memberships(key) == ()
    assert await store.project_org(key) is None
    assert [r.raw_path for r in service.seen] == [
        f"/members/{raw_segment}",
        f"/projects/{raw_segment}",
    ]


async def test_empty_key_asks_nothing(service: FakeService, store: HttpStore) -> None:
    assert await store.memberships("") == ()
    assert await store.project_org("") is None
    assert service.seen == []


async def test_base_path_prefix_is_kept(service: FakeService) -> None:
    service.answer(404)
    s = HttpStore(service.url + "/api/v1/", timeout=1)
    await s.open()
    try:
        await s.memberships("bob")
    finally:
        await s.close()
    assert service.seen[0].raw_path == "/api/v1/members/bob"


@pytest.mark.parametrize("status", [500, 502, 503, 400, 401, 403, 204, 301, 302, 307])
async def test_other_statuses_are_store_errors(
    service: FakeService, store: HttpStore, status: int
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        # Redirects are never followed: a Location would carry the bearer token elsewhere.
        return web.Response(status=status, headers={"Location": "/members/alice"})

    service.handler = handler
    with pytest.raises(StoreError, match=str(status)):
        await store.memberships("bob")
    with pytest.raises(StoreError, match=str(status)) as caught:
        await store.project_org("p1")
    assert len(service.seen) == 2
    # Only a client error about the key itself is "refused" (not counted as an outage).
    assert isinstance(caught.value, StoreRefused) == (status == 400)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"user": "bob", "memberships": [',
        b"\xff\xfe{}",
        b"",
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
async def test_malformed_json_is_a_store_error(
    service: FakeService, store: HttpStore, body: bytes
) -> None:
    service.answer(raw=body)
    with pytest.raises(StoreError, match="JSON"):
        await store.memberships("bob")
    with pytest.raises(StoreError, match="JSON"):
        await store.project_org("p1")


@pytest.mark.parametrize(
    "body",
    [
        [],
        "bob",
        None,
        {},
        {"user": "bob"},
        {"user": "bob", "memberships": {}},
        {"user": "bob", "memberships": ["acme"]},
        {"user": "bob", "memberships": [{"plan": "pro", "role": "admin"}]},
        {"user": "bob", "memberships": [{"org": "", "plan": "pro", "role": "admin"}]},
        {"user": "bob", "memberships": [{"org": 1, "plan": "pro", "role": "admin"}]},
        {"user": "bob", "memberships": [{"org": "acme", "role": "admin"}]},
        {"user": "bob", "memberships": [{"org": "acme", "plan": 3, "role": "admin"}]},
        {"user": "bob", "memberships": [{"org": "acme", "plan": "pro", "role": 7}]},
        {"user": "bob", "memberships": [{"org": "acme", "plan": "pro", "role": ""}]},
        {"user": "bob", "memberships": [{"org": "acme", "plan": "pro", "role": ["admin"]}]},
        {
            "user": "bob",
            "memberships": [{"org": "acme", "plan": "pro", "role": None, "projects": ["p1"]}],
        },
        {
            "user": "bob",
            "memberships": [{"org": "acme", "plan": "pro", "role": None, "projects": {"p1": 1}}],
        },
        {
            "user": "bob",
            "memberships": [{"org": "acme", "plan": "pro", "role": None, "projects": {"": "x"}}],
        },
        {
            "user": "bob",
            "memberships": [
                {"org": "acme", "plan": "pro", "role": "admin"},
                {"org": "acme", "plan": "pro", "role": "developer"},
            ],
        },
    ],
)
async def test_wrong_member_shapes_are_store_errors(
    service: FakeService, store: HttpStore, body: object
) -> None:
    service.answer(body=body)
    with pytest.raises(StoreError):
        await store.memberships("bob")


@pytest.mark.parametrize(
    "body",
    [[], "acme", {}, {"org": None}, {"org": ""}, {"org": 5}, {"project": "p1", "org": ["acme"]}],
)
async def test_wrong_project_shapes_are_store_errors(
    service: FakeService, store: HttpStore, body: object
) -> None:
    service.answer(body=body)
    with pytest.raises(StoreError):
        await store.project_org("p1")


async def test_an_answer_about_someone_else_is_a_store_error(
    service: FakeService, store: HttpStore
) -> None:
    service.answer(body={**CAROL, "user": "alice"})
    with pytest.raises(StoreError, match="does not name the user"):
        await store.memberships("carol")
    service.answer(body={"project": "proj-prod", "org": "acme"})
    with pytest.raises(StoreError, match="does not name the project"):
        await store.project_org("proj-staging")


async def test_body_over_one_mebibyte_is_refused(service: FakeService, store: HttpStore) -> None:
    padding = "x" * MAX_BODY
    service.answer(body={**CAROL, "padding": padding})
    with pytest.raises(StoreError, match="large"):
        await store.memberships("carol")

    async def chunked(request: web.Request) -> web.StreamResponse:
        # No Content-Length: the limit must hold while reading, not only from the header.
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(40):
            await resp.write(b" " * 65536)
        await resp.write_eof()
        return resp

    service.handler = chunked
    with pytest.raises(StoreError, match="1 MiB"):
        await store.memberships("carol")


async def test_body_just_under_the_limit_is_accepted(
    service: FakeService, store: HttpStore
) -> None:
    text = json.dumps(CAROL)
    service.answer(raw=text.encode() + b" " * (MAX_BODY - len(text)))
    assert len(await store.memberships("carol")) == 2


async def test_timeout_is_a_store_error(service: FakeService) -> None:
    async def hang(request: web.Request) -> web.StreamResponse:
        await service.release.wait()
        return web.Response(status=404)

    service.handler = hang
    s = HttpStore(service.url, timeout=0.2)
    await s.open()
    try:
        with pytest.raises(StoreError, match="timed out"):
            await s.memberships("bob")
        with pytest.raises(StoreError, match="timed out"):
            await s.ping()
    finally:
        service.release.set()
        await s.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_connection_refused_is_a_store_error() -> None:
    s = HttpStore(f"http://127.0.0.1:{closed_port()}", timeout=1)
    await s.open()  # an unreachable store must not fail open()
    try:
        with pytest.raises(StoreError, match="ClientConnectorError"):
            await s.memberships("bob")
        with pytest.raises(StoreError):
            await s.project_org("p1")
        with pytest.raises(StoreError):
            await s.ping()
    finally:
        await s.close()


async def test_bearer_token_is_sent_only_when_configured(service: FakeService) -> None:
    service.answer(404)
    with_token = HttpStore(service.url, token="s3cret")
    without = HttpStore(service.url)
    for s in (with_token, without):
        await s.open()
        try:
            await s.memberships("bob")
            await s.ping()
        finally:
            await s.close()
    auth = [r.headers.get("Authorization") for r in service.seen]
    assert auth == ["Bearer s3cret", "Bearer s3cret", None, None]


async def test_token_never_appears_in_errors(service: FakeService) -> None:
    service.answer(500)
    s = HttpStore(service.url, token="s3cret")
    await s.open()
    try:
        with pytest.raises(StoreError) as info:
            await s.memberships("bob")
    finally:
        await s.close()
    assert "s3cret" not in str(info.value)


async def test_cookies_are_never_replayed(service: FakeService, store: HttpStore) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.Response(status=404)
        resp.set_cookie("session", "for-bob")
        return resp

    service.handler = handler
    await store.memberships("bob")
    await store.memberships("alice")
    assert [r.cookies.get("session") for r in service.seen] == [None, None]


@pytest.mark.parametrize("status", [200, 404])
async def test_ping_accepts_200_and_404(
    service: FakeService, store: HttpStore, status: int
) -> None:
    service.answer(status, raw=b"whatever")
    await store.ping()
    assert service.seen[0].path == f"/members/{PING_USER}"


@pytest.mark.parametrize("status", [500, 503, 401, 302])
async def test_ping_fails_on_other_statuses(
    service: FakeService, store: HttpStore, status: int
) -> None:
    service.answer(status)
    with pytest.raises(StoreError, match=str(status)):
        await store.ping()


async def test_use_before_open_is_a_store_error() -> None:
    s = HttpStore("http://127.0.0.1:1")
    with pytest.raises(StoreError, match="open"):
        await s.memberships("bob")


async def test_injected_session_is_used_and_not_closed(service: FakeService) -> None:
    service.answer(404)
    async with aiohttp.ClientSession() as session:
        s = HttpStore(service.url, session=session)
        await s.open()
        assert await s.memberships("bob") == ()
        await s.close()
        assert not session.closed
    assert len(service.seen) == 1


async def test_own_session_is_closed_and_reopenable(service: FakeService) -> None:
    service.answer(404)
    s = HttpStore(service.url)
    await s.open()
    await s.close()
    with pytest.raises(StoreError, match="open"):
        await s.memberships("bob")
    await s.open()
    try:
        assert await s.memberships("bob") == ()
    finally:
        await s.close()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/",
        "127.0.0.1:8080",
        "http:///members",
        "http://127.0.0.1/?x=1",
        "http://127.0.0.1/#frag",
    ],
)
def test_bad_base_urls_fail_at_construction(url: str) -> None:
    with pytest.raises(ValueError, match="http store URL"):
        HttpStore(url)


def test_nonpositive_timeout_is_rejected() -> None:
    with pytest.raises(ValueError, match="timeout"):
        HttpStore("http://127.0.0.1:1", timeout=0)


def test_url_errors_do_not_echo_credentials() -> None:
    with pytest.raises(ValueError) as info:
        HttpStore("http://user:hunter2@127.0.0.1/?x=1")
    assert "hunter2" not in str(info.value)
