"""The proxy port pipeline: canonicalize, match, authenticate, resolve, decide, forward."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from aiohttp import HttpVersion10, HttpVersion11, web
from multidict import CIMultiDict
from yarl import URL

from proxy.audit import AuditRecord
from proxy.identity import Authenticator, AuthError, HeaderAuthenticator
from proxy.metrics import NO_ROUTE_LABEL
from proxy.policy.canonical import canonicalize
from proxy.policy.decide import (
    authorize,
    deny_unauthenticated,
    pick_org,
    resolve_org_role,
    resolve_project_role,
    route_request,
)
from proxy.policy.model import (
    ERROR_WORD,
    FORBIDDEN_METHODS,
    BadTarget,
    Decision,
    Identity,
    Membership,
    Policy,
    Reason,
    RouteMatch,
    Target,
)
from proxy.settings import Settings
from proxy.stores.base import StoreError
from proxy.stores.cache import RoleCache
from proxy.web.forward import (
    BodyStalled,
    BrokenUpstream,
    UpstreamError,
    forward_http,
    forward_lean,
    forward_websocket,
    upstream_fields,
    upstream_headers,
)
from proxy.web.runtime import Runtime

log = logging.getLogger("rbac_proxy.proxy")

# A client-supplied request id is echoed only when it is short and harmless (no header or
# log injection); anything else is replaced by a fresh one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
STORE_RETRY_AFTER = "5"
_JSON = "application/json"
_NO_COOKIES: Mapping[str, str] = MappingProxyType({})
_ALLOW_ANY = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# The proxy's own answers name it without a version (aiohttp's default names Python and
# aiohttp with exact versions: a gift to anyone matching known CVEs).
SERVER = "rbac-proxy"
# RFC 9112 §3.2: Host is uri-host [":" port] (RFC 3986 §3.2.2); anything else is a 400. It is
# forwarded, and backends build absolute URLs from it (reset links, redirects, cache keys).
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
_FOREVER = float("inf")


# Decisions are memoized per (method, raw target, caller) for header authentication, whose
# identity is a pure function of the peer's trust and two header values (a JWT has its own
# expiry and is verified every time). An entry is reused only while the policy object, the
# role cache's generation (any new answer or invalidation) and the freshness of the cache
# answers it was built from are all unchanged, so revocation stays immediate.
_MEMO_LIMIT = 4096
# Only short keys are kept, so the memo stays small (a few MB at most) whatever clients send.
_MEMO_MAX_TARGET = 512
_MEMO_MAX_ID = 256
_MemoKey = tuple[str, str, bool, tuple[str, ...], tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class _Memo:
    policy: Policy
    cache: RoleCache  # the runtime's parts it was decided with (tests swap them)
    authenticator: Authenticator
    settings: Settings
    generation: int
    until: float  # role-cache clock; inf when no cache answer was used
    target: Target
    decision: Decision
    identity: Identity | None
    lookups: tuple[bool, ...]  # the fresh cache hits to report again (True: negative)


@dataclass(slots=True)
class _Outcome:
    """What the audit line and metrics need once the response is finished."""

    decision: Decision
    identity: Identity | None = None
    stale: bool = False
    status: int = 0


# A request cut while its decision waited (store, identity provider): not forwarded, and the
# wait it was cut in is the store's or the IdP's, hence store_unavailable in metrics/audit.
_CUT_UNDECIDED = Decision(
    Reason.STORE_UNAVAILABLE,
    False,
    message="cut before the role store or identity provider answered",
)


class ProxyHandler:
    """The low-level aiohttp handler of the proxy port (no router: we match ourselves)."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self._memo: dict[_MemoKey, _Memo] = {}
        self._ids = ""  # hex of random bytes from the OS, 32 digits (128 bits) per id
        self._ids_used = 0

    def _new_request_id(self) -> str:
        """128 random bits as hex; the OS is asked once per 128 ids, not once per request."""
        start = self._ids_used
        if start >= len(self._ids):
            self._ids = os.urandom(16 * 128).hex()
            start = 0
        self._ids_used = start + 32
        return self._ids[start : start + 32]

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        rt = self.rt
        started = time.perf_counter()
        rid_header = rt.settings.request_id_header
        client_rid = request.headers.get(rid_header)
        rid = (
            client_rid
            if client_rid is not None and _REQUEST_ID.fullmatch(client_rid)
            else self._new_request_id()
        )
        rt.inflight += 1  # the gauge is set from this count (serve._gauges, /metrics)
        outcome: _Outcome | None = None
        path = "-"
        try:
            policy = rt.routes.policy  # read once: a reload mid-request cannot mix tables
            if request.method in FORBIDDEN_METHODS:
                # Before the target: a real CONNECT carries an authority-form target (RFC 9110
                # §9.3.6), which would otherwise be a 400; SPEC §3 answers the method with 405.
                outcome = _Outcome(
                    Decision(
                        Reason.BAD_REQUEST,
                        False,
                        message=f"method {request.method} is not allowed through this proxy",
                        status_override=405,
                    )
                )
                return self._reject(outcome, rid)
            framing = _framing_problem(request)
            if framing is not None:
                status, message = framing
                outcome = _Outcome(
                    Decision(Reason.BAD_REQUEST, False, message=message, status_override=status)
                )
                resp = self._reject(outcome, rid)
                resp.force_close()  # the body was not read: the connection cannot go on
                return resp
            host = request.headers.get("Host")
            if host is not None and _HOST.fullmatch(host) is None:
                outcome = _Outcome(
                    Decision(Reason.BAD_REQUEST, False, message="invalid Host header")
                )
                return self._reject(outcome, rid)
            key = self._memo_key(request)
            memo = self._recall(key, policy) if key is not None else None
            if memo is not None:
                target = memo.target
            else:
                try:
                    target = canonicalize(
                        request.raw_path, allow_semicolons=policy.allow_semicolons
                    )
                except BadTarget as exc:
                    outcome = _Outcome(Decision(Reason.BAD_REQUEST, False, message=exc.message))
                    return self._reject(outcome, rid)
            path = target.path
            if rt.draining:
                resp = _json_error(503, "draining", rid, rid_header, "shutting down")
                resp.force_close()  # aiohttp then says Connection: close, and means it
                return resp
            if memo is not None:
                for negative in memo.lookups:
                    rt.cache.count_fresh_hit(negative)  # as if the cache had been asked
                outcome = _Outcome(memo.decision, memo.identity)
                rt.metrics.observe_decision(time.perf_counter() - started)
            elif target.segments == ("_rbac", "me"):
                return await self._me(request, policy, rid)
            else:
                try:
                    outcome = await self._decide(request, policy, target, key)
                except asyncio.CancelledError:
                    # Cut before a decision (the client left, or the drain ended) while the
                    # role store or the identity provider had not answered: audited anyway.
                    outcome = _Outcome(_CUT_UNDECIDED, status=499)
                    raise
            if not outcome.decision.forward:
                return self._reject(outcome, rid)
            return await self._forward(request, target, outcome, rid)
        except ConnectionError:
            raise  # the client is gone: nothing to answer
        except Exception:
            # A bug, not a decision: never forward, never aiohttp's bare text 500.
            log.exception("unexpected error while handling a request")
            if outcome is not None:
                outcome.status = 500  # the audit line must not say "allow ... status 0"
            return _json_error(500, "internal_error", rid, rid_header, "internal error")
        finally:
            rt.inflight -= 1
            if outcome is not None:
                self._record(request, outcome, rid, path, time.perf_counter() - started)

    async def _authenticate(self, request: web.BaseRequest) -> Identity:
        try:
            return await self.rt.authenticator.authenticate(
                request.headers, _peer(request), self._cookies(request)
            )
        except AuthError:
            raise
        except Exception as exc:
            # Hostile credentials that trip a bug in a verifier: fail closed as 401 (never
            # forward, never a bare 500), and keep the traceback for whoever fixes it.
            log.exception("authenticator failed unexpectedly")
            raise AuthError(
                Reason.INVALID_CREDENTIALS, "credentials could not be verified"
            ) from exc

    def _cookies(self, request: web.BaseRequest) -> Mapping[str, str]:
        # Parsing the Cookie header costs on every request; only a JWT cookie needs it.
        return request.cookies if self.rt.settings.jwt_cookie else _NO_COOKIES

    def _memo_key(self, request: web.BaseRequest) -> _MemoKey | None:
        auth = self.rt.authenticator
        if type(auth) is not HeaderAuthenticator:
            return None
        headers = request.headers
        if "Upgrade" in headers:
            return None  # handshakes are checked in full every time
        target = request.raw_path
        users = tuple(headers.getall(auth.user_header, ()))
        orgs = tuple(headers.getall(auth.org_header, ()))
        if (
            len(target) > _MEMO_MAX_TARGET
            or len(users) > 1
            or len(orgs) > 1
            or (users and len(users[0]) > _MEMO_MAX_ID)
            or (orgs and len(orgs[0]) > _MEMO_MAX_ID)
        ):
            return None
        return (
            request.method,
            target,
            auth.trusted.contains(_peer(request)),
            users,
            orgs,
        )

    def _recall(self, key: _MemoKey, policy: Policy) -> _Memo | None:
        memo = self._memo.get(key)
        if memo is None:
            return None
        rt = self.rt
        cache = rt.cache
        if (
            memo.policy is not policy
            or memo.cache is not cache
            or memo.authenticator is not rt.authenticator
            or memo.settings is not rt.settings
            or memo.generation != cache.generation
            or (memo.until != _FOREVER and cache.now() >= memo.until)
        ):
            return None
        return memo  # its cache hits are reported once the request is decided from it

    def _remember(
        self,
        key: _MemoKey | None,
        policy: Policy,
        target: Target,
        outcome: _Outcome,
        until: float = _FOREVER,
        lookups: tuple[bool, ...] = (),
    ) -> _Outcome:
        if key is not None:
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()  # bounded: hostile targets churn it, entries refill
            rt = self.rt
            self._memo[key] = _Memo(
                policy,
                rt.cache,
                rt.authenticator,
                rt.settings,
                rt.cache.generation,
                until,
                target,
                outcome.decision,
                outcome.identity,
                lookups,
            )
        return outcome

    async def _decide(
        self, request: web.BaseRequest, policy: Policy, target: Target, key: _MemoKey | None
    ) -> _Outcome:
        rt = self.rt
        t0 = time.perf_counter()
        upgrades = request.headers.getall("Upgrade", ())
        if len(upgrades) > 1:
            return _Outcome(Decision(Reason.BAD_REQUEST, False, message="repeated Upgrade header"))
        routed = route_request(policy, request.method, target, upgrades[0] if upgrades else None)
        if isinstance(routed, Decision):
            rt.metrics.observe_decision(time.perf_counter() - t0)
            return self._remember(key, policy, target, _Outcome(routed))
        if upgrades and not _valid_websocket_handshake(request):
            # RFC 6455 §4.2.1: refuse a broken handshake before authorizing or connecting
            # upstream (a HEAD or version-8 "upgrade" must not reach the backend's socket).
            bad = Decision(
                Reason.BAD_REQUEST, False, route=routed.route, message="bad WebSocket handshake"
            )
            return _Outcome(bad)
        try:
            identity = await self._authenticate(request)
        except AuthError as exc:
            decision = deny_unauthenticated(policy, routed, exc.reason, exc.message)
            rt.metrics.observe_decision(time.perf_counter() - t0)
            return self._remember(key, policy, target, _Outcome(decision))
        try:
            memberships, project_org, stale, lookups = await self._resolve(routed, identity)
        except StoreError as exc:
            log.warning("role store unavailable: %s", exc)
            decision = Decision(
                Reason.STORE_UNAVAILABLE,
                False,
                route=routed.route,
                permission=routed.route.permission,
                message="role store unavailable",
            )
            return _Outcome(decision, identity)
        decision = authorize(
            policy,
            routed,
            identity,
            memberships,
            project_org,
            org_hint_name=rt.settings.org_header if rt.settings.auth == "header" else "org claim",
        )
        rt.metrics.observe_decision(time.perf_counter() - t0)
        outcome = _Outcome(decision, identity, stale)
        if lookups is None:
            return outcome  # not (only) fresh cache answers: nothing to reuse
        param = routed.route.project_param
        project = routed.params.get(param) if param and len(lookups) == 2 else None
        until = rt.cache.fresh_until(identity.user, project)
        return self._remember(key, policy, target, outcome, until, lookups)

    async def _resolve(
        self, match: RouteMatch, identity: Identity
    ) -> tuple[tuple[Membership, ...], str | None, bool, tuple[bool, ...] | None]:
        """Memberships, the project's org, stale?, and the fresh lookups (None: not all fresh)."""
        cache = self.rt.cache
        route = match.route
        project = match.params.get(route.project_param) if route.project_param else None
        # Hot path: both answers fresh in the cache, decided without awaiting or a timer.
        memberships = cache.fresh_memberships(identity.user)
        if memberships is not None:
            if project is None or not memberships:
                return memberships, None, False, (not memberships,)
            owner_hit = cache.fresh_project_org(project)
            if owner_hit is not None:
                return memberships, owner_hit[0], False, (False, owner_hit[0] is None)
        backstop = _store_backstop(self.rt)
        try:
            async with asyncio.timeout(backstop):
                found = await cache.memberships(identity.user)
            if project is None or not found.value:
                return found.value, None, found.stale, None
            async with asyncio.timeout(backstop):
                owner = await cache.project_org(project)
        except TimeoutError:
            raise StoreError("role store timed out") from None
        return found.value, owner.value, found.stale or owner.stale, None

    async def _forward(
        self, request: web.BaseRequest, target: Target, outcome: _Outcome, rid: str
    ) -> web.StreamResponse:
        rt = self.rt
        decision = outcome.decision
        identity = outcome.identity
        peer = _peer(request)
        allowed = decision.reason is Reason.ALLOWED
        upgrade = request.headers.get("Upgrade")
        pool = rt.upstream_pool
        lean = pool is not None and not upgrade
        headers = (upstream_fields if lean else upstream_headers)(
            request.headers,
            rt.headers,
            user=identity.user if identity is not None and allowed else None,
            org=decision.org if allowed else None,
            role=decision.role if allowed else None,
            permission=decision.permission if allowed else None,
            request_id=rid,
            peer=peer,
            peer_trusted=rt.trusted.contains(peer),
            scheme=request.scheme,
            content_length=request.content_length,
        )
        if request.headers.get("Expect", "").lower() == "100-continue" and request.body_exists:
            # Authorized: now let the client send its body (RFC 9110 §10.1.1).
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        extra = ((rt.settings.request_id_header, rid),)
        route_label = decision.route.template if decision.route else NO_ROUTE_LABEL
        try:
            if lean:
                assert pool is not None and isinstance(headers, list)
                # The forwarded target is exactly the authorized one: canonical path, raw query.
                response, to_headers = await forward_lean(
                    request,
                    pool,
                    f"{target.path}?{target.query}" if target.query else target.path,
                    headers,
                    upstream_timeout=rt.settings.upstream_timeout,
                    body_timeout=rt.settings.body_timeout,
                    extra_response_headers=extra,
                )
            else:
                url = URL.build(
                    scheme=rt.upstream.scheme,
                    host=rt.upstream.raw_host or "",
                    port=rt.upstream.explicit_port,
                    path=target.path,
                    query_string=target.query,
                    encoded=True,  # the canonical path is already encoded: no re-normalization
                )
                session = rt.session
                assert session is not None, "runtime started without an upstream session"
                assert isinstance(headers, CIMultiDict)
                if upgrade:
                    response, to_headers = await forward_websocket(
                        request,
                        session,
                        url,
                        headers,
                        upstream_timeout=rt.settings.upstream_timeout,
                        extra_response_headers=extra,
                    )
                else:
                    response, to_headers = await forward_http(
                        request,
                        session,
                        url,
                        headers,
                        upstream_timeout=rt.settings.upstream_timeout,
                        body_timeout=rt.settings.body_timeout,
                        extra_response_headers=extra,
                    )
        except BodyStalled as exc:
            # The client's fault, not the upstream's: 408, and the connection closes (the rest
            # of the body was never read). The upstream request was abandoned, never completed.
            outcome.decision = Decision(
                Reason.BAD_REQUEST,
                False,
                route=decision.route,
                permission=decision.permission,
                org=decision.org,
                project=decision.project,
                role=decision.role,
                message=str(exc),
                status_override=408,
            )
            resp = self._reject(outcome, rid)
            resp.force_close()
            return resp
        except UpstreamError as exc:
            rt.metrics.upstream_errors.labels(exc.kind).inc()
            reason = (
                Reason.UPSTREAM_TIMEOUT if exc.kind == "timeout" else Reason.UPSTREAM_UNAVAILABLE
            )
            outcome.decision = Decision(
                reason,
                False,
                route=decision.route,
                permission=decision.permission,
                org=decision.org,
                project=decision.project,
                role=decision.role,
                message=str(exc),
            )
            return self._reject(outcome, rid)
        except BrokenUpstream as exc:
            log.warning("upstream broke mid-response on %s: %s", route_label, exc)
            rt.metrics.upstream_errors.labels("broken").inc()
            outcome.status = exc.response.status
            return exc.response
        except (ConnectionError, asyncio.CancelledError):
            rt.metrics.upstream_errors.labels("disconnect").inc()
            outcome.status = 499  # nginx's "client closed request", for the audit line only
            raise
        rt.metrics.observe_upstream(route_label, to_headers)
        outcome.status = response.status
        return response

    def _reject(self, outcome: _Outcome, rid: str) -> web.Response:
        decision = outcome.decision
        status = decision.status
        outcome.status = status
        body: dict[str, object] = {
            "error": ERROR_WORD.get(status, "error"),
            "reason": decision.reason.value,
        }
        if decision.permission is not None:
            body["permission"] = decision.permission
        if decision.message:
            body["message"] = decision.message
        body["request_id"] = rid
        resp = web.Response(status=status, text=json.dumps(body), content_type=_JSON)
        resp.headers[self.rt.settings.request_id_header] = rid
        resp.headers["Server"] = SERVER
        if status == 401:
            resp.headers["WWW-Authenticate"] = self._challenge(decision)
        elif decision.reason is Reason.STORE_UNAVAILABLE:
            resp.headers["Retry-After"] = STORE_RETRY_AFTER
        elif status == 405:
            # RFC 9110 §15.5.6: a 405 names what is allowed; CONNECT and TRACE never are.
            resp.headers["Allow"] = _ALLOW_ANY
        return resp

    def _challenge(self, decision: Decision) -> str:
        scheme = self.rt.authenticator.scheme
        if scheme is None:
            # RFC 9110 §11.6.1: a 401 must carry a challenge; header mode has no standard one.
            return f'TrustedHeader realm="rbac-proxy", header="{self.rt.settings.user_header}"'
        if decision.reason is Reason.INVALID_CREDENTIALS:
            # RFC 6750 §3: error="invalid_token"; the description is a fixed, token-free text.
            detail = decision.message.replace('"', "'")
            return (
                f'{scheme} realm="rbac-proxy", error="invalid_token", error_description="{detail}"'
            )
        return f'{scheme} realm="rbac-proxy"'

    async def _me(self, request: web.BaseRequest, policy: Policy, rid: str) -> web.Response:
        """GET /_rbac/me[?project=ID]: what the caller may do, for the UI (never forwarded)."""
        rt = self.rt
        hdr = rt.settings.request_id_header
        if request.method not in ("GET", "HEAD"):
            resp = _json_error(405, "bad_request", rid, hdr, "use GET")
            resp.headers["Allow"] = "GET, HEAD"
            return resp
        try:
            identity = await self._authenticate(request)
        except AuthError as exc:
            resp = _json_error(401, exc.reason.value, rid, hdr, exc.message)
            resp.headers["WWW-Authenticate"] = self._challenge(
                Decision(exc.reason, False, message=exc.message)
            )
            return resp
        project = request.query.get("project")
        try:
            backstop = _store_backstop(rt)
            async with asyncio.timeout(backstop):
                memberships = (await rt.cache.memberships(identity.user)).value
            async with asyncio.timeout(backstop):
                # No membership, no project lookup: a caller must not be able to make the
                # proxy ask the store about arbitrary ids (review finding).
                owner = (
                    (await rt.cache.project_org(project)).value if project and memberships else None
                )
        except (StoreError, TimeoutError):
            resp = _json_error(
                503, Reason.STORE_UNAVAILABLE.value, rid, hdr, "role store unavailable"
            )
            resp.headers["Retry-After"] = STORE_RETRY_AFTER
            return resp
        body: dict[str, object] = {"user": identity.user, "org": None, "project": project}
        role: str | None = None
        reason: Reason | None = None
        if project is not None:
            membership = next((m for m in memberships if m.org == owner), None)
            if not memberships:
                reason = Reason.NOT_A_MEMBER
            elif owner is None:
                reason = Reason.UNKNOWN_PROJECT
            elif membership is None or (identity.org is not None and identity.org != owner):
                reason = Reason.NOT_A_MEMBER
            else:
                body["org"] = owner
                res = resolve_project_role(policy, membership, project)
                role, reason = res.role, res.denial
        else:
            found = pick_org(memberships, identity.org, rt.settings.org_header)
            if isinstance(found, str):
                reason = Reason.NOT_A_MEMBER
            else:
                body["org"] = found.org
                res = resolve_org_role(policy, found)
                role, reason = res.role, res.denial
        honoured = reason is None and role is not None and role in policy.roles
        body["role"] = role if honoured else None
        body["role_description"] = policy.roles[role].description if honoured and role else None
        body["permissions"] = sorted(policy.roles[role].granted) if honoured and role else []
        body["reason"] = (reason or Reason.ALLOWED).value
        body["orgs"] = [m.org for m in memberships]
        resp = web.Response(text=json.dumps(body), content_type=_JSON)
        resp.headers[hdr] = rid
        resp.headers["Server"] = SERVER
        resp.headers["Cache-Control"] = "no-store"
        return resp

    def malformed(self, status: int, what: str, peer: str | None) -> web.Response:
        """The answer to a request aiohttp's parser refused (proxy/web/protocol.py): a JSON
        error like every other, counted and audited with method OTHER and no path."""
        rid = os.urandom(16).hex()
        decision = Decision(Reason.BAD_REQUEST, False, message=what, status_override=status)
        rt = self.rt
        rt.metrics.count_request(NO_ROUTE_LABEL, "OTHER", "deny", Reason.BAD_REQUEST, status, 0.0)
        if rt.audit.wants(True):
            rt.audit.write(
                AuditRecord(
                    request_id=rid,
                    remote=peer,
                    user=None,
                    org=None,
                    project=None,
                    method="-",
                    path="-",
                    route=None,
                    permission=None,
                    decision="deny",
                    reason=Reason.BAD_REQUEST.value,
                    status=status,
                    duration_ms=0.0,
                    stale=False,
                )
            )
        return self._reject(_Outcome(decision), rid)

    def _record(
        self, request: web.BaseRequest, outcome: _Outcome, rid: str, path: str, seconds: float
    ) -> None:
        rt = self.rt
        decision = outcome.decision
        route = decision.route.template if decision.route is not None else NO_ROUTE_LABEL
        verdict = "allow" if decision.forward else "deny"
        rt.metrics.count_request(
            route, request.method, verdict, decision.reason, outcome.status, seconds
        )
        if decision.reason is Reason.PUBLIC or not rt.audit.wants(not decision.forward):
            return
        identity = outcome.identity
        rt.audit.write(
            AuditRecord(
                request_id=rid,
                remote=_peer(request),
                user=identity.user if identity is not None else None,
                org=decision.org,
                project=decision.project,
                method=request.method,
                path=path,
                route=decision.route.template if decision.route is not None else None,
                permission=decision.permission,
                decision=verdict,
                reason=decision.reason.value,
                status=outcome.status,
                duration_ms=seconds * 1000.0,
                stale=outcome.stale,
                shadow_reason=decision.shadow_reason.value if decision.shadow_reason else None,
            )
        )


