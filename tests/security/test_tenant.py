"""Tenant isolation: an admin of one org never reaches another org's project (issue 7 item 6).

The attackers are the shipped admins: ed (smallco) against acme's proj-prod and proj-staging,
and alice (acme) against smallco's sc-main. Every project route template of the compiled
shipped policy (iterated from the policy, never a hand list) × every method it lists × every
trick below must be answered by the proxy itself with the expected status and reason, and
the recording backend must receive nothing. The positive controls send the same requests to
the admin's own project and require 200 with exactly the canonical target forwarded and the
admin's own org injected, so a proxy that simply refused everything would fail them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from proxy.policy.canonical import canonicalize
from proxy.policy.compile import compile_policy
from proxy.policy.model import Policy, Route, SegmentKind
from proxy.yamlsource import parse_yaml
from tests.security.harness import RawReply, Received, Recorder, request, send_raw
from tests.web.conftest import Proxy, StartProxy

ROOT = Path(__file__).resolve().parents[2]


def _load_policy() -> Policy:
    text = (ROOT / "routes.yaml").read_text(encoding="utf-8")
    return compile_policy(parse_yaml(text, "routes.yaml"), "routes.yaml")


POLICY = _load_policy()
# Every (project route, method) of the shipped policy; 40 today (SPEC §10).
PROJECT_ROUTES: list[tuple[Route, str]] = [
    (route, method)
    for route in POLICY.routes
    if route.project_param is not None
    for method in sorted(route.methods or ())
]
# Org routes that need a real role or membership (not public): the org comes from the hint.
ORG_ROUTES: list[tuple[Route, str]] = [
    (route, method)
    for route in POLICY.routes
    if route.project_param is None and not route.public
    for method in sorted(route.methods or ())
]
CONCURRENCY = 8  # requests in flight at once, to keep ~1,400 requests within a few seconds


@dataclass(frozen=True)
class Attacker:
    user: str
    org: str
    own_project: str
    victim_org: str
    victims: tuple[str, ...]


ATTACKERS = {
    "ed": Attacker("ed", "smallco", "sc-main", "acme", ("proj-prod", "proj-staging")),
    "alice": Attacker("alice", "acme", "proj-prod", "smallco", ("sc-main",)),
}


def fill(route: Route, project: str) -> str:
    """The route's template with `project` (inserted verbatim) and a plain id elsewhere."""
    parts: list[str] = []
    for segment in route.segments:
        if segment.kind is SegmentKind.LITERAL:
            parts.append(segment.value)
        elif segment.value == route.project_param:
            parts.append(project)
        else:
            parts.append(f"{segment.value.replace('_', '-')}-1")
    return "/" + "/".join(parts)


@dataclass(frozen=True)
class Attempt:
    """One hostile request: target, extra header lines, body."""

    target: str
    headers: tuple[str, ...] = ()
    body: bytes = b""


def encode_all(text: str) -> str:
    """Every byte percent-encoded (`proj-prod` → `%70%72…`): decoded once, it is the id."""
    return "".join(f"%{b:02X}" for b in text.encode())


