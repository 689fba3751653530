"""The proxy in `--auth jwt` mode end to end: HS256 secret from env, RSA PEM key from a file."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import ClientSession
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.web.conftest import Backend, Proxy, StartProxy

SECRET = b"0123456789abcdef0123456789abcdef-test-only"  # 42 bytes: enough for HS256
SECRET_ENV = "RBAC_PROXY_TEST_JWT_SECRET"

# The shipped members plus `max`, a member of two orgs with different roles.
MEMBERS = """\
orgs:
  acme:
    plan: enterprise
    projects: [proj-prod, proj-staging]
    members:
      alice: admin
      bob: developer
      max: admin
  smallco:
    plan: pro
    projects: [sc-main]
    members:
      ed: admin
      max: developer
"""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "bob", "iat": now, "exp": now + 300, **overrides}


def hs_token(**overrides: Any) -> str:
    return jwt.encode(claims(**overrides), SECRET, algorithm="HS256")


def hand_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes) -> str:
    """A token assembled by hand, for algorithms PyJWT refuses to produce."""
    return ".".join(
        (
            b64url(json.dumps(header).encode()),
            b64url(json.dumps(payload).encode()),
            b64url(signature),
        )
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def members_file(tmp_path: Path) -> str:
    path = tmp_path / "members.yaml"
    path.write_text(MEMBERS)
    return str(path)


@pytest.fixture
async def hs_proxy(
    backend: Backend,
    start_proxy: StartProxy,
    members_file: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Proxy:
    monkeypatch.setenv(SECRET_ENV, SECRET.decode())
    return await start_proxy(
        backend.url, auth="jwt", jwt_secret_env=SECRET_ENV, store=f"file:{members_file}"
    )


@pytest.fixture(scope="module")
def rsa_private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def rsa_public_pem(rsa_private: rsa.RSAPrivateKey, tmp_path: Path) -> Path:
    path = tmp_path / "jwt-public.pem"
    path.write_bytes(
        rsa_private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.fixture
async def rsa_proxy(
    backend: Backend, start_proxy: StartProxy, members_file: str, rsa_public_pem: Path
) -> Proxy:
    return await start_proxy(
        backend.url, auth="jwt", jwt_key=str(rsa_public_pem), store=f"file:{members_file}"
    )


async def get(
    proxy: Proxy, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with (
        ClientSession() as session,
        session.get(proxy.url + path, headers=headers) as resp,
    ):
        body = await resp.json()
        return resp.status, body, dict(resp.headers)


def received_headers(backend: Backend) -> dict[str, list[str]]:
    assert backend.received, "nothing reached the backend"
    headers = backend.received[-1]["headers"]
    assert isinstance(headers, dict)
    return headers


# --- HS256 secret from the environment ------------------------------------------------------


async def test_valid_token_is_forwarded_as_the_sub_user(hs_proxy: Proxy, backend: Backend) -> None:
    token = hs_token()
    status, body, _ = await get(
        hs_proxy, "/api/org/members", {**bearer(token), "X-Auth-User": "mallory"}
    )
    assert status == 200
    assert body["auth"]["user"] == "bob"
    headers = received_headers(backend)
    assert headers["x-auth-user"] == ["bob"]  # from `sub`; the client's copy is stripped
    assert headers["x-auth-org"] == ["acme"]
    assert headers["x-auth-role"] == ["developer"]


async def test_authorization_header_is_passed_to_the_backend(
    hs_proxy: Proxy, backend: Backend
) -> None:
    # What the code does: in jwt mode the Authorization header is an end-to-end header and
    # reaches the backend unchanged (only the injected X-Auth-* and the hop-by-hop
    # Proxy-Authorization are removed), so a backend may verify the token itself.
    token = hs_token()
    status, _, _ = await get(hs_proxy, "/api/org", bearer(token))
    assert status == 200
    assert received_headers(backend)["authorization"] == [f"Bearer {token}"]


async def test_expired_token_is_401_invalid_token(hs_proxy: Proxy, backend: Backend) -> None:
    now = int(time.time())
    token = hs_token(iat=now - 7200, exp=now - 3600)  # far beyond the 30 s leeway
    status, body, headers = await get(hs_proxy, "/api/org/members", bearer(token))
    assert status == 401
    assert body["reason"] == "invalid_credentials"
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'error="invalid_token"' in challenge  # RFC 6750 §3.1
    assert token not in challenge and token not in json.dumps(body)
    assert backend.received == []


async def test_missing_token_is_401_with_a_bearer_challenge(
    hs_proxy: Proxy, backend: Backend
) -> None:
    status, body, headers = await get(hs_proxy, "/api/org/members", {})
    assert status == 401
    assert body["reason"] == "missing_credentials"
    challenge = headers["WWW-Authenticate"]
    assert challenge.split()[0] == "Bearer"
    assert "error=" not in challenge  # RFC 6750 §3.1: no error code when no token was sent
    assert backend.received == []


async def test_x_user_id_header_is_no_identity_in_jwt_mode(
    hs_proxy: Proxy, backend: Backend
) -> None:
    status, body, _ = await get(hs_proxy, "/api/org/members", {"X-User-Id": "alice"})
    assert status == 401
    assert body["reason"] == "missing_credentials"
    assert backend.received == []


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none_is_401(hs_proxy: Proxy, backend: Backend, alg: str) -> None:
    token = hand_token({"alg": alg, "typ": "JWT"}, claims(sub="alice"), b"")
    status, body, headers = await get(hs_proxy, "/api/org/billing", bearer(token))
    assert status == 401
    assert body["reason"] == "invalid_credentials"
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert backend.received == []


async def test_token_signed_with_another_secret_is_401(hs_proxy: Proxy, backend: Backend) -> None:
    token = jwt.encode(claims(sub="alice"), b"x" * 32, algorithm="HS256")
    status, body, _ = await get(hs_proxy, "/api/org/billing", bearer(token))
    assert status == 401
    assert body["reason"] == "invalid_credentials"
    assert backend.received == []


# --- the org claim --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("org", "path", "status", "reason", "role"),
    [
        ("acme", "/api/org/billing", 200, None, "admin"),
        ("smallco", "/api/org/billing", 403, "missing_permission", None),
        ("smallco", "/api/org/members", 200, None, "developer"),
        (None, "/api/org/members", 403, "not_a_member", None),  # two orgs, none named
        ("smallco", "/api/projects/proj-prod", 403, "not_a_member", None),  # acme's project
        ("acme", "/api/projects/proj-prod", 200, None, "admin"),
    ],
)
async def test_org_claim_selects_the_org(
    hs_proxy: Proxy,
    backend: Backend,
    org: str | None,
    path: str,
    status: int,
    reason: str | None,
    role: str | None,
) -> None:
    extra = {"org_id": org} if org is not None else {}
    got, body, _ = await get(hs_proxy, path, bearer(hs_token(sub="max", **extra)))
    assert got == status
    if reason is not None:
        assert body["reason"] == reason
        assert backend.received == []
        return
    headers = received_headers(backend)
    assert headers["x-auth-user"] == ["max"]
    assert headers["x-auth-org"] == [org]
    assert headers["x-auth-role"] == [role]


# --- RSA public key from a PEM file ---------------------------------------------------------


async def test_rs256_token_verifies_against_the_pem_key(
    rsa_proxy: Proxy, backend: Backend, rsa_private: rsa.RSAPrivateKey
) -> None:
    token = jwt.encode(claims(sub="alice"), rsa_private, algorithm="RS256")
    status, _, _ = await get(rsa_proxy, "/api/org/billing", bearer(token))
    assert status == 200
    assert received_headers(backend)["x-auth-user"] == ["alice"]


async def test_hs256_signed_with_the_public_pem_is_401(
    rsa_proxy: Proxy, backend: Backend, rsa_public_pem: Path
) -> None:
    # Key confusion (CVE-2015-9235 style): the public key is public, so an HMAC "signed" with
    # its PEM bytes must never verify.
    header = {"alg": "HS256", "typ": "JWT"}
    payload = claims(sub="alice")
    signing_input = (
        b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())
    ).encode()
    signature = hmac.new(rsa_public_pem.read_bytes(), signing_input, hashlib.sha256).digest()
    token = hand_token(header, payload, signature)
    status, body, headers = await get(rsa_proxy, "/api/org/billing", bearer(token))
    assert status == 401
    assert body["reason"] == "invalid_credentials"
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert backend.received == []


async def test_non_ascii_bytes_in_a_token_are_a_401_not_a_500(
    backend: Backend, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: a raw 0xFF byte in the bearer token crashed the request (500)."""
    monkeypatch.setenv("RBAC_TEST_JWT_SECRET", "s" * 40)
    proxy = await start_proxy(backend.url, auth="jwt", jwt_secret_env="RBAC_TEST_JWT_SECRET")
    port = proxy.server.proxy_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/org HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\xffb.c.d\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 401"), head
    assert b"X-Request-Id" in head