def _store_backstop(rt: Runtime) -> float:
    """Per-lookup limit for a store that never answers, beyond its own --store-timeout.

    Network stores time out by themselves (GuardedStore) inside the cache, which then serves
    a stale entry (SPEC §6). A handler timeout of the same length fired first and failed warm
    users closed with 503, so this one only catches a store without its own timeout.
    """
    return 2 * rt.settings.store_timeout


def _valid_websocket_handshake(request: web.BaseRequest) -> bool:
    headers = request.headers
    tokens = {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}
    keys = headers.getall("Sec-WebSocket-Key", ())
    return (
        request.method == "GET"
        and "upgrade" in tokens
        and len(keys) == 1
        and _websocket_key(keys[0])
        and headers.getall("Sec-WebSocket-Version", ()) == ["13"]
        # RFC 6455 §4.1: a handshake is a GET without a body; ws_connect would forward the
        # Content-Length without the bytes, and the client's bytes would be read as frames.
        and request.content_length in (None, 0)
        and "Transfer-Encoding" not in headers
    )


def _websocket_key(key: str) -> bool:
    """RFC 6455 §4.1: base64 of 16 bytes (what aiohttp's prepare() insists on after the
    upstream handshake, which made a bad key a 500 with an upstream socket opened)."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def _framing_problem(request: web.BaseRequest) -> tuple[int, str] | None:
    """What aiohttp's parser (llhttp) accepts but a proxy must not pass on: (status, message).

    llhttp frames `HTTP/0.9`-style and `HTTP/2.0` heads as HTTP/1 requests; and for
    `Transfer-Encoding: gzip, chunked` it removes only the chunking, so the still-encoded body
    would go upstream as if plain (found by the smuggling suite, issue 7).
    """
    if request.version not in (HttpVersion10, HttpVersion11):
        return 400, "unsupported HTTP version"  # RFC 9112 §2.3
    codings = request.headers.getall("Transfer-Encoding", ())
    if codings and [c.strip().lower() for v in codings for c in v.split(",")] != ["chunked"]:
        return 501, "unsupported transfer coding"  # RFC 9112 §6.1
    return None


def _peer(request: web.BaseRequest) -> str | None:
    # The socket's peer (aiohttp caches it per request), never a forwarded-for header.
    return request.remote


def _json_error(status: int, reason: str, rid: str, rid_header: str, message: str) -> web.Response:
    body = {
        "error": ERROR_WORD.get(status, "error"),
        "reason": reason,
        "message": message,
        "request_id": rid,
    }
    resp = web.Response(status=status, text=json.dumps(body), content_type=_JSON)
    resp.headers[rid_header] = rid
    resp.headers["Server"] = SERVER
    return resp