# trick name → (how to build the attempt from route, victim id, attacker; status; reason).
Trick = Callable[[Route, str, Attacker], Attempt]
TRICKS: dict[str, tuple[Trick, int, str]] = {
    "plain id": (lambda r, v, a: Attempt(fill(r, v)), 403, "not_a_member"),
    "id;param": (lambda r, v, a: Attempt(fill(r, f"{v};{a.own_project}")), 400, "bad_request"),
    "own;victim": (lambda r, v, a: Attempt(fill(r, f"{a.own_project};{v}")), 400, "bad_request"),
    "id%3B": (lambda r, v, a: Attempt(fill(r, f"{v}%3B")), 400, "bad_request"),
    "own/..;/victim": (
        lambda r, v, a: Attempt(fill(r, f"{a.own_project}/..;/{v}")),
        400,
        "bad_request",
    ),
    "trailing /": (lambda r, v, a: Attempt(fill(r, v) + "/"), 403, "not_a_member"),
    "//": (lambda r, v, a: Attempt("/" + fill(r, v).replace("/", "//")), 403, "not_a_member"),
    "upper-case id": (lambda r, v, a: Attempt(fill(r, v.upper())), 403, "unknown_project"),
    "full-width id": (
        # NFKC folds U+FF50 to "p": a normalizing backend would read the victim's id; the
        # proxy matches the id as sent and knows no such project.
        lambda r, v, a: Attempt(fill(r, quote("\uff50" + v[1:]))),
        403,
        "unknown_project",
    ),
    "id%20": (lambda r, v, a: Attempt(fill(r, f"{v}%20")), 403, "unknown_project"),
    "id.": (lambda r, v, a: Attempt(fill(r, f"{v}.")), 403, "unknown_project"),
    "id%00": (lambda r, v, a: Attempt(fill(r, f"{v}%00")), 400, "bad_request"),
    "id fully %-encoded": (lambda r, v, a: Attempt(fill(r, encode_all(v))), 403, "not_a_member"),
    "own%2F..%2Fvictim": (
        lambda r, v, a: Attempt(fill(r, f"{a.own_project}%2F..%2F{v}")),
        400,
        "bad_request",
    ),
    "own%2Fvictim": (
        lambda r, v, a: Attempt(fill(r, f"{a.own_project}%2f{v}")),
        400,
        "bad_request",
    ),
    "own%5Cvictim": (
        lambda r, v, a: Attempt(fill(r, f"{a.own_project}%5C{v}")),
        400,
        "bad_request",
    ),
    "own/../victim": (
        lambda r, v, a: Attempt(fill(r, f"{a.own_project}/../{v}")),
        400,
        "bad_request",
    ),
    "own/%2e%2e/victim": (
        lambda r, v, a: Attempt(fill(r, f"{a.own_project}/%2e%2e/{v}")),
        400,
        "bad_request",
    ),
    "X-Org-Id victim org": (
        lambda r, v, a: Attempt(fill(r, v), (f"X-Org-Id: {a.victim_org}",)),
        403,
        "not_a_member",
    ),
    "X-Org-Id own org": (
        lambda r, v, a: Attempt(fill(r, v), (f"X-Org-Id: {a.org}",)),
        403,
        "not_a_member",
    ),
    "?project_id=own&org=own": (
        lambda r, v, a: Attempt(fill(r, v) + f"?project_id={a.own_project}&org={a.org}"),
        403,
        "not_a_member",
    ),
    "?org=victim": (
        lambda r, v, a: Attempt(fill(r, v) + f"?org={a.victim_org}"),
        403,
        "not_a_member",
    ),
    "own id in the body": (
        lambda r, v, a: Attempt(
            fill(r, v),
            ("Content-Type: application/json",),
            json.dumps({"project_id": a.own_project, "org": a.org}).encode(),
        ),
        403,
        "not_a_member",
    ),
}


def status_and_body(reply: RawReply) -> tuple[int | None, dict[str, object]]:
    _, _, body = reply.data.partition(b"\r\n\r\n")
    parsed = json.loads(body) if body.startswith(b"{") else {}
    assert isinstance(parsed, dict)
    return reply.status, parsed


