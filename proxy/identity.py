"""Caller identity: who sent a request, from trusted headers or from a verified JWT (SPEC §5)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import os
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt import exceptions as jwt_errors
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.policy.model import Identity, Reason

logger = logging.getLogger(__name__)

DEFAULT_TRUSTED_PROXIES = "127.0.0.1/32,::1/128"
DEFAULT_USER_HEADER = "X-User-Id"
DEFAULT_ORG_HEADER = "X-Org-Id"

# Longest user or org id accepted; ids travel into store lookups, logs and upstream headers.
MAX_ID_LENGTH = 256
# A JWT longer than this is refused before any parsing (aiohttp caps a header line at 8190
# bytes anyway; cookies get the same bound).
MAX_TOKEN_LENGTH = 8192
# A JWKS document larger than this is refused: it is read into memory.
MAX_JWKS_BYTES = 1 << 20

# Unicode categories never allowed in an id: controls (header/log injection), format
# characters such as U+202E (log spoofing), lone surrogates (undecodable bytes that aiohttp
# passes through as surrogate escapes) and line/paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

# RFC 9110 §5.6.2 token characters, for configured header names.
_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

_RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
# RFC 7518 §3.4 binds each ECDSA algorithm to one curve; RFC 8812 §3.2 adds ES256K.
_EC_ALGORITHMS: Mapping[str, tuple[str, ...]] = {
    "secp256r1": ("ES256",),
    "secp384r1": ("ES384",),
    "secp521r1": ("ES512",),
    "secp256k1": ("ES256K",),
}
_EDDSA_ALGORITHMS = ("EdDSA",)  # RFC 8037 §3.1: Ed25519 and Ed448
_ASYMMETRIC_ALGORITHMS = frozenset(
    {*_RSA_ALGORITHMS, *(a for algs in _EC_ALGORITHMS.values() for a in algs), *_EDDSA_ALGORITHMS}
)
# RFC 7518 §3.2: an HMAC key must be at least as long as the hash output.
_HMAC_MIN_BYTES = (("HS256", 32), ("HS384", 48), ("HS512", 64))
# NIST SP 800-131A: RSA keys below 2048 bits are disallowed for signatures.
_RSA_MIN_BITS = 2048

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
VerifyKey = PublicKey | bytes  # bytes: an HMAC secret


class AuthError(Exception):
    """The request carries no usable identity; answered with 401 and the reason."""

    def __init__(self, reason: Reason, message: str) -> None:
        # message is shown to the client: it never contains a token, a claim value or a key.
        self.reason = reason
        self.message = message
        super().__init__(message)


class Authenticator(Protocol):
    """What the request pipeline needs from an identity source."""

    scheme: str | None  # the 401 WWW-Authenticate scheme, None when there is none

    async def authenticate(
        self,
        headers: CIMultiDictProxy[str] | CIMultiDict[str],
        peer: str | None,
        cookies: Mapping[str, str],
    ) -> Identity: ...

    async def close(self) -> None: ...


def _missing(message: str) -> AuthError:
    return AuthError(Reason.MISSING_CREDENTIALS, message)


def _invalid(message: str) -> AuthError:
    return AuthError(Reason.INVALID_CREDENTIALS, message)


def _valid_id(value: str, *, allow_comma: bool) -> bool:
    """An id is 1..256 characters, no surrounding space, no control or format characters."""
    if not value or len(value) > MAX_ID_LENGTH or value != value.strip():
        return False
    if not allow_comma and "," in value:
        return False
    if value.isascii():
        # Printable ASCII has no control or format characters: skip the per-character check.
        return value.isprintable()
    return not any(unicodedata.category(ch) in _FORBIDDEN_CATEGORIES for ch in value)


def _check_header_name(name: str, what: str) -> str:
    if not name or not set(name) <= _TCHARS:
        raise ValueError(f"{what} {name!r} is not a valid HTTP header name")
    return name


# --------------------------------------------------------------------------- trusted peers

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmap(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (RFC 4291 §2.5.5.2) is the IPv4 peer it stands for."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _network_error(item: str) -> str:
    try:
        loose = ipaddress.ip_network(item, strict=False)
    except ValueError:
        return f"trusted proxies: {item!r} is not an IP address or CIDR network"
    return f"trusted proxies: {item!r} has host bits set; did you mean {loose}?"


class TrustedProxies:
    """The set of peer networks whose identity and forwarding headers are believed."""

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        self._networks = tuple(networks)
        self._memo: dict[str, bool] = {}  # peer text -> trusted; bounded in contains()

    @classmethod
    def parse(cls, spec: str) -> TrustedProxies:
        """Parse a comma-separated list of addresses or CIDR networks; "" trusts no one.

        Raises ValueError naming the offending item.
        """
        networks: list[IPNetwork] = []
        if not spec.strip():
            return cls(networks)
        for raw in spec.split(","):
            item = raw.strip()
            if not item:
                raise ValueError(f"trusted proxies {spec!r}: empty entry")
            try:
                network = ipaddress.ip_network(item, strict=True)
            except ValueError:
                raise ValueError(_network_error(item)) from None
            # Peers are compared unmapped, so an IPv4-mapped network becomes its IPv4 form.
            if (
                isinstance(network, ipaddress.IPv6Network)
                and network.prefixlen >= 96
                and network.subnet_of(_MAPPED_V4)
            ):
                mapped = network.network_address.ipv4_mapped
                assert mapped is not None  # guaranteed by subnet_of above
                network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
            networks.append(network)
        return cls(networks)

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return self._networks

    def contains(self, peer: str | None) -> bool:
        """True when the peer address lies in a trusted network; unknown peers are untrusted."""
        if not peer or not self._networks:
            return False
        known = self._memo.get(peer)
        if known is None:
            # Parsing an address costs microseconds on every request; peers repeat.
            if len(self._memo) >= 4096:
                self._memo.clear()
            known = self._memo[peer] = self._check(peer)
        return known

    def _check(self, peer: str) -> bool:
        text = peer.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        try:
            address = _unmap(ipaddress.ip_address(text))
        except ValueError:
            return False
        return any(
            address.version == network.version and address in network
            for network in self._networks
        )

    def __str__(self) -> str:
        return ",".join(str(n) for n in self._networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({str(self)!r})"


# --------------------------------------------------------------------------- header mode


class HeaderAuthenticator:
    """Identity from headers set by a trusted front proxy (SPEC §5 `--auth header`)."""

    scheme: str | None = None

    def __init__(
        self,
        *,
        trusted: TrustedProxies | None = None,
        user_header: str = DEFAULT_USER_HEADER,
        org_header: str = DEFAULT_ORG_HEADER,
    ) -> None:
        self.user_header = _check_header_name(user_header, "user header")
        self.org_header = _check_header_name(org_header, "org header")
        if user_header.lower() == org_header.lower():
            raise ValueError("user header and org header must differ")
        self.trusted = trusted if trusted is not None else TrustedProxies.parse(
            DEFAULT_TRUSTED_PROXIES
        )

    async def authenticate(
        self,
        headers: CIMultiDictProxy[str] | CIMultiDict[str],
        peer: str | None,
        cookies: Mapping[str, str],
    ) -> Identity:
        # Anyone can send these headers; only a trusted proxy's copy means anything.
        if not self.trusted.contains(peer):
            raise _missing("identity headers are only accepted from trusted proxies")
        user = self._single(headers, self.user_header)
        if user is None:
            raise _missing(f"missing {self.user_header} header")
        org = self._single(headers, self.org_header)
        return Identity(user=user, org=org)

    @staticmethod
    def _single(headers: CIMultiDictProxy[str] | CIMultiDict[str], name: str) -> str | None:
        values = headers.getall(name, [])
        if not values:
            return None
        # Two copies mean a client value slipped past the front proxy: trust neither.
        if len(values) > 1:
            raise _invalid(f"{name} header appears more than once")
        # A comma is refused too: RFC 9110 §5.3 lets intermediaries fold repeated
        # headers into one comma-separated line.
        if not _valid_id(values[0], allow_comma=False):
            raise _invalid(f"malformed {name} header")
        return values[0]

    async def close(self) -> None:
        return None


# --------------------------------------------------------------------------- JWT keys


@dataclass(frozen=True, slots=True)
class _Key:
    """One verification key and the only algorithms it may verify."""

    key: VerifyKey
    algorithms: tuple[str, ...]
    kid: str | None = None


@dataclass(frozen=True, slots=True)
class _KeySet:
    by_kid: Mapping[str, _Key]
    keys: tuple[_Key, ...]
    loaded_at: float

    def find(self, kid: str | None) -> _Key | None:
        if kid is not None:
            return self.by_kid.get(kid)
        # A token without kid is usable only when the set leaves no choice.
        return self.keys[0] if len(self.keys) == 1 else None


def _algorithms_for(key: PublicKey) -> tuple[str, ...]:
    """The algorithm family a public key may verify: fixed by the key, never by a token."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _RSA_MIN_BITS:
            raise ValueError(
                f"RSA key of {key.key_size} bits is too short (minimum {_RSA_MIN_BITS})"
            )
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithms = _EC_ALGORITHMS.get(key.curve.name)
        if algorithms is None:
            raise ValueError(f"unsupported elliptic curve {key.curve.name}")
        return algorithms
    return _EDDSA_ALGORITHMS  # Ed25519 or Ed448


