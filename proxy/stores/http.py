"""Role store that asks an existing HTTP service (SPEC §6, `--store http(s)://…`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from proxy.policy.model import Membership
from proxy.stores.base import StoreError, StoreRefused

MAX_BODY = 1024 * 1024  # a membership answer is small; a larger body is a broken store
MAX_CONNECTIONS = 32  # bounded pool: a slow store cannot make the proxy open sockets forever
PING_USER = "__rbac_proxy_ping__"  # the SPEC defines no health endpoint: any member lookup


class HttpStore:
    """Answers from `GET {base}/members/{user}` and `GET {base}/projects/{project}`.

    Only a 200 with a well-formed body, or a 404 (no membership / unknown project), is an
    answer; everything else (other statuses, redirects, timeouts, connection errors,
    malformed or mistyped JSON, an answer about another user or project) raises StoreError,
    so the proxy fails closed instead of treating a broken store as "no access".
    """

    backend: str = "http"

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 2.0,
        token: str | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        """Validate the base URL now so a typo fails startup (ValueError), not every request."""
        base = URL(base_url)
        if base.scheme not in ("http", "https") or not base.raw_host:
            # The URL itself is not echoed: its userinfo may hold a password.
            raise ValueError("http store URL needs http(s)://host[:port][/path]")
        if base.raw_query_string or base.raw_fragment:
            raise ValueError("http store URL must not carry a query or fragment")
        if timeout <= 0:
            raise ValueError("http store timeout must be positive")
        self._base = base
        self._prefix = base.raw_path.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        # Identity only: a compressed answer would be inflated before the 1 MiB check, so
        # a 200 KB gzip body could cost hundreds of MB and block the loop (review 2).
        self._headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._session = session
        self._owns_session = False

    async def open(self) -> None:
        """Create the client session (inside the running loop); connects lazily, never raises."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, keepalive_timeout=30),
                # aiohttp's default total timeout is 5 minutes: always explicit.
                timeout=self._timeout,
                # Role answers are per user: never let one lookup's cookies reach another.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            self._owns_session = True

    async def close(self) -> None:
        """Close the session this store created; an injected session belongs to its owner."""
        if self._session is not None and self._owns_session:
            await self._session.close()
            self._session = None
            self._owns_session = False

    async def ping(self) -> None:
        """Healthy when a member lookup gets a 200 or 404; the body is not judged."""
        status, _ = await self._get("members", PING_USER, read_body=False)
        if status not in (200, 404):
            raise StoreError(f"http store answered {status} to a ping")

    async def memberships(self, user: str) -> tuple[Membership, ...]:
        if not user:
            return ()  # the API cannot name an empty id: no such member, nothing to ask
        status, body = await self._get("members", user)
        if status == 404:
            return ()
        return _parse_members(_expect_object(status, body), user)

    async def project_org(self, project: str) -> str | None:
        if not project:
            return None
        status, body = await self._get("projects", project)
        if status == 404:
            return None
        return _parse_project(_expect_object(status, body), project)

    def url(self, collection: str, key: str) -> URL:
        """The lookup URL; the key is ONE percent-encoded path segment (no `/`, no dot segment)."""
        segment = quote(key, safe="")
        if segment in (".", ".."):
            # Dot segments would be removed by path normalization (RFC 3986 §5.2.4) and ask
            # about a different resource; encoded, they stay data.
            segment = segment.replace(".", "%2E")
        return URL.build(
            scheme=self._base.scheme,
            host=self._base.raw_host or "",
            port=self._base.explicit_port,
            user=self._base.raw_user,
            password=self._base.raw_password,
            path=f"{self._prefix}/{collection}/{segment}",
            encoded=True,
        )

    async def _get(self, collection: str, key: str, *, read_body: bool = True) -> tuple[int, bytes]:
        session = self._session
        if session is None:
            raise StoreError("http store used before open()")
        url = self.url(collection, key)
        try:
            async with session.get(
                url,
                headers=self._headers,
                timeout=self._timeout,
                # A redirect could carry the bearer token elsewhere; the store must answer.
                allow_redirects=False,
                # The size limit below counts the bytes as sent: never inflate them.
                auto_decompress=False,
            ) as resp:
                if resp.status != 200 or not read_body:
                    return resp.status, b""
                if resp.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
                    raise StoreError("http store answer is content-encoded (asked for identity)")
                if resp.content_length is not None and resp.content_length > MAX_BODY:
                    raise StoreError(f"http store answer too large ({resp.content_length} bytes)")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_BODY:
                        raise StoreError("http store answer larger than 1 MiB")
                return resp.status, bytes(body)
        except TimeoutError:
            raise StoreError(f"http store timed out on /{collection}/…") from None
        except aiohttp.ClientError as exc:
            # The message names the failure kind, never the key (a user id) or the token.
            raise StoreError(f"http store request failed: {type(exc).__name__}") from None


def _expect_object(status: int, body: bytes) -> Mapping[str, Any]:
    if 400 <= status < 500 and status not in (401, 403, 407, 408, 429):
        # A client error about this one key; auth failures, timeouts and rate limits are
        # store-wide trouble and count as outages.
        raise StoreRefused(f"http store refused the lookup ({status})")
    if status != 200:
        raise StoreError(f"http store answered {status}")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and bad JSON
        raise StoreError("http store answered malformed JSON") from None
    if not isinstance(data, dict):
        raise StoreError("http store answer is not a JSON object")
    return data


def _parse_members(data: Mapping[str, Any], user: str) -> tuple[Membership, ...]:
    """SPEC §6: {"user": U, "memberships": [{"org", "plan", "role", "projects"}, ...]}."""
    if data.get("user") != user:
        # An answer about someone else (a routing or caching bug in the store, or a front
        # proxy that decodes %2F and resolves `..` in a user id sent as one path segment)
        # must never decide this user's access: the answer has to name its user (SPEC §6).
        raise StoreError("http store answer does not name the user asked about")
    items = data.get("memberships")
    if not isinstance(items, list):
        raise StoreError("http store answer: 'memberships' must be a list")
    found: dict[str, Membership] = {}
    for item in items:
        membership = _parse_membership(item)
        if membership.org in found:
            raise StoreError("http store answer: an org appears twice in 'memberships'")
        found[membership.org] = membership
    # Sorted by org like the file store, so every backend answers identically.
    return tuple(found[org] for org in sorted(found))


def _parse_membership(item: object) -> Membership:
    if not isinstance(item, dict):
        raise StoreError("http store answer: a membership must be an object")
    org, plan, role = item.get("org"), item.get("plan"), item.get("role")
    if not isinstance(org, str) or not org:
        raise StoreError("http store answer: membership 'org' must be a non-empty string")
    if not isinstance(plan, str) or not plan:
        raise StoreError("http store answer: membership 'plan' must be a non-empty string")
    if role is not None and (not isinstance(role, str) or not role):
        raise StoreError("http store answer: membership 'role' must be a string or null")
    projects = item.get("projects", {})
    if projects is None:
        projects = {}
    if not isinstance(projects, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in projects.items()
    ):
        raise StoreError("http store answer: 'projects' must map project ids to role names")
    return Membership(org, plan, role, MappingProxyType(dict(projects)))


def _parse_project(data: Mapping[str, Any], project: str) -> str:
    """SPEC §6: {"project": P, "org": O}."""
    if data.get("project") != project:
        raise StoreError("http store answer does not name the project asked about")
    org = data.get("org")
    if not isinstance(org, str) or not org:
        raise StoreError("http store answer: 'org' must be a non-empty string")
    return org