async def send_all(port: int, raws: list[bytes]) -> list[RawReply]:
    """Send every request on its own connection, CONCURRENCY at a time, replies in order."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(raw: bytes) -> RawReply:
        async with gate:
            return await send_raw(port, raw, quiet=0.5, limit=5.0)

    return await asyncio.gather(*(one(raw) for raw in raws))


def build(attacker: Attacker, method: str, attempt: Attempt) -> bytes:
    return request(
        attempt.target,
        method=method,
        user=attacker.user,
        headers=list(attempt.headers),
        body=attempt.body,
    )


# ---- every project route × method × trick, both directions ----------------------------------


@pytest.mark.parametrize("trick", sorted(TRICKS))
@pytest.mark.parametrize("who", sorted(ATTACKERS))
async def test_admin_never_reaches_another_orgs_project(
    guarded: Proxy, recorder: Recorder, who: str, trick: str
) -> None:
    attacker = ATTACKERS[who]
    make, want_status, want_reason = TRICKS[trick]
    cases = [
        (method, make(route, victim, attacker))
        for victim in attacker.victims
        for route, method in PROJECT_ROUTES
    ]
    replies = await send_all(
        guarded.server.proxy_port, [build(attacker, m, attempt) for m, attempt in cases]
    )
    wrong = []
    for (method, attempt), reply in zip(cases, replies, strict=True):
        status, body = status_and_body(reply)
        if (status, body.get("reason")) != (want_status, want_reason):
            wrong.append(f"{method} {attempt.target} {attempt.headers}: {status} {body}")
    assert wrong == [], f"{len(wrong)} of {len(cases)} answered otherwise:\n" + "\n".join(wrong)
    assert recorder.requests == [], [(r.method, r.target) for r in recorder.requests]
    assert len(cases) == len(attacker.victims) * len(PROJECT_ROUTES) >= 40


def test_every_project_route_is_covered() -> None:
    # The loop above iterates the compiled policy; this pins that it is not empty or partial.
    templates = {route.template for route, _ in PROJECT_ROUTES}
    assert len(PROJECT_ROUTES) == 40
    assert "/api/projects/{project_id}" in templates
    assert "/api/projects/{project_id}/task-history/live" in templates
    assert all(route.project_param == "project_id" for route, _ in PROJECT_ROUTES)


# ---- positive controls: the same admin on their own project -----------------------------------

# Spellings of the own project that must still be allowed and forwarded canonically.
OWN_SPELLINGS: dict[str, Callable[[Route, Attacker], Attempt]] = {
    "plain": lambda r, a: Attempt(fill(r, a.own_project)),
    "trailing /": lambda r, a: Attempt(fill(r, a.own_project) + "/"),
    "//": lambda r, a: Attempt("/" + fill(r, a.own_project).replace("/", "//")),
    "id fully %-encoded": lambda r, a: Attempt(fill(r, encode_all(a.own_project))),
    "X-Org-Id own org": lambda r, a: Attempt(fill(r, a.own_project), (f"X-Org-Id: {a.org}",)),
    "?project_id=victim&org=victim": lambda r, a: Attempt(
        fill(r, a.own_project) + f"?project_id=victim&org={a.victim_org}"
    ),
}


def expected_target(target: str) -> bytes:
    canon = canonicalize(target)
    return (canon.path + (f"?{canon.query}" if canon.query else "")).encode()


def check_forwarded(
    got: Received, method: str, target: str, attacker: Attacker, route: Route
) -> None:
    assert (got.method, got.target) == (method.encode(), expected_target(target))
    assert got.header("x-auth-user") == attacker.user.encode()
    assert got.header("x-auth-org") == attacker.org.encode()
    assert got.header("x-auth-role") == b"admin"
    assert route.permission is not None
    assert got.header("x-auth-permission") == route.permission.encode()
    assert got.header("x-org-id") is None  # the client's hint is input for us, not the backend


@pytest.mark.parametrize("spelling", sorted(OWN_SPELLINGS))
@pytest.mark.parametrize("who", sorted(ATTACKERS))
async def test_admin_on_own_project_gets_exactly_the_canonical_target(
    guarded: Proxy, recorder: Recorder, who: str, spelling: str
) -> None:
    attacker = ATTACKERS[who]
    make = OWN_SPELLINGS[spelling]
    for route, method in PROJECT_ROUTES:  # one at a time: each forward is matched to its case
        attempt = make(route, attacker)
        recorder.requests.clear()
        reply = await send_raw(guarded.server.proxy_port, build(attacker, method, attempt))
        assert reply.status == 200, (method, attempt, reply.data[:300])
        assert len(recorder.requests) == 1, (method, attempt.target)
        check_forwarded(recorder.requests[0], method, attempt.target, attacker, route)


# ---- org routes: the hint cannot switch the org, the query and body cannot name it ----------


@pytest.mark.parametrize("who", sorted(ATTACKERS))
async def test_org_hint_naming_the_other_org_is_refused(
    guarded: Proxy, recorder: Recorder, who: str
) -> None:
    attacker = ATTACKERS[who]
    raws = [
        request(
            fill(route, "-"), method=method, user=attacker.user,
            headers=[f"X-Org-Id: {attacker.victim_org}"],
        )
        for route, method in ORG_ROUTES
    ]  # fmt: skip
    replies = await send_all(guarded.server.proxy_port, raws)
    answers = [status_and_body(reply) for reply in replies]
    assert [(s, b.get("reason")) for s, b in answers] == [(403, "not_a_member")] * len(ORG_ROUTES)
    assert recorder.requests == []


@pytest.mark.parametrize("who", sorted(ATTACKERS))
async def test_org_named_in_query_or_body_is_not_the_org_forwarded(
    guarded: Proxy, recorder: Recorder, who: str
) -> None:
    # The proxy decides on the path and the hint, never on the query or body: every org route
    # an admin may use is forwarded with the admin's OWN org injected, whatever they name.
    attacker = ATTACKERS[who]
    body = json.dumps({"org": attacker.victim_org, "project_id": attacker.victims[0]}).encode()
    for route, method in ORG_ROUTES:
        target = fill(route, "u-2") + f"?org={attacker.victim_org}&org_id={attacker.victim_org}"
        recorder.requests.clear()
        reply = await send_raw(
            guarded.server.proxy_port,
            request(target, method=method, user=attacker.user, body=body),
        )
        assert reply.status == 200, (method, target, reply.data[:300])
        assert len(recorder.requests) == 1
        got = recorder.requests[0]
        assert (got.method, got.target) == (method.encode(), expected_target(target))
        assert got.header("x-auth-org") == attacker.org.encode()
        assert got.header("x-auth-user") == attacker.user.encode()
        assert got.body == body


# ---- a user in both orgs: the admin role of one never applies to the other ------------------

TWO_ORGS = """\
orgs:
  acme:
    plan: enterprise
    projects: [proj-prod, proj-staging]
    members:
      alice: admin
      mo: support
  smallco:
    plan: pro
    projects: [sc-main]
    members:
      mo: admin