def _load_pem(pem: bytes) -> _Key:
    """A PEM public key or X.509 certificate; a private key is refused, not converted."""
    if b"PRIVATE KEY-----" in pem:
        raise ValueError("the JWT key is a private key; configure the public key only")
    loaded: object
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            loaded = x509.load_pem_x509_certificate(pem).public_key()
        else:
            loaded = serialization.load_pem_public_key(pem)
    except ValueError as error:
        raise ValueError(f"the JWT key is not a readable PEM public key: {error}") from None
    if not isinstance(loaded, PublicKey):
        raise ValueError(f"unsupported public key type {type(loaded).__name__}")
    return _Key(key=loaded, algorithms=_algorithms_for(loaded))


def _hmac_key(secret: bytes) -> _Key:
    algorithms = tuple(alg for alg, size in _HMAC_MIN_BYTES if len(secret) >= size)
    if not algorithms:
        raise ValueError(
            f"the JWT secret is {len(secret)} bytes; HS256 needs at least 32 (RFC 7518 §3.2)"
        )
    return _Key(key=secret, algorithms=algorithms)


def _jwk_to_key(data: Mapping[str, Any]) -> _Key:
    """One JWK of a set, or ValueError saying why it is not usable for verification."""
    kty = data.get("kty")
    if kty == "oct":
        # A JWKS is public; shared secrets come from --jwt-secret-env, never from a key set.
        raise ValueError("symmetric (oct) keys are not accepted from a JWKS")
    use = data.get("use")
    if use is not None and use != "sig":  # RFC 7517 §4.2
        raise ValueError(f"key use {use!r} is not 'sig'")
    alg = data.get("alg")
    if alg is not None and alg not in _ASYMMETRIC_ALGORITHMS:
        raise ValueError(f"algorithm {alg!r} is not an accepted signature algorithm")
    kid = data.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    # PyJWK picks no algorithm for an Ed448 key on its own; EdDSA covers both curves.
    parse_alg = alg if alg is not None else ("EdDSA" if kty == "OKP" else None)
    try:
        parsed: object = jwt.PyJWK(dict(data), parse_alg).key
    except jwt.PyJWTError as error:
        raise ValueError(str(error)) from None
    if not isinstance(parsed, PublicKey):
        # A JWKS that publishes private key material lets anyone mint tokens.
        raise ValueError("key is not a public key (private key material in a JWKS?)")
    family = _algorithms_for(parsed)
    if alg is not None:
        if alg not in family:
            raise ValueError(f"algorithm {alg!r} does not fit the key type")
        family = (alg,)
    return _Key(key=parsed, algorithms=family, kid=kid)


