"""Tests for proxy.identity: trusted-header identity, JWT verification and JWKS handling."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpServer

from proxy.identity import (
    Authenticator,
    AuthError,
    HeaderAuthenticator,
    JwtAuthenticator,
    TrustedProxies,
    build_authenticator,
)
from proxy.policy.model import Identity, Reason

NOW = 1_700_000_000.0
SECRET = b"s" * 32
NO_COOKIES: dict[str, str] = {}


class Clock:
    """A settable clock in epoch seconds."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hdrs(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


def bearer(token: str) -> CIMultiDict[str]:
    return hdrs(("Authorization", f"Bearer {token}"))


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "org_id": "acme", "exp": NOW + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def pem(private: Any) -> bytes:
    data: bytes = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def hand_token(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes]
               ) -> str:
    signing_input = (
        b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())
    )
    return signing_input + "." + b64url(sign(signing_input.encode()))


async def expect_error(
    auth: Authenticator,
    headers: CIMultiDict[str],
    reason: Reason,
    fragment: str,
    *,
    peer: str | None = "127.0.0.1",
    cookies: dict[str, str] | None = None,
) -> AuthError:
    with pytest.raises(AuthError) as info:
        await auth.authenticate(headers, peer, cookies or NO_COOKIES)
    assert info.value.reason is reason
    assert fragment in info.value.message
    return info.value


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


# ----------------------------------------------------------------------------- TrustedProxies


def test_trusted_proxies_default_loopback() -> None:
    trusted = TrustedProxies.parse("127.0.0.1/32,::1/128")
    assert trusted.contains("127.0.0.1")
    assert trusted.contains("::1")
    assert trusted.contains("[::1]")
    assert trusted.contains("::ffff:127.0.0.1")  # IPv4-mapped IPv6 peer
    assert not trusted.contains("127.0.0.2")
    assert not trusted.contains("10.0.0.1")
    assert not trusted.contains(None)
    assert not trusted.contains("")
    assert not trusted.contains("not-an-ip")
    assert str(trusted) == "127.0.0.1/32,::1/128"


def test_trusted_proxies_networks_and_spaces() -> None:
    trusted = TrustedProxies.parse(" 10.0.0.0/8 , fd00::/8,192.168.1.7 ")
    assert trusted.contains("10.200.3.4")
    assert trusted.contains("fd12::1")
    assert trusted.contains("192.168.1.7")
    assert not trusted.contains("192.168.1.8")
    assert not trusted.contains("11.0.0.1")


def test_trusted_proxies_mapped_network_becomes_ipv4() -> None:
    trusted = TrustedProxies.parse("::ffff:10.0.0.0/104")
    assert trusted.contains("10.1.2.3")
    assert trusted.contains("::ffff:10.1.2.3")
    assert not trusted.contains("11.1.2.3")