"""


async def test_admin_of_one_org_keeps_only_their_role_in_the_other(
    recorder: Recorder, start_proxy: StartProxy, tmp_path: Path
) -> None:
    # mo is admin of smallco and support in acme: on acme's projects only support applies,
    # whatever org hint mo sends; with the hint naming smallco, acme's projects are out.
    members = tmp_path / "members.yaml"
    members.write_text(TWO_ORGS, encoding="utf-8")
    proxy = await start_proxy(recorder.url, store=f"file:{members}")
    port = proxy.server.proxy_port
    support = POLICY.roles["support"].granted
    denied: list[bytes] = []
    for route, method in PROJECT_ROUTES:
        for hint in (None, "acme", "smallco"):
            headers = [f"X-Org-Id: {hint}"] if hint else []
            target = fill(route, "proj-prod")
            recorder.requests.clear()
            reply = await send_raw(port, request(target, method=method, user="mo", headers=headers))
            status, body = status_and_body(reply)
            if hint == "smallco":
                assert (status, body.get("reason")) == (403, "not_a_member"), (method, target)
            elif route.permission in support:
                assert status == 200, (method, target, hint, body)
                got = recorder.requests[0]
                assert got.header("x-auth-org") == b"acme"
                assert got.header("x-auth-role") == b"support"
                continue
            else:
                assert (status, body.get("reason")) == (403, "missing_permission"), (
                    method, target, hint, body,
                )  # fmt: skip
            assert recorder.requests == [], (method, target, hint)
            denied.append(target.encode())
    assert denied  # the admin-only routes are among them
    # And in smallco mo is admin: the positive control for the same proxy.
    recorder.requests.clear()
    reply = await send_raw(port, request("/api/projects/sc-main/api-keys", user="mo"))
    assert reply.status == 200
    assert recorder.requests[0].header("x-auth-role") == b"admin"
