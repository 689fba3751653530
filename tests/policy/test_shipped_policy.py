"""The shipped routes.yaml and members.yaml: they compile, pass their tests and encode SPEC §10."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.policy.canonical import canonicalize
from proxy.policy.compile import compile_policy
from proxy.policy.evaluate import run_policy_tests
from proxy.policy.members import Directory, parse_members
from proxy.policy.model import BadTarget, Policy, Reason
from proxy.policy.model import TestCase as Case  # "Test*" names would be collected by pytest
from proxy.yamlsource import parse_yaml

ROOT = Path(__file__).resolve().parents[2]
ROUTES = ROOT / "routes.yaml"
MEMBERS = ROOT / "members.yaml"

P = "/api/projects/{project_id}"
Y, N = True, False

# SPEC §10, row by row: (methods, path templates, permission, admin, developer, support).
# "P" is written out; "…/deactivate" is P/integrations/{integration_id}/deactivate.
SPEC_10: tuple[tuple[tuple[str, ...], tuple[str, ...], str, bool, bool, bool], ...] = (
    (("GET",), ("/healthz",), "public", Y, Y, Y),
    (("GET",), ("/static/{path*}",), "public", Y, Y, Y),
    (("GET",), ("/api/org",), "authenticated", Y, Y, Y),
    (("GET",), ("/api/org/members",), "team:read", Y, Y, N),
    (("POST",), ("/api/org/invites",), "team:invite", Y, N, N),
    (("PATCH", "DELETE"), ("/api/org/members/{user_id}",), "team:manage", Y, N, N),
    (("GET",), ("/api/org/billing",), "billing:read", Y, N, N),
    (("PUT",), ("/api/org/billing",), "billing:write", Y, N, N),
    (("GET",), ("/api/projects",), "authenticated", Y, Y, Y),
    (("POST",), ("/api/projects",), "projects:create", Y, N, N),
    (("GET",), (P,), "projects:read", Y, Y, N),
    (("PATCH",), (P,), "projects:write", Y, N, N),
    (("DELETE",), (P,), "projects:delete", Y, N, N),
    (
        ("GET",),
        (f"{P}/integrations", f"{P}/integrations/{{integration_id}}"),
        "integrations:read",
        Y,
        Y,
        N,
    ),
    (("POST",), (f"{P}/integrations",), "integrations:create", Y, Y, N),
    (("DELETE",), (f"{P}/integrations/{{integration_id}}",), "integrations:delete", Y, Y, N),
    (
        ("POST",),
        (
            f"{P}/integrations/{{integration_id}}/activate",
            f"{P}/integrations/{{integration_id}}/deactivate",
        ),
        "integrations:activate",
        Y,
        Y,
        N,
    ),
    (
        ("GET",),
        (f"{P}/integrations/{{integration_id}}/credentials",),
        "integrations:credentials",
        Y,
        Y,
        N,
    ),
    (("GET",), (f"{P}/workflows", f"{P}/workflows/{{workflow_id}}"), "workflows:read", Y, Y, N),
    (("POST",), (f"{P}/workflows",), "workflows:create", Y, Y, N),
    (("PUT", "PATCH"), (f"{P}/workflows/{{workflow_id}}",), "workflows:update", Y, Y, N),
    (("DELETE",), (f"{P}/workflows/{{workflow_id}}",), "workflows:delete", Y, Y, N),
    (("POST",), (f"{P}/workflows/{{workflow_id}}/deploy",), "workflows:deploy", Y, Y, N),
    (("GET",), (f"{P}/sdk-settings",), "sdk:read", Y, Y, N),
    (("PATCH",), (f"{P}/sdk-settings",), "sdk:write", Y, Y, N),
    (("POST",), (f"{P}/sdk-settings/signing-key",), "sdk:write", Y, Y, N),
    (("GET",), (f"{P}/event-destinations",), "event_destinations:read", Y, N, N),
    (("POST",), (f"{P}/event-destinations",), "event_destinations:write", Y, N, N),
    (
        ("PATCH", "DELETE"),
        (f"{P}/event-destinations/{{destination_id}}",),
        "event_destinations:write",
        Y,
        N,
        N,
    ),
    (("GET",), (f"{P}/secrets",), "secrets:read", Y, Y, N),
    (("POST",), (f"{P}/secrets",), "secrets:create", Y, Y, N),
    (("PUT",), (f"{P}/secrets/{{secret_name}}",), "secrets:update", Y, N, N),
    (("DELETE",), (f"{P}/secrets/{{secret_name}}",), "secrets:delete", Y, N, N),
    (("GET", "POST"), (f"{P}/api-keys",), "api_keys:manage", Y, N, N),
    (("DELETE",), (f"{P}/api-keys/{{key_id}}",), "api_keys:manage", Y, N, N),
    (
        ("GET",),
        (f"{P}/connected-users", f"{P}/connected-users/{{connected_user_id}}"),
        "connected_users:read",
        Y,
        Y,
        Y,
    ),
    (
        ("PATCH",),
        (f"{P}/connected-users/{{connected_user_id}}/metadata",),
        "connected_users:manage",
        Y,
        Y,
        Y,
    ),
    (
        ("DELETE",),
        (f"{P}/connected-users/{{connected_user_id}}/integrations/{{integration_id}}",),
        "connected_users:manage",
        Y,
        Y,
        Y,
    ),
    (
        ("GET",),
        (f"{P}/task-history", f"{P}/task-history/{{execution_id}}"),
        "task_history:read",
        Y,
        Y,
        Y,
    ),
    (("POST",), (f"{P}/task-history/{{execution_id}}/replay",), "executions:replay", Y, Y, Y),
    (("GET",), (f"{P}/task-history/stream",), "task_history:read", Y, Y, Y),
    (("GET",), (f"{P}/task-history/live",), "task_history:read", Y, Y, Y),
)

ROLES = ("admin", "developer", "support")
USERS = {"alice": "admin", "bob": "developer", "sue": "support"}  # acme's org-wide roles
# A case tests a role's cell when it is allowed or denied for the role's (lack of) permission.
CELL_REASONS = {
    "allow": {Reason.ALLOWED, Reason.PUBLIC},
    "deny": {Reason.MISSING_PERMISSION},
}


def spec_cells() -> dict[tuple[str, str], tuple[str, dict[str, bool]]]:
    """(method, template) → (permission, {role: mark}) for every cell of SPEC §10."""
    cells: dict[tuple[str, str], tuple[str, dict[str, bool]]] = {}
    for methods, templates, permission, *marks in SPEC_10:
        for method in methods:
            for template in templates:
                assert (method, template) not in cells, (method, template)
                cells[method, template] = (permission, dict(zip(ROLES, marks, strict=True)))
    return cells


def load_shipped() -> Policy:
    text = ROUTES.read_text(encoding="utf-8")
    return compile_policy(parse_yaml(text, "routes.yaml"), "routes.yaml")


def load_members() -> Directory:
    text = MEMBERS.read_text(encoding="utf-8")
    return parse_members(parse_yaml(text, "members.yaml"), "members.yaml")


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_shipped()


def routed_template(policy: Policy, case: Case) -> str | None:
    """The template the shipped matcher routes a test case to (None: bad target or no route)."""
    try:
        target = canonicalize(case.path, allow_semicolons=policy.allow_semicolons)
    except BadTarget:
        return None
    match = policy.matcher.match(case.method, target.segments)
    return match.route.template if match is not None else None


# ---- compiles and passes its own tests -------------------------------------------------------


def test_shipped_routes_compile_and_all_tests_pass(policy: Policy) -> None:
    assert policy.default == "deny"
    assert policy.mode == "enforce"
    assert policy.test_members is not None
    assert len(policy.test_cases) >= 200
    failures = run_policy_tests(policy)
    assert failures == [], "\n".join(str(f) for f in failures)


def test_roles_and_plans_match_spec_1(policy: Policy) -> None:
    assert set(policy.roles) == set(ROLES)
    assert policy.roles["admin"].description == "Organization Admin"
    assert policy.plans["enterprise"].roles == frozenset(ROLES)
    assert policy.plans["enterprise"].project_bindings is True
    assert policy.plans["*"].roles == frozenset({"admin", "developer"})
    assert policy.plans["*"].project_bindings is False


# ---- the §10 table literal and the shipped routes are the same table --------------------------


def test_every_shipped_route_is_a_spec_row_and_back(policy: Policy) -> None:
    cells = spec_cells()
    shipped: dict[tuple[str, str], str] = {}
    for route in policy.routes:
        assert route.methods is not None, f"{route.template}: SPEC §10 lists explicit methods"
        requirement = (
            "public"
            if route.public
            else "authenticated"
            if route.authenticated
            else route.permission or ""
        )
        for method in route.methods:
            shipped[method, route.template] = requirement
    assert set(shipped) == set(cells)
    for key, requirement in shipped.items():
        assert requirement == cells[key][0], key


def test_role_grants_match_spec_marks(policy: Policy) -> None:
    for (method, template), (permission, marks) in spec_cells().items():
        if permission in ("public", "authenticated"):
            continue
        for role, mark in marks.items():
            granted = permission in policy.roles[role].granted
            assert granted is mark, f"{method} {template}: {role} {permission}"


def test_websocket_only_on_the_live_route(policy: Policy) -> None:
    assert {r.template for r in policy.routes if r.websocket} == {f"{P}/task-history/live"}


# ---- COVERAGE: every §10 cell has a policy test for alice, bob and sue -------------------------


def test_every_spec_cell_has_a_test_case_for_alice_bob_and_sue(policy: Policy) -> None:
    covered: dict[tuple[str, str, str], set[str]] = {}
    for case in policy.test_cases:
        if case.user not in USERS:
            continue
        template = routed_template(policy, case)
        if template is None:
            continue
        if case.reason is not None and case.reason not in CELL_REASONS[case.expect]:
            continue  # e.g. a denial for another org's project says nothing about the role
        covered.setdefault((case.user, case.method, template), set()).add(case.expect)
    missing = []
    for (method, template), (_, marks) in spec_cells().items():
        for user, role in USERS.items():
            want = "allow" if marks[role] else "deny"
            if want not in covered.get((user, method, template), set()):
                missing.append(f"{user} {method} {template}: expect {want}")
    assert missing == [], "SPEC §10 cells without a policy test:\n" + "\n".join(missing)


# ---- members.yaml and routes.yaml tests.members agree ----------------------------------------


def test_shipped_members_equal_the_test_members(policy: Policy) -> None:
    shipped = load_members()
    inline = policy.test_members
    assert inline is not None
    assert shipped.users(), "members.yaml has no users"
    for user in shipped.users():
        assert shipped.memberships(user) == inline.memberships(user), user
    assert inline.users() == shipped.users()
    assert shipped.orgs == inline.orgs


def test_shipped_members_match_spec_10() -> None:
    d = load_members()
    assert d.orgs["acme"].plan == "enterprise"
    assert d.orgs["acme"].projects == frozenset({"proj-prod", "proj-staging"})
    assert d.orgs["smallco"].plan == "pro"
    assert d.orgs["smallco"].projects == frozenset({"sc-main"})
    roles = {u: [(m.org, m.role, dict(m.projects)) for m in d.memberships(u)] for u in d.users()}
    assert roles == {
        "alice": [("acme", "admin", {})],
        "bob": [("acme", "developer", {})],
        "sue": [("acme", "support", {})],
        "carol": [("acme", None, {"proj-staging": "developer"})],
        "dan": [("acme", None, {"proj-prod": "support"})],
        "ed": [("smallco", "admin", {})],
        "gus": [("smallco", "developer", {})],
        "fay": [("smallco", "support", {})],
    }


# ---- mutation: the tests catch a weakened policy ---------------------------------------------


def test_granting_developer_secrets_update_fails_the_policy_tests() -> None:
    text = ROUTES.read_text(encoding="utf-8")
    anchor = "      - secrets:create\n"
    assert text.count(anchor) == 1
    mutated = text.replace(anchor, anchor + "      - secrets:update\n")
    policy = compile_policy(parse_yaml(mutated, "routes.yaml"), "routes.yaml")
    assert "secrets:update" in policy.roles["developer"].granted
    failures = run_policy_tests(policy)
    failed = {(f.case.user, f.case.method, f.case.path) for f in failures}
    assert ("bob", "PUT", "/api/projects/proj-prod/secrets/sec-API_KEY") in failed
    assert ("gus", "PUT", "/api/projects/sc-main/secrets/sec-API_KEY") in failed
    assert all(f.case.method == "PUT" and "/secrets/" in f.case.path for f in failures)
    assert all(str(f).startswith(f"routes.yaml:{f.case.line}: ") for f in failures)


def test_granting_support_workflows_fails_the_policy_tests() -> None:
    text = ROUTES.read_text(encoding="utf-8")
    anchor = "    # Only the Connected Users and Task History pages of every project.\n"
    anchor += "    permissions:\n"
    assert text.count(anchor) == 1
    mutated = text.replace(anchor, anchor + '      - "workflows:*"\n')
    failures = run_policy_tests(compile_policy(parse_yaml(mutated, "routes.yaml"), "routes.yaml"))
    assert {f.case.user for f in failures} >= {"sue", "dan"}