def test_trusted_proxies_empty_trusts_no_one() -> None:
    trusted = TrustedProxies.parse("")
    assert trusted.networks == ()
    assert not trusted.contains("127.0.0.1")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
        ("localhost", "not an IP address"),
        ("10.0.0.0/33", "not an IP address"),
        ("127.0.0.1/32,,::1/128", "empty entry"),
        ("127.0.0.1/32,", "empty entry"),
    ],
)
def test_trusted_proxies_parse_errors(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        TrustedProxies.parse(spec)


# ----------------------------------------------------------------------------- header mode


@pytest.fixture
def header_auth() -> HeaderAuthenticator:
    return HeaderAuthenticator(trusted=TrustedProxies.parse("127.0.0.1/32,::1/128"))


async def test_header_trusted_peer(header_auth: HeaderAuthenticator) -> None:
    identity = await header_auth.authenticate(
        hdrs(("x-user-id", "alice"), ("X-Org-Id", "acme")), "127.0.0.1", NO_COOKIES
    )
    assert identity == Identity(user="alice", org="acme")
    assert header_auth.scheme is None


async def test_header_without_org(header_auth: HeaderAuthenticator) -> None:
    identity = await header_auth.authenticate(hdrs(("X-User-Id", "bob")), "::1", NO_COOKIES)
    assert identity == Identity(user="bob", org=None)


async def test_header_ipv4_mapped_peer(header_auth: HeaderAuthenticator) -> None:
    identity = await header_auth.authenticate(
        hdrs(("X-User-Id", "bob")), "::ffff:127.0.0.1", NO_COOKIES
    )
    assert identity.user == "bob"


@pytest.mark.parametrize("peer", ["10.1.2.3", "::2", None, "", "garbage"])
async def test_header_untrusted_peer_counts_as_missing(
    header_auth: HeaderAuthenticator, peer: str | None
) -> None:
    await expect_error(
        header_auth, hdrs(("X-User-Id", "alice")), Reason.MISSING_CREDENTIALS,
        "trusted proxies", peer=peer,
    )


async def test_header_missing_user(header_auth: HeaderAuthenticator) -> None:
    await expect_error(
        header_auth, hdrs(("X-Org-Id", "acme")), Reason.MISSING_CREDENTIALS, "X-User-Id"
    )


async def test_header_duplicated_user(header_auth: HeaderAuthenticator) -> None:
    await expect_error(
        header_auth, hdrs(("X-User-Id", "alice"), ("x-user-id", "admin")),
        Reason.INVALID_CREDENTIALS, "more than once",
    )


async def test_header_duplicated_org(header_auth: HeaderAuthenticator) -> None:
    await expect_error(
        header_auth, hdrs(("X-User-Id", "alice"), ("X-Org-Id", "a"), ("X-Org-Id", "b")),
        Reason.INVALID_CREDENTIALS, "more than once",
    )


@pytest.mark.parametrize(
    "value",
    ["", "a" * 257, "ali\x00ce", "ali\tce", "alice\u202e", "alice, admin", " alice", "\udcff"],
)
async def test_header_malformed_user(header_auth: HeaderAuthenticator, value: str) -> None:
    await expect_error(
        header_auth, hdrs(("X-User-Id", value)), Reason.INVALID_CREDENTIALS, "malformed"
    )


async def test_header_malformed_org(header_auth: HeaderAuthenticator) -> None:
    await expect_error(
        header_auth, hdrs(("X-User-Id", "alice"), ("X-Org-Id", "")),
        Reason.INVALID_CREDENTIALS, "X-Org-Id",
    )


async def test_header_max_length_and_unicode_accepted(header_auth: HeaderAuthenticator) -> None:
    identity = await header_auth.authenticate(
        hdrs(("X-User-Id", "a" * 256), ("X-Org-Id", "Zürich GmbH")), "127.0.0.1", NO_COOKIES
    )
    assert identity == Identity(user="a" * 256, org="Zürich GmbH")


async def test_header_custom_names() -> None:
    auth = HeaderAuthenticator(
        trusted=TrustedProxies.parse("10.0.0.0/8"), user_header="X-Email", org_header="X-Tenant"
    )
    identity = await auth.authenticate(
        hdrs(("X-Email", "a@example.com"), ("X-Tenant", "t1"), ("X-User-Id", "ignored")),
        "10.9.9.9", NO_COOKIES,
    )
    assert identity == Identity(user="a@example.com", org="t1")


def test_header_bad_configuration() -> None:
    with pytest.raises(ValueError, match="not a valid HTTP header name"):
        HeaderAuthenticator(user_header="X User")
    with pytest.raises(ValueError, match="must differ"):
        HeaderAuthenticator(user_header="X-Id", org_header="x-id")


async def test_header_default_trusts_loopback_only() -> None:
    auth = HeaderAuthenticator()
    assert (await auth.authenticate(hdrs(("X-User-Id", "a")), "::1", NO_COOKIES)).user == "a"
    await expect_error(auth, hdrs(("X-User-Id", "a")), Reason.MISSING_CREDENTIALS, "trusted",
                       peer="192.0.2.1")
    await auth.close()


# ----------------------------------------------------------------------------- JWT: keys


def hs_auth(**kwargs: Any) -> JwtAuthenticator:
    kwargs.setdefault("clock", Clock())
    return JwtAuthenticator(secret=SECRET, **kwargs)


async def test_jwt_valid_hs256() -> None:
    auth = hs_auth()
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert await auth.authenticate(bearer(token), None, NO_COOKIES) == Identity("alice", "acme")
    assert auth.scheme == "Bearer"


async def test_jwt_hs512_needs_a_long_enough_secret() -> None:
    long_secret = b"k" * 64
    auth = JwtAuthenticator(secret=long_secret, clock=Clock())
    token = jwt.encode(claims(), long_secret, algorithm="HS512")
    assert (await auth.authenticate(bearer(token), None, NO_COOKIES)).user == "alice"
    # A 32-byte secret is too short for HS512 (RFC 7518 §3.2): the algorithm is not offered.
    short = hs_auth()
    token = hand_token(
        {"alg": "HS512", "typ": "JWT"}, claims(),
        lambda m: hmac.new(SECRET, m, hashlib.sha512).digest(),
    )
    await expect_error(short, bearer(token), Reason.INVALID_CREDENTIALS, "algorithm")


async def test_jwt_valid_rs256_and_ps256(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = JwtAuthenticator(key_pem=pem(rsa_key), clock=Clock())
    for alg in ("RS256", "PS256"):
        token = jwt.encode(claims(sub="bob"), rsa_key, algorithm=alg)
        assert (await auth.authenticate(bearer(token), None, NO_COOKIES)).user == "bob"


async def test_jwt_valid_es256(ec_key: ec.EllipticCurvePrivateKey) -> None:
    auth = JwtAuthenticator(key_pem=pem(ec_key), clock=Clock())
    token = jwt.encode(claims(), ec_key, algorithm="ES256")
    assert (await auth.authenticate(bearer(token), None, NO_COOKIES)).user == "alice"


async def test_jwt_ec_key_rejects_other_curve_algorithm(
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    auth = JwtAuthenticator(key_pem=pem(ec_key), clock=Clock())
    other = ec.generate_private_key(ec.SECP384R1())
    token = jwt.encode(claims(), other, algorithm="ES384")
    await expect_error(auth, bearer(token), Reason.INVALID_CREDENTIALS, "algorithm")


async def test_jwt_valid_eddsa(ed_key: ed25519.Ed25519PrivateKey) -> None:
    auth = JwtAuthenticator(key_pem=pem(ed_key), clock=Clock())
    token = jwt.encode(claims(), ed_key, algorithm="EdDSA")
    assert (await auth.authenticate(bearer(token), None, NO_COOKIES)).user == "alice"


async def test_jwt_valid_ed448() -> None:
    key = ed448.Ed448PrivateKey.generate()
    auth = JwtAuthenticator(key_pem=pem(key), clock=Clock())
    token = jwt.encode(claims(), key, algorithm="EdDSA")
    assert (await auth.authenticate(bearer(token), None, NO_COOKIES)).user == "alice"


def test_jwt_exactly_one_key_source(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        JwtAuthenticator()
    with pytest.raises(ValueError, match="exactly one"):
        JwtAuthenticator(secret=SECRET, key_pem=pem(rsa_key))


def test_jwt_key_configuration_errors(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="at least 32"):
        JwtAuthenticator(secret=b"short")
    private_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="private key"):
        JwtAuthenticator(key_pem=private_pem)
    with pytest.raises(ValueError, match="not a readable PEM"):
        JwtAuthenticator(key_pem=b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    # A deliberately weak key: the constructor must refuse it.
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    with pytest.raises(ValueError, match="too short"):
        JwtAuthenticator(key_pem=pem(weak))
    with pytest.raises(ValueError, match="only http"):
        JwtAuthenticator(jwks="ftp://example.test/jwks.json")
    with pytest.raises(ValueError, match="JWKS file"):
        JwtAuthenticator(jwks="/nonexistent/jwks.json")


# ----------------------------------------------------------------------------- JWT: claims


async def test_jwt_expired() -> None:
    token = jwt.encode(claims(exp=NOW - 31), SECRET, algorithm="HS256")
    await expect_error(hs_auth(), bearer(token), Reason.INVALID_CREDENTIALS, "token expired")


async def test_jwt_expired_within_leeway() -> None:
    token = jwt.encode(claims(exp=NOW - 29), SECRET, algorithm="HS256")
    assert (await hs_auth().authenticate(bearer(token), None, NO_COOKIES)).user == "alice"
    # Without leeway the same token is refused.
    await expect_error(hs_auth(leeway=0), bearer(token), Reason.INVALID_CREDENTIALS, "expired")


async def test_jwt_expiry_follows_the_clock() -> None:
    clock = Clock()
    auth = hs_auth(clock=clock, leeway=0)
    token = jwt.encode(claims(exp=NOW + 10), SECRET, algorithm="HS256")
    assert (await auth.authenticate(bearer(token), None, NO_COOKIES)).user == "alice"
    clock.now = NOW + 10
    await expect_error(auth, bearer(token), Reason.INVALID_CREDENTIALS, "expired")


async def test_jwt_not_yet_valid() -> None:
    token = jwt.encode(claims(nbf=NOW + 60), SECRET, algorithm="HS256")
    await expect_error(hs_auth(), bearer(token), Reason.INVALID_CREDENTIALS, "not yet valid")
    soon = jwt.encode(claims(nbf=NOW + 20), SECRET, algorithm="HS256")
    assert (await hs_auth().authenticate(bearer(soon), None, NO_COOKIES)).user == "alice"


async def test_jwt_exp_is_required() -> None:
    token = jwt.encode(claims(exp=None), SECRET, algorithm="HS256")
    await expect_error(hs_auth(), bearer(token), Reason.INVALID_CREDENTIALS, "no exp claim")


@pytest.mark.parametrize("exp", ["tomorrow", True, None])
async def test_jwt_malformed_exp(exp: Any) -> None:
    payload = claims()
    payload["exp"] = exp
    token = jwt.encode(payload, SECRET, algorithm="HS256")
    await expect_error(hs_auth(), bearer(token), Reason.INVALID_CREDENTIALS, "exp claim")


async def test_jwt_issuer() -> None:
    auth = hs_auth(issuer="https://idp.example")
    good = jwt.encode(claims(iss="https://idp.example"), SECRET, algorithm="HS256")
    assert (await auth.authenticate(bearer(good), None, NO_COOKIES)).user == "alice"
    wrong = jwt.encode(claims(iss="https://evil.example"), SECRET, algorithm="HS256")
    await expect_error(auth, bearer(wrong), Reason.INVALID_CREDENTIALS, "wrong issuer")
    missing = jwt.encode(claims(), SECRET, algorithm="HS256")
    await expect_error(auth, bearer(missing), Reason.INVALID_CREDENTIALS, "no iss claim")


async def test_jwt_audience() -> None:
    auth = hs_auth(audience="dashboard")
    good = jwt.encode(claims(aud=["other", "dashboard"]), SECRET, algorithm="HS256")
    assert (await auth.authenticate(bearer(good), None, NO_COOKIES)).user == "alice"
    wrong = jwt.encode(claims(aud="billing"), SECRET, algorithm="HS256")
    await expect_error(auth, bearer(wrong), Reason.INVALID_CREDENTIALS, "wrong audience")
    missing = jwt.encode(claims(), SECRET, algorithm="HS256")
    await expect_error(auth, bearer(missing), Reason.INVALID_CREDENTIALS, "no aud claim")


async def test_jwt_token_audience_without_configured_audience() -> None:
    # RFC 7519 §4.1.3: a token meant for someone else is refused by a proxy that has no name.
    token = jwt.encode(claims(aud="billing"), SECRET, algorithm="HS256")
    await expect_error(hs_auth(), bearer(token), Reason.INVALID_CREDENTIALS, "wrong audience")


async def test_jwt_missing_sub() -> None:
    token = jwt.encode(claims(sub=None), SECRET, algorithm="HS256")
    await expect_error(hs_auth(), bearer(token), Reason.INVALID_CREDENTIALS, "no sub claim")


@pytest.mark.parametrize("sub", ["", 42, "x" * 257, "a\nb"])
async def test_jwt_malformed_sub(sub: Any) -> None:
    payload = claims()
    payload["sub"] = sub
    token = hand_token(
        {"alg": "HS256"}, payload, lambda m: hmac.new(SECRET, m, hashlib.sha256).digest()
    )
    await expect_error(hs_auth(), bearer(token), Reason.INVALID_CREDENTIALS, "sub")


async def test_jwt_custom_claims_and_optional_org() -> None:
    auth = hs_auth(user_claim="email", org_claim="tenant")
    token = jwt.encode(claims(email="cn=a,ou=people"), SECRET, algorithm="HS256")
    assert await auth.authenticate(bearer(token), None, NO_COOKIES) == Identity(
        "cn=a,ou=people", None
    )
    bad_org = jwt.encode(claims(email="a", tenant=7), SECRET, algorithm="HS256")
    await expect_error(auth, bearer(bad_org), Reason.INVALID_CREDENTIALS, "tenant")


# ----------------------------------------------------------------------------- JWT: attacks


async def test_jwt_wrong_key() -> None:
    token = jwt.encode(claims(), b"o" * 32, algorithm="HS256")
    await expect_error(hs_auth(), bearer(token), Reason.INVALID_CREDENTIALS, "bad signature")


async def test_jwt_wrong_rsa_key(
    rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    auth = JwtAuthenticator(key_pem=pem(rsa_key), clock=Clock())
    token = jwt.encode(claims(), rsa_key2, algorithm="RS256")
    await expect_error(auth, bearer(token), Reason.INVALID_CREDENTIALS, "bad signature")


async def test_jwt_tampered_payload(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = JwtAuthenticator(key_pem=pem(rsa_key), clock=Clock())
    header, _, signature = jwt.encode(claims(), rsa_key, algorithm="RS256").split(".")
    forged = b64url(json.dumps(claims(sub="admin")).encode())
    await expect_error(
        auth, bearer(f"{header}.{forged}.{signature}"), Reason.INVALID_CREDENTIALS,
        "bad signature",
    )


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_jwt_alg_none(alg: str, rsa_key: rsa.RSAPrivateKey) -> None:
    token = (
        b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        + "." + b64url(json.dumps(claims()).encode()) + "."
    )
    for auth in (hs_auth(), JwtAuthenticator(key_pem=pem(rsa_key), clock=Clock())):
        await expect_error(auth, bearer(token), Reason.INVALID_CREDENTIALS, "algorithm")


async def test_jwt_algorithm_confusion_hs256_with_rsa_public_key(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    public_pem = pem(rsa_key)
    auth = JwtAuthenticator(key_pem=public_pem, clock=Clock())
    # The classic attack: HMAC-sign with the (public) PEM bytes as the shared secret.
    token = hand_token(
        {"alg": "HS256", "typ": "JWT"}, claims(sub="admin"),
        lambda m: hmac.new(public_pem, m, hashlib.sha256).digest(),
    )
    await expect_error(auth, bearer(token), Reason.INVALID_CREDENTIALS, "algorithm")


async def test_jwt_rs256_token_against_hs_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    await expect_error(hs_auth(), bearer(token), Reason.INVALID_CREDENTIALS, "algorithm")


@pytest.mark.parametrize("token", ["abc", "a.b.c", "....", "x" * 9000])
async def test_jwt_garbage_token(token: str) -> None:
    await expect_error(hs_auth(), bearer(token), Reason.INVALID_CREDENTIALS, "token")


# ----------------------------------------------------------------------------- JWT: transport


async def test_jwt_scheme_is_case_insensitive() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    headers = hdrs(("authorization", f"bEaReR  {token}"))
    assert (await hs_auth().authenticate(headers, None, NO_COOKIES)).user == "alice"


async def test_jwt_cookie_token() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    auth = hs_auth(cookie="session")
    assert (await auth.authenticate(hdrs(), None, {"session": token})).user == "alice"
    # Without a configured cookie name, cookies are never read.
    await expect_error(hs_auth(), hdrs(), Reason.MISSING_CREDENTIALS, "no bearer token",
                       cookies={"session": token})


@pytest.mark.parametrize(
    "lines",
    [
        ["session={sue}; session={alice}"],
        ["session={sue}", "theme=dark; session={alice}"],
        ["session={alice};session= {alice}"],
    ],
)
async def test_jwt_cookie_sent_twice_is_invalid(lines: list[str]) -> None:
    """Which copy a backend reads is its parser's choice: the proxy refuses to pick one."""
    alice = jwt.encode(claims(), SECRET, algorithm="HS256")
    sue = jwt.encode(claims(sub="sue"), SECRET, algorithm="HS256")
    headers = hdrs(*(("Cookie", line.format(alice=alice, sue=sue)) for line in lines))
    await expect_error(hs_auth(cookie="session"), headers, Reason.INVALID_CREDENTIALS,
                       "more than once", cookies={"session": alice})


async def test_jwt_cookie_beside_other_cookies_is_read() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    headers = hdrs(("Cookie", f"sessionx=1; theme=dark; session={token}"))
    auth = hs_auth(cookie="session")
    assert (await auth.authenticate(headers, None, {"session": token})).user == "alice"


async def test_jwt_authorization_header_wins_over_cookie() -> None:
    good = jwt.encode(claims(sub="header-user"), SECRET, algorithm="HS256")
    cookie = jwt.encode(claims(sub="cookie-user"), SECRET, algorithm="HS256")
    auth = hs_auth(cookie="session")
    identity = await auth.authenticate(bearer(good), None, {"session": cookie})
    assert identity.user == "header-user"


async def test_jwt_missing_token() -> None:
    await expect_error(hs_auth(cookie="session"), hdrs(), Reason.MISSING_CREDENTIALS,
                       "no bearer token", cookies={"other": "x"})


@pytest.mark.parametrize(
    "value", ["Basic YWxpY2U6cHc=", "Token abc", "Bearer", "Bearer a b", "", "Bearertoken"]
)
async def test_jwt_bad_authorization_header(value: str) -> None:
    await expect_error(hs_auth(), hdrs(("Authorization", value)), Reason.INVALID_CREDENTIALS,
                       "")


async def test_jwt_two_authorization_headers() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    headers = hdrs(("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}"))
    await expect_error(hs_auth(), headers, Reason.INVALID_CREDENTIALS, "more than once")


# ----------------------------------------------------------------------------- JWKS


def jwk(private: Any, kid: str, **extra: Any) -> dict[str, Any]:
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        data = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**data, "kid": kid, **extra}


@dataclass
class JwksServer:
    """A JWKS endpoint on 127.0.0.1 whose content and status the test controls."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    hits: int = 0
    url: str = ""
    gate: asyncio.Event | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.status != 200:
            return web.Response(status=self.status, text="down")
        return web.json_response({"keys": self.keys})


@pytest.fixture
async def jwks_server(aiohttp_server: AiohttpServer) -> JwksServer:
    state = JwksServer()
    app = web.Application()
    app.router.add_get("/jwks.json", state.handle)
    server = await aiohttp_server(app)
    state.url = str(server.make_url("/jwks.json"))
    return state


@pytest.fixture
async def make_jwks_auth() -> AsyncIterator[Callable[..., JwtAuthenticator]]:
    created: list[JwtAuthenticator] = []

    def make(**kwargs: Any) -> JwtAuthenticator:
        auth = JwtAuthenticator(**kwargs)
        created.append(auth)
        return auth

    yield make
    for auth in created:
        await auth.close()


def rs(private: rsa.RSAPrivateKey, kid: str | None, **payload: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**payload), private, algorithm="RS256", headers=headers)


async def test_jwks_url_valid_token_and_lazy_fetch(
    jwks_server: JwksServer, make_jwks_auth: Callable[..., JwtAuthenticator],
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    jwks_server.keys = [jwk(rsa_key, "r1"), jwk(ec_key, "e1"), jwk(ed_key, "d1")]
    auth = make_jwks_auth(jwks=jwks_server.url, clock=Clock())
    assert jwks_server.hits == 0  # nothing fetched at construction
    assert (await auth.authenticate(bearer(rs(rsa_key, "r1")), None, NO_COOKIES)).user == "alice"
    es = jwt.encode(claims(sub="e"), ec_key, algorithm="ES256", headers={"kid": "e1"})
    assert (await auth.authenticate(bearer(es), None, NO_COOKIES)).user == "e"
    ed = jwt.encode(claims(sub="d"), ed_key, algorithm="EdDSA", headers={"kid": "d1"})
    assert (await auth.authenticate(bearer(ed), None, NO_COOKIES)).user == "d"
    assert jwks_server.hits == 1  # cached after the first fetch


async def test_jwks_key_family_is_enforced_per_key(
    jwks_server: JwksServer, make_jwks_auth: Callable[..., JwtAuthenticator],
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    jwks_server.keys = [jwk(rsa_key, "r1")]
    auth = make_jwks_auth(jwks=jwks_server.url, clock=Clock())
    public_pem = pem(rsa_key)
    confused = hand_token(
        {"alg": "HS256", "kid": "r1"}, claims(),
        lambda m: hmac.new(public_pem, m, hashlib.sha256).digest(),
    )
    await expect_error(auth, bearer(confused), Reason.INVALID_CREDENTIALS, "algorithm")


async def test_jwks_alg_pins_the_algorithm(
    jwks_server: JwksServer, make_jwks_auth: Callable[..., JwtAuthenticator],
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    jwks_server.keys = [jwk(rsa_key, "r1", alg="PS256")]
    auth = make_jwks_auth(jwks=jwks_server.url, clock=Clock())
    await expect_error(auth, bearer(rs(rsa_key, "r1")), Reason.INVALID_CREDENTIALS, "algorithm")
    ps = jwt.encode(claims(), rsa_key, algorithm="PS256", headers={"kid": "r1"})
    assert (await auth.authenticate(bearer(ps), None, NO_COOKIES)).user == "alice"


async def test_jwks_unusable_keys_are_skipped(
    jwks_server: JwksServer, make_jwks_auth: Callable[..., JwtAuthenticator],
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    private_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key))
    jwks_server.keys = [
        {**private_jwk, "kid": "leaked"},  # private key material: never trusted
        {"kty": "oct", "k": b64url(SECRET), "kid": "sym"},
        {**jwk(rsa_key, "enc"), "use": "enc"},
        {"kty": "RSA", "kid": "broken"},
        jwk(rsa_key, "ok"),
    ]
    auth = make_jwks_auth(jwks=jwks_server.url, clock=Clock())
    assert (await auth.authenticate(bearer(rs(rsa_key, "ok")), None, NO_COOKIES)).user == "alice"
    for kid in ("leaked", "enc", "broken"):
        await expect_error(auth, bearer(rs(rsa_key, kid)), Reason.INVALID_CREDENTIALS,
                           "unknown signing key")
    sym = jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "sym"})
    await expect_error(auth, bearer(sym), Reason.INVALID_CREDENTIALS, "unknown signing key")


async def test_jwks_rotation_picked_up_after_refetch(
    jwks_server: JwksServer, make_jwks_auth: Callable[..., JwtAuthenticator],
    rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey,
) -> None:
    clock = Clock()
    jwks_server.keys = [jwk(rsa_key, "k1")]
    auth = make_jwks_auth(jwks=jwks_server.url, clock=clock, jwks_min_refetch=30)
    assert (await auth.authenticate(bearer(rs(rsa_key, "k1")), None, NO_COOKIES)).user == "alice"
    assert jwks_server.hits == 1
    # The IdP rotates to k2; a k2 token arrives after the rate-limit window.
    jwks_server.keys = [jwk(rsa_key, "k1"), jwk(rsa_key2, "k2")]
    clock.now += 31
    token = rs(rsa_key2, "k2", sub="bob")
    assert (await auth.authenticate(bearer(token), None, NO_COOKIES)).user == "bob"
    assert jwks_server.hits == 2
    # Both keys are now cached: no further fetch.
    await auth.authenticate(bearer(rs(rsa_key, "k1")), None, NO_COOKIES)
    await auth.authenticate(bearer(token), None, NO_COOKIES)
    assert jwks_server.hits == 2


async def test_jwks_refetch_is_rate_limited(
    jwks_server: JwksServer, make_jwks_auth: Callable[..., JwtAuthenticator],
    rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey,
) -> None:
    clock = Clock()
    jwks_server.keys = [jwk(rsa_key, "k1")]
    auth = make_jwks_auth(jwks=jwks_server.url, clock=clock, jwks_min_refetch=30)
    await auth.authenticate(bearer(rs(rsa_key, "k1")), None, NO_COOKIES)
    clock.now += 31
    await expect_error(auth, bearer(rs(rsa_key2, "x1")), Reason.INVALID_CREDENTIALS,
                       "unknown signing key")
    assert jwks_server.hits == 2  # the first unknown kid refetched
    # The IdP now publishes k2, but a second unknown kid within the window does not refetch.
    jwks_server.keys = [jwk(rsa_key, "k1"), jwk(rsa_key2, "k2")]
    clock.now += 10
    await expect_error(auth, bearer(rs(rsa_key2, "k2")), Reason.INVALID_CREDENTIALS,
                       "unknown signing key")
    assert jwks_server.hits == 2
    # Once the window has passed, the next unknown kid refetches and succeeds.
    clock.now += 21
    assert (await auth.authenticate(bearer(rs(rsa_key2, "k2")), None, NO_COOKIES)).user
    assert jwks_server.hits == 3


async def test_jwks_concurrent_unknown_kid_fetches_once(
    jwks_server: JwksServer, make_jwks_auth: Callable[..., JwtAuthenticator],
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    jwks_server.keys = [jwk(rsa_key, "k1")]
    jwks_server.gate = asyncio.Event()
    auth = make_jwks_auth(jwks=jwks_server.url, clock=Clock())
    token = rs(rsa_key, "k1")
    tasks = [
        asyncio.create_task(auth.authenticate(bearer(token), None, NO_COOKIES))
        for _ in range(10)
    ]
    for _ in range(100):  # let every task reach the lock or the server
        await asyncio.sleep(0)
        if jwks_server.hits:
            break
    jwks_server.gate.set()
    identities = await asyncio.gather(*tasks)
    assert {i.user for i in identities} == {"alice"}
    assert jwks_server.hits == 1


async def test_jwks_unavailable_fails_closed(
    jwks_server: JwksServer, make_jwks_auth: Callable[..., JwtAuthenticator],
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    clock = Clock()
    jwks_server.status = 500
    auth = make_jwks_auth(jwks=jwks_server.url, clock=clock, jwks_min_refetch=30)
    await expect_error(auth, bearer(rs(rsa_key, "k1")), Reason.INVALID_CREDENTIALS,
                       "signing keys unavailable")
    # Within the window no new attempt is made; after it, recovery is picked up.
    await expect_error(auth, bearer(rs(rsa_key, "k1")), Reason.INVALID_CREDENTIALS,
                       "signing keys unavailable")
    assert jwks_server.hits == 1
    jwks_server.status = 200
    jwks_server.keys = [jwk(rsa_key, "k1")]
    clock.now += 30
    assert (await auth.authenticate(bearer(rs(rsa_key, "k1")), None, NO_COOKIES)).user == "alice"
    assert jwks_server.hits == 2


async def test_jwks_unreachable_server(
    make_jwks_auth: Callable[..., JwtAuthenticator], rsa_key: rsa.RSAPrivateKey,
    aiohttp_server: AiohttpServer,
) -> None:
    server = await aiohttp_server(web.Application())
    url = str(server.make_url("/jwks.json"))
    await server.close()  # nothing listens there any more
    auth = make_jwks_auth(jwks=url, clock=Clock(), jwks_timeout=2.0)
    await expect_error(auth, bearer(rs(rsa_key, "k1")), Reason.INVALID_CREDENTIALS,
                       "signing keys unavailable")


async def test_jwks_removed_key_stops_verifying_after_max_age(
    jwks_server: JwksServer, make_jwks_auth: Callable[..., JwtAuthenticator],
    rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey,
) -> None:
    clock = Clock()
    jwks_server.keys = [jwk(rsa_key, "k1"), jwk(rsa_key2, "k2")]
    auth = make_jwks_auth(jwks=jwks_server.url, clock=clock, jwks_max_age=600)
    token = rs(rsa_key, "k1", exp=NOW + 10_000)
    await auth.authenticate(bearer(token), None, NO_COOKIES)
    jwks_server.keys = [jwk(rsa_key2, "k2")]  # k1 revoked at the IdP
    clock.now += 599
    await auth.authenticate(bearer(token), None, NO_COOKIES)
    assert jwks_server.hits == 1
    clock.now += 2
    await expect_error(auth, bearer(token), Reason.INVALID_CREDENTIALS, "unknown signing key")
    assert jwks_server.hits == 2


async def test_jwks_stale_set_kept_when_refresh_fails(
    jwks_server: JwksServer, make_jwks_auth: Callable[..., JwtAuthenticator],
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    clock = Clock()
    jwks_server.keys = [jwk(rsa_key, "k1")]
    auth = make_jwks_auth(jwks=jwks_server.url, clock=clock, jwks_max_age=600)
    token = rs(rsa_key, "k1", exp=NOW + 10_000)
    await auth.authenticate(bearer(token), None, NO_COOKIES)
    jwks_server.status = 503
    clock.now += 700
    assert (await auth.authenticate(bearer(token), None, NO_COOKIES)).user == "alice"
    assert jwks_server.hits == 2


async def test_jwks_token_without_kid(
    jwks_server: JwksServer, make_jwks_auth: Callable[..., JwtAuthenticator],
    rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey,
) -> None:
    jwks_server.keys = [jwk(rsa_key, "k1")]
    auth = make_jwks_auth(jwks=jwks_server.url, clock=Clock())
    # A single-key set leaves no ambiguity.
    assert (await auth.authenticate(bearer(rs(rsa_key, None)), None, NO_COOKIES)).user == "alice"
    jwks_server.keys = [jwk(rsa_key, "k1"), jwk(rsa_key2, "k2")]
    two = make_jwks_auth(jwks=jwks_server.url, clock=Clock())
    await expect_error(two, bearer(rs(rsa_key, None)), Reason.INVALID_CREDENTIALS, "no kid")


async def test_jwks_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey,
                         rsa_key2: rsa.RSAPrivateKey) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(rsa_key, "k1")]}))
    clock = Clock()
    auth = JwtAuthenticator(jwks=str(path), clock=clock)
    assert (await auth.authenticate(bearer(rs(rsa_key, "k1")), None, NO_COOKIES)).user == "alice"
    # A rotated file is re-read on an unknown kid once the window has passed.
    path.write_text(json.dumps({"keys": [jwk(rsa_key2, "k2")]}))
    await expect_error(auth, bearer(rs(rsa_key2, "k2")), Reason.INVALID_CREDENTIALS, "unknown")
    clock.now += 31
    assert (await auth.authenticate(bearer(rs(rsa_key2, "k2")), None, NO_COOKIES)).user
    await auth.close()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("not json", "not valid JSON"), ('{"keys": 3}', "no 'keys' list"),
     ('{"keys": [{"kty": "oct", "k": "AAAA"}]}', "no usable")],
)
def test_jwks_file_errors(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=fragment):
        JwtAuthenticator(jwks=str(path))


async def test_jwks_uses_given_session_and_leaves_it_open(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey,
) -> None:
    jwks_server.keys = [jwk(rsa_key, "k1")]
    async with aiohttp.ClientSession() as session:
        auth = JwtAuthenticator(jwks=jwks_server.url, session=session, clock=Clock())
        assert (await auth.authenticate(bearer(rs(rsa_key, "k1")), None, NO_COOKIES)).user
        await auth.close()
        assert not session.closed


# ----------------------------------------------------------------------------- factory


async def test_build_authenticator(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    header = build_authenticator("header", trusted_proxies="10.0.0.0/8")
    assert isinstance(header, HeaderAuthenticator)
    assert header.trusted.contains("10.1.1.1")

    secret_auth = build_authenticator(
        "jwt", jwt_secret_env="JWT_SECRET", environ={"JWT_SECRET": SECRET.decode()}
    )
    token = jwt.encode(claims(exp=4_000_000_000), SECRET, algorithm="HS256")
    assert (await secret_auth.authenticate(bearer(token), None, NO_COOKIES)).user == "alice"

    key_file = tmp_path / "key.pem"
    key_file.write_bytes(pem(rsa_key))
    key_auth = build_authenticator("jwt", jwt_key=str(key_file))
    token = jwt.encode(claims(exp=4_000_000_000), rsa_key, algorithm="RS256")
    assert (await key_auth.authenticate(bearer(token), None, NO_COOKIES)).user == "alice"

    with pytest.raises(ValueError, match="unset or empty"):
        build_authenticator("jwt", jwt_secret_env="NOPE", environ={})
    with pytest.raises(ValueError, match="key file"):
        build_authenticator("jwt", jwt_key=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="unknown auth mode"):
        build_authenticator("basic")

