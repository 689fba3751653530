"""Tests for proxy.policy.decide, table-driven through evaluate() over small inline policies."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import pytest

from proxy.policy.canonical import canonicalize
from proxy.policy.compile import compile_policy
from proxy.policy.decide import authorize, pick_org, route_request
from proxy.policy.evaluate import evaluate
from proxy.policy.members import Directory, parse_members
from proxy.policy.model import Decision, Identity, Membership, Policy, Reason, RouteMatch
from proxy.yamlsource import parse_yaml

# `@TOP@` lets a test switch `default:` / `mode:` without repeating the whole document.
POLICY = """\
version: 1
@TOP@
roles:
  admin: {description: Organization Admin, permissions: ["*"]}
  developer:
    permissions: [team:read, projects:read, "workflows:*", task_history:read]
  support:
    permissions: [task_history:read, executions:replay]
plans:
  enterprise: {roles: [admin, developer, support], project_bindings: true}
  "*": {roles: [admin, developer], project_bindings: false}
routes:
  - {path: /healthz, methods: [GET], public: true}
  - {path: /api/org, methods: [GET], authenticated: true}
  - {path: /api/org/members, methods: [GET], permission: team:read}
  - {path: /api/org/invites, methods: [POST], permission: team:invite}
  - {path: /api/org/billing, methods: [GET], permission: billing:read}
  - {path: /api/projects, methods: [GET], authenticated: true}
  - path: /api/projects/{project_id}
    methods: [GET]
    permission: projects:read
  - path: /api/projects/{project_id}
    methods: [PATCH]
    permission: projects:write
  - path: /api/projects/{project_id}/workflows/{workflow_id}/deploy
    methods: [POST]
    permission: workflows:deploy
  - path: /api/projects/{project_id}/archive
    methods: [GET]
    permission: workflows_archive:read
  - path: /api/projects/{project_id}/task-history
    methods: [GET]
    permission: task_history:read
  - path: /api/projects/{project_id}/task-history/{execution_id}/replay
    methods: [POST]
    permission: executions:replay
  - path: /api/projects/{project_id}/task-history/live
    methods: [GET]
    permission: task_history:read
    websocket: true
  - path: /api/projects/{project_id}/secrets/{name}
    methods: [PUT]
    permission: secrets:update
    mode: @SECRETS_MODE@
  - path: /api/apps/{app}/settings
    methods: [GET]
    permission: projects:read
    project_param: app
"""

MEMBERS = """\
orgs:
  acme:
    plan: enterprise
    projects: [p1, p2]
    members:
      alice: admin
      bob: developer
      sue: support
      carol: {projects: {p2: admin}}
      dan: {projects: {p1: support}}
      multi: developer
  small:
    plan: pro
    projects: [s1]
    members:
      ed: admin
      gus: developer
      fay: support
      gil: {projects: {s1: developer}}
      multi: admin
  lonely:
    plan: enterprise
    projects: [l1]
    members: {}