def _parse_jwks(raw: bytes, source: str, now: float) -> _KeySet:
    """A JWK Set (RFC 7517 §5); unusable members are skipped, an empty result is an error."""
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError(f"JWKS {source}: not valid JSON") from None
    members = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(members, list):
        raise ValueError(f"JWKS {source}: no 'keys' list")
    by_kid: dict[str, _Key] = {}
    keys: list[_Key] = []
    for index, member in enumerate(members):
        if not isinstance(member, dict):
            logger.warning("JWKS %s: key #%d is not an object; skipped", source, index)
            continue
        try:
            key = _jwk_to_key(member)
        except ValueError as error:
            logger.warning("JWKS %s: key #%d skipped: %s", source, index, error)
            continue
        if key.kid is not None:
            if key.kid in by_kid:
                logger.warning("JWKS %s: duplicate kid at key #%d; first kept", source, index)
                continue
            by_kid[key.kid] = key
        keys.append(key)
    if not keys:
        raise ValueError(f"JWKS {source}: no usable signature keys")
    return _KeySet(by_kid=by_kid, keys=tuple(keys), loaded_at=now)


def _cookie_copies(headers: CIMultiDictProxy[str] | CIMultiDict[str], name: str) -> int:
    """How many `name=` pairs all Cookie header lines carry (RFC 6265 §5.4 pairs)."""
    return sum(
        1
        for line in headers.getall("Cookie", ())
        for pair in line.split(";")
        if pair.partition("=")[0].strip() == name
    )


