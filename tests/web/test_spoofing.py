"""Client-sent identity, forwarding and override headers never reach the backend (raw sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from tests.web.conftest import Backend, Proxy, StartProxy

WAIT = 10.0
SPOOF = "spoofed-by-client"


async def send(
    proxy: Proxy, head_lines: list[str], *, method: str = "GET", target: str = "/api/org/members"
) -> tuple[int, dict[str, object]]:
    """Send a hand-written request (header spelling exactly as given); return status and JSON."""
    head = f"{method} {target} HTTP/1.1\r\nHost: dash.example\r\n"
    head += "".join(line + "\r\n" for line in head_lines)
    head += "Connection: close\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
    try:
        writer.write(head.encode("latin-1"))
        await writer.drain()
        async with asyncio.timeout(WAIT):
            data = await reader.read(-1)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    status_line, _, rest = data.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    parsed = json.loads(body) if body.startswith(b"{") else {}
    return int(status_line.split()[1]), parsed


def last_headers(backend: Backend) -> dict[str, list[str]]:
    """Headers of the last request the demo backend received: lower-case name -> values."""
    assert backend.received, "nothing reached the backend"
    headers = backend.received[-1]["headers"]
    assert isinstance(headers, dict)
    return headers


def all_values(headers: dict[str, list[str]]) -> list[str]:
    return [v for values in headers.values() for v in values]


# --- injected identity headers: every spelling is stripped, the proxy's values win ----------


@pytest.mark.parametrize(
    "spoofed",
    [
        "X-Auth-User",
        "x-auth-user",
        "X_Auth_User",
        "x_AUTH_user",
        "X-AUTH-ROLE",
        "X_Auth_Role",
        "X-Auth-Org",
        "X-Auth-Permission",
        "x_auth_permission",
        "X-Request-Id_",  # not an injected name: passes, proving the check looks at values
    ],
)
async def test_client_identity_headers_never_reach_the_backend(
    proxy: Proxy, backend: Backend, spoofed: str
) -> None:
    status, _ = await send(proxy, ["X-User-Id: bob", f"{spoofed}: {SPOOF}"])
    assert status == 200
    headers = last_headers(backend)
    # The injected values are the proxy's own (bob is a developer of acme; team:read).
    assert headers["x-auth-user"] == ["bob"]
    assert headers["x-auth-org"] == ["acme"]
    assert headers["x-auth-role"] == ["developer"]
    assert headers["x-auth-permission"] == ["team:read"]
    if spoofed == "X-Request-Id_":
        assert headers["x-request-id_"] == [SPOOF]
    else:
        assert SPOOF not in all_values(headers)
        assert not any(name.startswith("x_") for name in headers)


async def test_identity_header_sent_twice_is_stripped_entirely(
    proxy: Proxy, backend: Backend
) -> None:
    status, _ = await send(
        proxy,
        [
            "X-User-Id: bob",
            f"X-Auth-User: {SPOOF}-1",
            f"X-Auth-User: {SPOOF}-2",
            f"X-Auth-Role: {SPOOF}-3",
            f"x-auth-role: {SPOOF}-4",
        ],
    )
    assert status == 200
    headers = last_headers(backend)
    assert headers["x-auth-user"] == ["bob"]
    assert headers["x-auth-role"] == ["developer"]
    assert not any(SPOOF in v for v in all_values(headers))


async def test_permission_not_injected_is_not_spoofable_either(
    proxy: Proxy, backend: Backend
) -> None:
    # /api/org is `authenticated: true`: no permission is checked, so none is injected, and
    # the client's value must not fill the gap.
    status, _ = await send(
        proxy, ["X-User-Id: sue", f"X-Auth-Permission: {SPOOF}"], target="/api/org"
    )
    assert status == 200
    headers = last_headers(backend)
    assert headers["x-auth-user"] == ["sue"]
    assert "x-auth-permission" not in headers


async def test_user_header_spelled_with_underscore_is_no_identity(
    proxy: Proxy, backend: Backend
) -> None:
    # A CGI/WSGI backend reads X_User_Id as X-User-Id; the proxy neither trusts nor forwards it.
    status, body = await send(proxy, ["X_User_Id: alice"])
    assert status == 401
    assert body["reason"] == "missing_credentials"
    assert backend.received == []
    status, _ = await send(proxy, ["X-User-Id: bob", "X_User_Id: alice", "X_Org_Id: smallco"])
    assert status == 200
    headers = last_headers(backend)
    assert headers["x-auth-user"] == ["bob"]
    assert "alice" not in all_values(headers)
    assert "smallco" not in all_values(headers)


async def test_public_route_still_strips_identity_headers(proxy: Proxy, backend: Backend) -> None:
    status, _ = await send(
        proxy,
        [
            "X-User-Id: alice",
            "X-Org-Id: acme",
            f"X-Auth-User: {SPOOF}",
            f"X_Auth_Role: {SPOOF}",
            f"X-Auth-Org: {SPOOF}",
            f"X-Auth-Permission: {SPOOF}",
        ],
        target="/healthz",
    )
    assert status == 200
    headers = last_headers(backend)
    for name in (
        "x-auth-user",
        "x-auth-org",
        "x-auth-role",
        "x-auth-permission",
        "x-user-id",
        "x-org-id",
    ):
        assert name not in headers, name
    assert SPOOF not in all_values(headers)
    assert len(headers["x-request-id"]) == 1  # the proxy's own request id still goes along


# --- Forwarded / X-Forwarded-* and the trusted-proxy boundary -------------------------------

FORWARDING = [
    "X-Forwarded-For: 203.0.113.9",
    "X_Forwarded_For: 198.51.100.1",
    "Forwarded: for=203.0.113.9;proto=https;host=evil.example",
    "X-Forwarded-Proto: https",
    "X-Forwarded-Host: evil.example",
    "X-Forwarded-Port: 444",
]


async def test_forwarding_headers_from_an_untrusted_peer_never_reach_the_backend(
    backend: Backend, start_proxy: StartProxy
) -> None:
    # 192.0.2.0/24 (TEST-NET-1) excludes 127.0.0.1: the test client is an untrusted peer.
    proxy = await start_proxy(backend.url, trusted_proxies="192.0.2.0/24")
    status, _ = await send(proxy, FORWARDING, target="/healthz")
    assert status == 200
    headers = last_headers(backend)
    assert headers["x-forwarded-for"] == ["127.0.0.1"]  # only the real peer
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["x-forwarded-host"] == ["dash.example"]
    assert "forwarded" not in headers
    assert "x-forwarded-port" not in headers
    assert not any(name.startswith("x_") for name in headers)
    values = " ".join(all_values(headers))
    for leaked in ("203.0.113.9", "198.51.100.1", "evil.example", "https", "444"):
        assert leaked not in values, leaked


async def test_identity_header_from_an_untrusted_peer_is_401(
    backend: Backend, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(backend.url, trusted_proxies="192.0.2.0/24")
    status, body = await send(proxy, ["X-User-Id: alice"])
    assert status == 401
    assert body["reason"] == "missing_credentials"
    assert backend.received == []


async def test_forwarding_headers_from_a_trusted_peer_are_appended_to(
    proxy: Proxy, backend: Backend
) -> None:
    # The default --trusted-proxies includes 127.0.0.1.
    status, _ = await send(proxy, FORWARDING, target="/healthz")
    assert status == 200
    headers = last_headers(backend)
    # Only the standard spelling speaks for the client (an underscore copy is what a client
    # slipped past the front proxy); the peer is appended last.
    assert headers["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["https"]
    assert headers["x-forwarded-host"] == ["evil.example"]
    assert headers["forwarded"] == ["for=203.0.113.9;proto=https;host=evil.example"]


async def test_underscore_and_client_ip_aliases_from_a_trusted_peer(
    proxy: Proxy, backend: Backend
) -> None:
    """Review finding: `X_Forwarded_Host` passed by a front proxy overrode its own value."""
    status, _ = await send(
        proxy,
        [
            "X-Forwarded-Host: real.example",
            "X-Forwarded-Proto: https",
            "X_Forwarded_Host: evil.example",
            "X_Forwarded_Proto: http",
            "X-Real-IP: 203.0.113.7",
        ],
        target="/healthz",
    )
    assert status == 200
    headers = last_headers(backend)
    assert headers["x-forwarded-host"] == ["real.example"]
    assert headers["x-forwarded-proto"] == ["https"]
    assert "x_forwarded_host" not in headers
    assert headers["x-real-ip"] == ["203.0.113.7"]  # trusted peer: its client-IP header stays


async def test_client_ip_aliases_from_an_untrusted_peer_are_dropped(
    backend: Backend, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(backend.url, trusted_proxies="192.0.2.0/24")
    names = ["X-Real-IP", "True-Client-IP", "X-Client-IP", "CF-Connecting-IP", "X-Original-URI"]
    status, _ = await send(proxy, [f"{n}: 1.2.3.4" for n in names], target="/healthz")
    assert status == 200
    headers = last_headers(backend)
    assert not {n.lower() for n in names} & set(headers)


# --- rewrite and method-override headers and parameters -------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "X-Original-URL",
        "X-Rewrite-URL",
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
        "x_original_url",
        "X_HTTP_METHOD_OVERRIDE",
    ],
)
async def test_rewrite_and_method_override_headers_are_stripped(
    proxy: Proxy, backend: Backend, name: str
) -> None:
    status, _ = await send(proxy, ["X-User-Id: bob", f"{name}: /api/org/billing"])
    assert status == 200
    received = backend.received[-1]
    assert (received["method"], received["raw_path"]) == ("GET", "/api/org/members")
    headers = last_headers(backend)
    assert "/api/org/billing" not in all_values(headers)


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/api/org/members?_method=DELETE"),
        ("GET", "/api/org/members?x=1&_METHOD=delete"),
        ("POST", "/api/org/invites?_method=PUT"),
        ("GET", "/healthz?_method=POST"),
    ],
)
async def test_method_override_query_parameter_is_400(
    proxy: Proxy, backend: Backend, method: str, target: str
) -> None:
    status, body = await send(proxy, ["X-User-Id: alice"], method=method, target=target)
    assert status == 400
    assert body["reason"] == "bad_request"
    assert backend.received == []