"""


def make_policy(top: str = "default: deny\nmode: enforce", secrets_mode: str = "enforce") -> Policy:
    text = make_text(top, secrets_mode)
    return compile_policy(parse_yaml(text, "routes.yaml"), "routes.yaml")


def make_text(top: str = "", secrets_mode: str = "enforce") -> str:
    return POLICY.replace("@TOP@", top).replace("@SECRETS_MODE@", secrets_mode)


def make_directory(text: str = MEMBERS) -> Directory:
    return parse_members(parse_yaml(text, "members.yaml"), "members.yaml")


ENFORCE = make_policy()
DIRECTORY = make_directory()


def decide(
    user: str | None,
    method: str,
    path: str,
    *,
    org: str | None = None,
    policy: Policy = ENFORCE,
    upgrade: str | None = None,
) -> Decision:
    identity = Identity(user, org) if user is not None else None
    return evaluate(policy, method, path, identity, DIRECTORY, upgrade=upgrade).decision


@dataclass(frozen=True)
class Row:
    """One expectation: `user` (with `org` hint) sends `method path`; `reason` is the outcome."""

    user: str | None
    method: str
    path: str
    reason: Reason
    org: str | None = None
    role: str | None = None  # expected effective role, when the row checks it

    def __str__(self) -> str:
        hint = f"@{self.org}" if self.org else ""
        return f"{self.user}{hint} {self.method} {self.path} -> {self.reason}"


A, D = Reason.ALLOWED, Reason.MISSING_PERMISSION
NM, PR, UP = Reason.NOT_A_MEMBER, Reason.PLAN_RESTRICTED, Reason.UNKNOWN_PROJECT

ROWS = [
    # ---- org-wide roles on an enterprise org -------------------------------------------------
    Row("alice", "GET", "/api/org/billing", A, role="admin"),
    Row("alice", "POST", "/api/org/invites", A, role="admin"),
    Row("alice", "PATCH", "/api/projects/p1", A, role="admin"),
    Row("alice", "PUT", "/api/projects/p2/secrets/API_KEY", A, role="admin"),
    Row("bob", "GET", "/api/org/members", A, role="developer"),
    Row("bob", "POST", "/api/org/invites", D, role="developer"),
    Row("bob", "GET", "/api/org/billing", D, role="developer"),
    Row("bob", "GET", "/api/projects/p1", A, role="developer"),
    Row("bob", "GET", "/api/projects/p2", A, role="developer"),
    Row("bob", "PATCH", "/api/projects/p1", D, role="developer"),
    Row("sue", "GET", "/api/projects/p1/task-history", A, role="support"),
    Row("sue", "POST", "/api/projects/p2/task-history/e-1/replay", A, role="support"),
    Row("sue", "GET", "/api/projects/p1", D, role="support"),
    Row("sue", "GET", "/api/org/members", D, role="support"),
    # ---- permission wildcards: "*" grants all, "workflows:*" only the workflows: family -------
    Row("alice", "GET", "/api/projects/p1/archive", A, role="admin"),
    Row("bob", "POST", "/api/projects/p1/workflows/w-1/deploy", A, role="developer"),
    Row("bob", "GET", "/api/projects/p1/archive", D, role="developer"),  # workflows_archive:read
    Row("sue", "POST", "/api/projects/p1/workflows/w-1/deploy", D, role="support"),
    # ---- per-project bindings (Set by Project) -----------------------------------------------
    # carol is an admin bound to p2 only: everything on p2, nothing on p1, no org permission
    Row("carol", "PATCH", "/api/projects/p2", A, role="admin"),
    Row("carol", "PUT", "/api/projects/p2/secrets/API_KEY", A, role="admin"),
    Row("carol", "GET", "/api/projects/p1", D),
    Row("carol", "PATCH", "/api/projects/p1", D),
    Row("carol", "POST", "/api/org/invites", D),  # SPEC §1: cannot invite members
    Row("carol", "GET", "/api/org/billing", D),  # SPEC §1: cannot see billing
    Row("carol", "GET", "/api/org/members", D),
    Row("carol", "GET", "/api/org", A),  # authenticated: a membership is enough
    Row("carol", "GET", "/api/projects", A),
    # dan is support bound to p1: support's pages there only
    Row("dan", "GET", "/api/projects/p1/task-history", A, role="support"),
    Row("dan", "GET", "/api/projects/p1", D, role="support"),
    Row("dan", "GET", "/api/projects/p2/task-history", D),
    # a project parameter with another name (project_param: app)
    Row("carol", "GET", "/api/apps/p2/settings", A, role="admin"),
    Row("carol", "GET", "/api/apps/p1/settings", D),
    # ---- project -> org ownership ------------------------------------------------------------
    Row("alice", "GET", "/api/projects/s1", NM),  # an acme admin is nobody in small's projects
    Row("ed", "GET", "/api/projects/p1", NM),
    Row("ed", "GET", "/api/projects/s1", A, role="admin"),
    Row("alice", "GET", "/api/projects/nope", UP),
    Row("ed", "GET", "/api/projects/l1", NM),  # an org with no members
    Row("mallory", "GET", "/api/projects/p1", NM),
    Row("mallory", "GET", "/api/org", NM),
    # ---- org resolution for org routes -------------------------------------------------------
    Row("alice", "GET", "/api/org/billing", A, org="acme", role="admin"),
    Row("alice", "GET", "/api/org/billing", NM, org="small"),  # hint names an org she is not in
    Row("alice", "GET", "/api/org", NM, org="small"),
    Row("multi", "GET", "/api/org/billing", NM),  # several orgs, no hint
    Row("multi", "GET", "/api/org", NM),
    Row("multi", "GET", "/api/org/billing", A, org="small", role="admin"),
    Row("multi", "GET", "/api/org/billing", D, org="acme", role="developer"),
    # a project route: the project's org decides, and a hint naming another org is refused
    Row("multi", "GET", "/api/projects/p1", A, role="developer"),
    Row("multi", "PATCH", "/api/projects/s1", A, role="admin"),
    Row("multi", "GET", "/api/projects/p1", NM, org="small"),
    Row("bob", "GET", "/api/projects/p1", NM, org="small"),
    Row("bob", "GET", "/api/projects/p1", A, org="acme", role="developer"),
    # ---- plan gating: small is on plan "pro", not listed, so "*" applies ---------------------
    Row("ed", "GET", "/api/org/billing", A, role="admin"),
    Row("gus", "POST", "/api/projects/s1/workflows/w-1/deploy", A, role="developer"),
    Row("gus", "GET", "/api/org/billing", D, role="developer"),
    Row("fay", "GET", "/api/projects/s1/task-history", PR, role="support"),  # support: Enterprise
    Row("fay", "GET", "/api/org/members", PR, role="support"),
    Row("gil", "GET", "/api/projects/s1", PR),  # bindings: Enterprise
    Row("gil", "GET", "/api/org/members", PR),
    # ---- authenticated: needs only an honoured membership ------------------------------------
    Row("sue", "GET", "/api/org", A, role="support"),
    Row("bob", "GET", "/api/projects", A, role="developer"),
    Row("fay", "GET", "/api/org", PR),
    Row("gil", "GET", "/api/projects", PR),
    # ---- public and unauthenticated ----------------------------------------------------------
    Row(None, "GET", "/healthz", Reason.PUBLIC),
    Row("mallory", "GET", "/healthz", Reason.PUBLIC),
    Row("fay", "GET", "/healthz", Reason.PUBLIC),
    Row(None, "GET", "/api/org", Reason.MISSING_CREDENTIALS),
    Row(None, "GET", "/api/projects/p1", Reason.MISSING_CREDENTIALS),
    # ---- routing: no route, HEAD -> GET ------------------------------------------------------
    Row("alice", "GET", "/api/unknown", Reason.NO_ROUTE),
    Row(None, "GET", "/api/unknown", Reason.NO_ROUTE),  # matching comes before authentication
    Row("alice", "DELETE", "/api/org/billing", Reason.NO_ROUTE),  # path known, method not
    Row("bob", "HEAD", "/api/projects/p1", A, role="developer"),
    Row("sue", "HEAD", "/api/projects/p1", D, role="support"),
    Row(None, "HEAD", "/healthz", Reason.PUBLIC),
    Row("alice", "HEAD", "/api/org/invites", Reason.NO_ROUTE),  # HEAD follows GET only
    # ---- bad targets and forbidden methods ---------------------------------------------------
    Row("alice", "GET", "/api/projects/p1/../p2", Reason.BAD_REQUEST),
    Row("alice", "GET", "/api/projects/%2e%2e/p2", Reason.BAD_REQUEST),
    Row("alice", "CONNECT", "/api/org", Reason.BAD_REQUEST),
    Row(None, "TRACE", "/healthz", Reason.BAD_REQUEST),
]


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_decision_table(row: Row) -> None:
    decision = decide(row.user, row.method, row.path, org=row.org)
    assert decision.reason is row.reason, decision.message
    forwarded = {Reason.ALLOWED, Reason.PUBLIC}
    assert decision.forward is (row.reason in forwarded)
    assert decision.shadow_reason is None
    if row.role is not None:
        assert decision.role == row.role


def test_allowed_decision_carries_route_permission_org_project_and_role() -> None:
    d = decide("bob", "POST", "/api/projects/p1/workflows/w-1/deploy")
    assert d.reason is Reason.ALLOWED and d.forward and d.status == 200
    assert d.route is not None
    assert d.route.template == "/api/projects/{project_id}/workflows/{workflow_id}/deploy"
    assert (d.permission, d.org, d.project, d.role) == (
        "workflows:deploy",
        "acme",
        "p1",
        "developer",
    )


def test_project_route_uses_the_projects_org_not_the_callers_first_org() -> None:
    d = decide("multi", "PATCH", "/api/projects/s1")
    assert (d.reason, d.org, d.project, d.role) == (Reason.ALLOWED, "small", "s1", "admin")


def test_missing_permission_names_role_and_permission() -> None:
    d = decide("bob", "GET", "/api/org/billing")
    assert d.status == 403
    assert d.permission == "billing:read"
    assert d.org == "acme"
    assert "developer" in d.message and "billing:read" in d.message


def test_project_binding_gives_no_org_permission() -> None:
    d = decide("carol", "POST", "/api/org/invites")
    assert (d.reason, d.org, d.role) == (Reason.MISSING_PERMISSION, "acme", None)
    assert "per-project" in d.message


def test_unbound_project_message_names_the_project() -> None:
    d = decide("carol", "GET", "/api/projects/p1")
    assert d.reason is Reason.MISSING_PERMISSION
    assert d.project == "p1" and d.org == "acme"
    assert "'p1'" in d.message


def test_several_orgs_without_hint_names_the_header() -> None:
    d = decide("multi", "GET", "/api/org/billing")
    assert d.reason is Reason.NOT_A_MEMBER
    assert d.status == 403
    assert "X-Org-Id" in d.message
    assert d.org is None


def test_header_name_in_message_is_configurable() -> None:
    match = ENFORCE.matcher.match("GET", ("api", "org", "billing"))
    assert match is not None
    d = authorize(
        ENFORCE,
        match,
        Identity("multi"),
        DIRECTORY.memberships("multi"),
        None,
        org_hint_name="X-Tenant",
    )
    assert d.reason is Reason.NOT_A_MEMBER
    assert "X-Tenant" in d.message and "X-Org-Id" not in d.message


def test_hint_naming_foreign_org_says_so() -> None:
    d = decide("alice", "GET", "/api/org/billing", org="small")
    assert d.reason is Reason.NOT_A_MEMBER
    assert "'small'" in d.message


def test_project_of_another_org_than_the_hint() -> None:
    d = decide("multi", "GET", "/api/projects/p1", org="small")
    assert d.reason is Reason.NOT_A_MEMBER
    assert d.org == "acme"  # the project's org, which the hint contradicts
    assert "X-Org-Id" in d.message


def test_unknown_project_reason_and_status() -> None:
    d = decide("alice", "GET", "/api/projects/nope")
    assert (d.reason, d.status, d.project, d.org) == (Reason.UNKNOWN_PROJECT, 403, "nope", None)


def test_plan_restricted_messages() -> None:
    fay = decide("fay", "GET", "/api/projects/s1/task-history")
    assert fay.status == 403
    assert "'pro'" in fay.message and "support" in fay.message
    gil = decide("gil", "GET", "/api/projects/s1")
    assert "per-project" in gil.message


# ---- plans are configuration, not code -------------------------------------------------------


def test_a_plan_that_includes_support_honours_it() -> None:
    # The same policy with "*" honouring support and bindings: fay and gil get access.
    text = make_text().replace(
        '"*": {roles: [admin, developer], project_bindings: false}',
        '"*": {roles: [admin, developer, support], project_bindings: true}',
    )
    generous = compile_policy(parse_yaml(text, "routes.yaml"), "routes.yaml")
    assert decide("fay", "GET", "/api/projects/s1/task-history", policy=generous).reason is A
    assert decide("gil", "GET", "/api/projects/s1", policy=generous).reason is A
    assert decide("fay", "GET", "/api/org", policy=generous).reason is A


def test_unlisted_plan_without_star_plan_is_restricted() -> None:
    text = make_text().replace('  "*": {roles: [admin, developer], project_bindings: false}\n', "")
    strict = compile_policy(parse_yaml(text, "routes.yaml"), "routes.yaml")
    assert "*" not in strict.plans
    assert decide("ed", "GET", "/api/org/billing", policy=strict).reason is PR
    assert decide("ed", "GET", "/api/projects/s1", policy=strict).reason is PR
    assert decide("alice", "GET", "/api/org/billing", policy=strict).reason is A


def test_enterprise_plan_without_support_role_restricts_a_support_binding() -> None:
    text = make_text().replace(
        "enterprise: {roles: [admin, developer, support], project_bindings: true}",
        "enterprise: {roles: [admin, developer], project_bindings: true}",
    )
    policy = compile_policy(parse_yaml(text, "routes.yaml"), "routes.yaml")
    dan = decide("dan", "GET", "/api/projects/p1/task-history", policy=policy)
    assert (dan.reason, dan.role) == (PR, "support")
    carol = decide("carol", "PATCH", "/api/projects/p2", policy=policy)
    assert carol.reason is A


# ---- default allow / deny --------------------------------------------------------------------


def test_default_deny_refuses_unmatched() -> None:
    d = decide("alice", "GET", "/nothing/here")
    assert (d.reason, d.forward, d.status, d.route) == (Reason.NO_ROUTE, False, 403, None)


def test_default_allow_forwards_unmatched_without_identity() -> None:
    policy = make_policy("default: allow")
    for user in ("alice", None, "mallory"):
        d = decide(user, "GET", "/nothing/here", policy=policy)
        assert (d.reason, d.forward, d.route) == (Reason.NO_ROUTE, True, None)
        assert d.shadow_reason is None
    # matched routes are still enforced
    assert decide("bob", "GET", "/api/org/billing", policy=policy).reason is D


# ---- shadow mode -----------------------------------------------------------------------------

SHADOW = make_policy("mode: shadow")


@pytest.mark.parametrize(
    ("user", "method", "path", "real"),
    [
        ("bob", "GET", "/api/org/billing", Reason.MISSING_PERMISSION),
        ("mallory", "GET", "/api/org", Reason.NOT_A_MEMBER),
        ("alice", "GET", "/api/projects/nope", Reason.UNKNOWN_PROJECT),
        ("fay", "GET", "/api/org", Reason.PLAN_RESTRICTED),
        ("multi", "GET", "/api/org/billing", Reason.NOT_A_MEMBER),
        (None, "GET", "/api/org", Reason.MISSING_CREDENTIALS),
        ("alice", "GET", "/nothing/here", Reason.NO_ROUTE),
    ],
)
def test_global_shadow_forwards_denials(
    user: str | None, method: str, path: str, real: Reason
) -> None:
    d = decide(user, method, path, policy=SHADOW)
    assert (d.reason, d.forward, d.shadow_reason) == (Reason.SHADOW_DENY, True, real)
    assert d.status == 200
    # The same request in enforce mode is the real denial.
    enforced = decide(user, method, path)
    assert (enforced.reason, enforced.forward) == (real, False)


def test_shadow_keeps_decision_details() -> None:
    d = decide("bob", "GET", "/api/org/billing", policy=SHADOW)
    assert (d.permission, d.org, d.role) == ("billing:read", "acme", "developer")
    assert "billing:read" in d.message


def test_shadow_does_not_touch_allowed_or_public() -> None:
    assert decide("alice", "GET", "/api/org/billing", policy=SHADOW).reason is A
    public = decide(None, "GET", "/healthz", policy=SHADOW)
    assert (public.reason, public.shadow_reason) == (Reason.PUBLIC, None)


@pytest.mark.parametrize(
    ("method", "path", "upgrade", "status"),
    [
        ("GET", "/api/projects/../p1", None, 400),
        ("GET", "/api/org/billing", "h2c", 400),
        ("GET", "/api/org/billing", "websocket", 400),
        ("CONNECT", "/api/org", None, 405),
        ("TRACE", "/api/org", None, 405),
    ],
)
def test_bad_request_is_never_shadowed(
    method: str, path: str, upgrade: str | None, status: int
) -> None:
    for policy in (SHADOW, make_policy(secrets_mode="shadow")):
        d = decide("bob", method, path, policy=policy, upgrade=upgrade)
        assert (d.reason, d.forward, d.shadow_reason) == (Reason.BAD_REQUEST, False, None)
        assert d.status == status


def test_per_route_shadow_in_enforce_policy() -> None:
    policy = make_policy(secrets_mode="shadow")
    d = decide("bob", "PUT", "/api/projects/p1/secrets/API_KEY", policy=policy)
    assert (d.reason, d.forward, d.shadow_reason) == (
        Reason.SHADOW_DENY,
        True,
        Reason.MISSING_PERMISSION,
    )
    anonymous = decide(None, "PUT", "/api/projects/p1/secrets/API_KEY", policy=policy)
    assert anonymous.shadow_reason is Reason.MISSING_CREDENTIALS
    # other routes stay enforced, and so does an unmatched request
    assert decide("bob", "GET", "/api/org/billing", policy=policy).reason is D
    assert decide("bob", "GET", "/nothing", policy=policy).reason is Reason.NO_ROUTE


def test_per_route_enforce_in_shadow_policy() -> None:
    policy = make_policy("mode: shadow", secrets_mode="enforce")
    d = decide("bob", "PUT", "/api/projects/p1/secrets/API_KEY", policy=policy)
    assert (d.reason, d.forward) == (D, False)
    assert decide("bob", "GET", "/api/org/billing", policy=policy).reason is Reason.SHADOW_DENY


# ---- upgrades --------------------------------------------------------------------------------

LIVE = "/api/projects/p1/task-history/live"


@pytest.mark.parametrize("upgrade", ["websocket", "WebSocket", " websocket "])
def test_websocket_upgrade_on_websocket_route(upgrade: str) -> None:
    d = decide("sue", "GET", LIVE, upgrade=upgrade)
    assert (d.reason, d.forward) == (A, True)


def test_websocket_upgrade_is_still_authorized() -> None:
    assert decide("carol", "GET", LIVE, upgrade="websocket").reason is D
    assert decide(None, "GET", LIVE, upgrade="websocket").reason is Reason.MISSING_CREDENTIALS


@pytest.mark.parametrize(
    ("path", "upgrade"),
    [
        ("/api/projects/p1/task-history", "websocket"),  # a route without websocket: true
        ("/healthz", "websocket"),  # even a public one
        ("/nothing/here", "websocket"),  # no route at all
        (LIVE, "h2c"),  # RFC 9113 §3.1 dropped h2c; it smuggles a second protocol
        (LIVE, "foo/1"),
        (LIVE, ""),
    ],
)
def test_other_upgrades_are_bad_requests(path: str, upgrade: str) -> None:
    d = decide("alice", "GET", path, upgrade=upgrade)
    assert (d.reason, d.forward, d.status) == (Reason.BAD_REQUEST, False, 400)


def test_upgrade_on_default_allow_unmatched_is_refused() -> None:
    d = decide("alice", "GET", "/x", policy=make_policy("default: allow"), upgrade="websocket")
    assert (d.reason, d.forward) == (Reason.BAD_REQUEST, False)


# ---- methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["CONNECT", "TRACE"])
def test_connect_and_trace_are_405(method: str) -> None:
    d = decide("alice", method, "/api/org")
    assert (d.reason, d.forward, d.status) == (Reason.BAD_REQUEST, False, 405)
    assert method in d.message


def test_head_uses_the_get_route() -> None:
    head = decide("bob", "HEAD", "/api/projects/p1")
    get = decide("bob", "GET", "/api/projects/p1")
    assert head.route is get.route
    assert head.permission == "projects:read"


def test_methods_are_case_sensitive() -> None:
    assert decide("alice", "get", "/api/org/billing").reason is Reason.NO_ROUTE


# ---- the step functions directly -------------------------------------------------------------


def test_route_request_returns_match_for_protected_route() -> None:
    routed = route_request(ENFORCE, "GET", canonicalize("/api/projects/p1?x=1"))
    assert isinstance(routed, RouteMatch)
    assert dict(routed.params) == {"project_id": "p1"}


def test_authorize_without_memberships_is_not_a_member() -> None:
    routed = route_request(ENFORCE, "GET", canonicalize("/api/projects/p1"))
    assert isinstance(routed, RouteMatch)
    d = authorize(ENFORCE, routed, Identity("x"), (), "acme")
    assert d.reason is NM


def test_authorize_unknown_project_org() -> None:
    routed = route_request(ENFORCE, "GET", canonicalize("/api/projects/p1"))
    assert isinstance(routed, RouteMatch)
    d = authorize(ENFORCE, routed, Identity("alice"), DIRECTORY.memberships("alice"), None)
    assert d.reason is UP


def test_authorize_role_the_policy_does_not_define() -> None:
    # A store that answers with a role routes.yaml does not know grants nothing.
    routed = route_request(ENFORCE, "GET", canonicalize("/api/org/members"))
    assert isinstance(routed, RouteMatch)
    owner = Membership("acme", "enterprise", "owner")
    d = authorize(ENFORCE, routed, Identity("o"), (owner,), None)
    # No plan lists "owner", so the membership relies on a role its plan does not include.
    assert (d.reason, d.forward) == (Reason.PLAN_RESTRICTED, False)


def test_pick_org() -> None:
    one = Membership("acme", "enterprise", "admin")
    two = Membership("small", "pro", None, MappingProxyType({"s1": "developer"}))
    assert pick_org((one,), None) is one
    assert pick_org((one, two), "small") is two
    assert pick_org((one, two), None) == "member of several organizations; name one with X-Org-Id"
    assert pick_org((one,), "other") == "not a member of organization 'other'"
    assert pick_org((), None) == "not a member of any organization"


def test_inline_fixtures_are_what_the_tables_assume() -> None:
    # Guards the tables above against a silently changed fixture.
    assert ENFORCE.plan("pro") is ENFORCE.plans["*"]
    assert ENFORCE.plan("enterprise") is ENFORCE.plans["enterprise"]
    assert [m.org for m in DIRECTORY.memberships("multi")] == ["acme", "small"]
    assert DIRECTORY.project_org("s1") == "small"
    assert "workflows:deploy" in ENFORCE.roles["developer"].granted
    assert "workflows_archive:read" not in ENFORCE.roles["developer"].granted


def test_authenticated_project_route_needs_a_role_on_that_project() -> None:
    """Review finding: a binding to proj-staging must not open proj-prod's authenticated route."""
    from proxy.policy.compile import compile_policy
    from proxy.policy.evaluate import evaluate
    from proxy.policy.members import parse_members
    from proxy.policy.model import Identity, Reason
    from proxy.yamlsource import parse_yaml

    policy = compile_policy(
        parse_yaml(
            "version: 1\n"
            "roles: {developer: {permissions: [x:read]}}\n"
            "plans: {'*': {roles: [developer], project_bindings: true}}\n"
            "routes:\n"
            "  - path: /api/projects/{project_id}/overview\n"
            "    methods: [GET]\n"
            "    authenticated: true\n"
            "  - path: /x\n"
            "    methods: [GET]\n"
            "    permission: x:read\n",
            "r.yaml",
        ),
        "r.yaml",
    )
    directory = parse_members(
        parse_yaml(
            "orgs:\n  acme:\n    plan: enterprise\n    projects: [p1, p2]\n"
            "    members: {carol: {projects: {p2: developer}}, bob: developer}\n",
            "m.yaml",
        ),
        "m.yaml",
    )

    def reason(user: str, project: str) -> Reason:
        path = f"/api/projects/{project}/overview"
        return evaluate(policy, "GET", path, Identity(user), directory).decision.reason

    assert reason("carol", "p2") is Reason.ALLOWED
    assert reason("carol", "p1") is Reason.MISSING_PERMISSION
    assert reason("bob", "p1") is Reason.ALLOWED