def _is_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


# --------------------------------------------------------------------------- JWT mode


class JwtAuthenticator:
    """Identity from a signed JWT in `Authorization: Bearer` or a cookie (SPEC §5 `--auth jwt`).

    Decisions:
    - `exp` is required: a token that never expires cannot be revoked.
    - The accepted algorithms come from the configured key (RFC 8725 §2.1, §3.1), so `none`,
      and an HS* token "signed" with an RSA/EC public key (CVE-2015-9235 style confusion),
      can never verify.
    - JWKS keys are cached. An unknown `kid` refetches the set, at most once per
      `jwks_min_refetch` seconds (a flood of random kids must not hammer the IdP), and the
      set is refreshed after `jwks_max_age` seconds so a removed key stops verifying. When a
      refresh fails the last good set stays in use (availability); when there never was a
      good set the request fails as invalid_credentials with "signing keys unavailable":
      a 401, not a 503, because the proxy cannot tell that these credentials are good, and
      failing closed never forwards an unverified caller.
    - No per-token cache: verifying costs tens of microseconds, less than the rest of the
      request, and a cache would keep honouring tokens after their key was removed.
    - `clock` (epoch seconds) drives `exp`/`nbf` and the JWKS timers, so tests control time.
    """

    scheme: str | None = "Bearer"

    def __init__(
        self,
        *,
        secret: bytes | None = None,
        key_pem: bytes | None = None,
        jwks: str | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway: float = 30.0,
        user_claim: str = "sub",
        org_claim: str = "org_id",
        cookie: str | None = None,
        session: aiohttp.ClientSession | None = None,
        jwks_min_refetch: float = 30.0,
        jwks_max_age: float = 3600.0,
        jwks_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        sources = [s for s in (secret, key_pem, jwks) if s is not None]
        if len(sources) != 1:
            raise ValueError("configure exactly one JWT key source: secret, key_pem or jwks")
        if leeway < 0 or jwks_min_refetch < 0 or jwks_max_age <= 0 or jwks_timeout <= 0:
            raise ValueError("JWT leeway and JWKS timers must be non-negative (timeouts > 0)")
        if not user_claim:
            raise ValueError("the JWT user claim name must not be empty")
        if cookie is not None and not cookie:
            raise ValueError("the JWT cookie name must not be empty")
        self.issuer = issuer
        self.audience = audience
        self.leeway = float(leeway)
        self.user_claim = user_claim
        self.org_claim = org_claim
        self.cookie = cookie
        self.jwks_min_refetch = float(jwks_min_refetch)
        self.jwks_max_age = float(jwks_max_age)
        self._clock = clock
        self._fixed: _Key | None = None
        self._jwks_url: str | None = None
        self._jwks_path: Path | None = None
        self._keyset: _KeySet | None = None
        self._last_attempt: float | None = None
        self._lock = asyncio.Lock()
        self._session = session
        self._own_session = session is None
        self._timeout = aiohttp.ClientTimeout(
            total=jwks_timeout, connect=min(jwks_timeout, 2.0)
        )
        self._decoder = jwt.PyJWT(
            options={
                # exp and nbf are checked below against the injected clock.
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                # A short key raises instead of warning (RFC 7518 §3.2 / NIST SP 800-131A).
                "enforce_minimum_key_length": True,
            }
        )
        if secret is not None:
            self._fixed = _hmac_key(secret)
        elif key_pem is not None:
            self._fixed = _load_pem(key_pem)
        else:
            assert jwks is not None
            self._init_jwks(jwks)

    def _init_jwks(self, jwks: str) -> None:
        lowered = jwks.lower()
        if lowered.startswith(("http://", "https://")):
            self._jwks_url = jwks
            if lowered.startswith("http://"):
                logger.warning("JWKS %s is fetched over plain http; prefer https", jwks)
            return
        if "://" in jwks:
            raise ValueError(f"JWKS {jwks!r}: only http(s) URLs and file paths are supported")
        self._jwks_path = Path(jwks)
        try:
            raw = self._jwks_path.read_bytes()
        except OSError as error:
            raise ValueError(f"JWKS file {jwks}: {error.strerror}") from None
        self._keyset = _parse_jwks(raw, jwks, self._clock())
        self._last_attempt = self._clock()

    # ------------------------------------------------------------------ request path

    async def authenticate(
        self,
        headers: CIMultiDictProxy[str] | CIMultiDict[str],
        peer: str | None,
        cookies: Mapping[str, str],
    ) -> Identity:
        token = self._token(headers, cookies)
        if not token.isascii():
            # A JWT is base64url and dots; other bytes (aiohttp hands them over as lone
            # surrogates) would make PyJWT raise UnicodeEncodeError, i.e. a 500.
            raise _invalid("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _invalid("malformed token") from None
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _invalid("malformed token")
        key = self._fixed if self._fixed is not None else await self._jwks_key(kid)
        claims = self._verify(token, key)
        return self._identity(claims)

    def _token(
        self, headers: CIMultiDictProxy[str] | CIMultiDict[str], cookies: Mapping[str, str]
    ) -> str:
        values = headers.getall("Authorization", [])
        if len(values) > 1:
            raise _invalid("Authorization header appears more than once")
        if values:
            parts = values[0].split()
            # RFC 9110 §11.1: the scheme is case-insensitive; RFC 6750 §2.1: "Bearer" SP token.
            if not parts or parts[0].lower() != "bearer":
                raise _invalid("Authorization scheme must be Bearer")
            if len(parts) != 2:
                raise _invalid("malformed Bearer credentials")
            token = parts[1]
        elif self.cookie is not None and cookies.get(self.cookie):
            # Two copies of the cookie: which one a backend reads is its parser's choice (many
            # take the first, aiohttp the last), so the proxy refuses to pick one.
            if _cookie_copies(headers, self.cookie) > 1:
                raise _invalid("token cookie appears more than once")
            token = cookies[self.cookie]
        else:
            raise _missing("no bearer token")
        if len(token) > MAX_TOKEN_LENGTH:
            raise _invalid("token too long")
        return token

    def _verify(self, token: str, key: _Key) -> dict[str, Any]:
        try:
            claims = self._decoder.decode(
                token,
                key=key.key,
                algorithms=list(key.algorithms),
                issuer=self.issuer,
                audience=self.audience,
            )
        except jwt.InvalidAlgorithmError:
            raise _invalid("token algorithm not allowed for this key") from None
        except jwt.InvalidSignatureError:
            raise _invalid("bad signature") from None
        except jwt.InvalidIssuerError:
            raise _invalid("wrong issuer") from None
        except jwt.InvalidAudienceError:
            raise _invalid("wrong audience") from None
        except jwt_errors.InvalidSubjectError:
            raise _invalid("malformed sub claim") from None
        except jwt.MissingRequiredClaimError as error:
            raise _invalid(f"token has no {error.claim} claim") from None
        except jwt.InvalidKeyError:
            raise _invalid("token cannot be verified with the configured key") from None
        except jwt.PyJWTError:
            raise _invalid("malformed token") from None
        self._check_times(claims)
        return claims

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        exp = claims.get("exp")
        if exp is None:
            raise _invalid("token has no exp claim")
        if not _is_number(exp):
            raise _invalid("malformed exp claim")
        # RFC 7519 §4.1.4: the current time must be before exp (leeway for clock skew).
        if now >= exp + self.leeway:
            raise _invalid("token expired")
        nbf = claims.get("nbf")
        if nbf is not None:
            if not _is_number(nbf):
                raise _invalid("malformed nbf claim")
            # RFC 7519 §4.1.5: not accepted before nbf.
            if now + self.leeway < nbf:
                raise _invalid("token not yet valid")

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        user = claims.get(self.user_claim)
        if user is None:
            raise _invalid(f"token has no {self.user_claim} claim")
        # Commas are fine here (an LDAP DN subject); a signed claim is one value.
        if not isinstance(user, str) or not _valid_id(user, allow_comma=True):
            raise _invalid(f"malformed {self.user_claim} claim")
        org = claims.get(self.org_claim) if self.org_claim else None
        if org is not None and (not isinstance(org, str) or not _valid_id(org, allow_comma=True)):
            raise _invalid(f"malformed {self.org_claim} claim")
        return Identity(user=user, org=org)

    # ------------------------------------------------------------------ JWKS

    async def _jwks_key(self, kid: str | None) -> _Key:
        keyset = self._keyset
        if keyset is not None:
            key = keyset.find(kid)
            fresh = self._clock() - keyset.loaded_at < self.jwks_max_age
            # A known key is used at once; while another request refreshes a stale set the
            # current one keeps serving instead of queueing behind the fetch.
            if key is not None and (fresh or self._lock.locked()):
                return key
        async with self._lock:
            keyset = self._keyset
            now = self._clock()
            if keyset is not None:
                key = keyset.find(kid)
                if key is not None and now - keyset.loaded_at < self.jwks_max_age:
                    return key  # another request refreshed while we waited
            if self._may_fetch(now):
                await self._refresh(now)
            keyset = self._keyset
            if keyset is None:
                raise _invalid("signing keys unavailable")
            key = keyset.find(kid)
            if key is None:
                raise _invalid("unknown signing key" if kid is not None else "token has no kid")
            return key

    def _may_fetch(self, now: float) -> bool:
        last = self._last_attempt
        # A clock that went backwards must not block refetching forever.
        return last is None or now < last or now - last >= self.jwks_min_refetch

    async def _refresh(self, now: float) -> None:
        self._last_attempt = now
        source = self._jwks_url or str(self._jwks_path)
        try:
            if self._jwks_url is not None:
                raw = await self._fetch(self._jwks_url)
            else:
                assert self._jwks_path is not None
                raw = await asyncio.to_thread(self._jwks_path.read_bytes)
            self._keyset = _parse_jwks(raw, source, self._clock())
        except (OSError, ValueError, aiohttp.ClientError, TimeoutError) as error:
            # The previous set, if any, stays in use; see the class docstring.
            logger.warning("JWKS %s: refresh failed: %s", source, error or type(error).__name__)

    async def _fetch(self, url: str) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        # No redirects: a redirect could move the key source (or downgrade it to http).
        # auto_decompress=False and identity only: MAX_JWKS_BYTES must bound the bytes as
        # sent, not a gzip body that inflates a thousandfold before the check (review 2).
        async with self._session.get(
            url, timeout=self._timeout, allow_redirects=False, auto_decompress=False,
            headers={"Accept": "application/json", "Accept-Encoding": "identity"},
        ) as response:
            if response.status != 200:
                raise ValueError(f"HTTP status {response.status}")
            if response.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
                raise ValueError("content-encoded document (asked for identity)")
            body = bytearray()
            async for chunk in response.content.iter_chunked(65536):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"document larger than {MAX_JWKS_BYTES} bytes")
            return bytes(body)

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None


# --------------------------------------------------------------------------- factory


def build_authenticator(
    auth: str,
    *,
    trusted_proxies: str = DEFAULT_TRUSTED_PROXIES,
    user_header: str = DEFAULT_USER_HEADER,
    org_header: str = DEFAULT_ORG_HEADER,
    jwt_secret_env: str | None = None,
    jwt_key: str | None = None,
    jwks: str | None = None,
    jwt_issuer: str | None = None,
    jwt_audience: str | None = None,
    jwt_leeway: float = 30.0,
    jwt_user_claim: str = "sub",
    jwt_org_claim: str = "org_id",
    jwt_cookie: str | None = None,
    environ: Mapping[str, str] | None = None,
    session: aiohttp.ClientSession | None = None,
) -> Authenticator:
    """Build the authenticator that the `--auth` family of flags describes.

    Reads the secret from the named environment variable and the PEM key from its file, so
    secrets never pass through the command line. Raises ValueError with a clear message.
    """
    if auth == "header":
        return HeaderAuthenticator(
            trusted=TrustedProxies.parse(trusted_proxies),
            user_header=user_header,
            org_header=org_header,
        )
    if auth != "jwt":
        raise ValueError(f"unknown auth mode {auth!r} (expected header or jwt)")
    secret: bytes | None = None
    key_pem: bytes | None = None
    if jwt_secret_env is not None:
        env = os.environ if environ is None else environ
        value = env.get(jwt_secret_env)
        if not value:
            raise ValueError(f"environment variable {jwt_secret_env} is unset or empty")
        secret = value.encode("utf-8")
    if jwt_key is not None:
        try:
            key_pem = Path(jwt_key).read_bytes()
        except OSError as error:
            raise ValueError(f"JWT key file {jwt_key}: {error.strerror}") from None
    return JwtAuthenticator(
        secret=secret,
        key_pem=key_pem,
        jwks=jwks,
        issuer=jwt_issuer,
        audience=jwt_audience,
        leeway=jwt_leeway,
        user_claim=jwt_user_claim,
        org_claim=jwt_org_claim,
        cookie=jwt_cookie,
        session=session,
    )
