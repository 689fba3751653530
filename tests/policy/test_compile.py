"""Tests for proxy.policy.compile: a valid policy compiles frozen; every rejection is located."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from proxy.policy.compile import compile_policy, grants
from proxy.policy.model import Policy, PolicyError, Reason
from proxy.policy.model import TestCase as Case  # "Test*" names would be collected by pytest
from proxy.yamlsource import parse_yaml

# Seven lines, so that in every document below `routes:` is line 8 and its first item line 9.
PREFIX = """\
version: 1
roles:
  admin: {description: Organization Admin, permissions: ["*"]}
  dev:
    permissions: [projects:read, "workflows:*"]
plans:
  "*": {roles: [admin, dev]}
"""

ROUTE = """\
routes:
  - path: /api/projects/{project_id}
    methods: [GET]
    permission: projects:read
"""

VALID = """\
version: 1
default: allow
mode: shadow
allow_semicolons: true
permissions:
  projects:read: Read projects
  workflows:deploy: Deploy workflows
  billing:read: View billing
roles:
  admin: {description: Organization Admin, permissions: ["*"]}
  dev:
    permissions: [projects:read, "workflows:*"]
plans:
  enterprise: {roles: [admin, dev], project_bindings: true}
  "*": {roles: [admin]}
routes:
  - path: /healthz
    methods: [GET]
    public: true
  - path: /api/projects/{project_id}/workflows/{workflow_id}/deploy
    methods: [POST]
    permission: workflows:deploy
    mode: enforce
    description: Deploy a workflow
  - path: /api/org/billing
    methods: "*"
    permission: billing:read
  - path: /api/org
    methods: [GET]
    authenticated: true
  - path: /api/p/{pid}/live
    methods: [GET]
    permission: projects:read
    project_param: pid
    websocket: true
  - path: /static/{project_id}/{path*}
    methods: [GET]
    permission: projects:read
tests:
  members:
    orgs:
      acme:
        plan: enterprise
        projects: [p1]
        members:
          alice: admin
          bob: {projects: {p1: dev}}
  cases:
    - {user: bob, method: POST, path: /api/projects/p1/workflows/w1/deploy, expect: allow}
    - {user: alice, org: acme, method: GET, path: /api/org/billing, expect: deny,
       reason: missing_permission}
    - {method: GET, path: /healthz, expect: allow, reason: public}
"""


def compile_text(text: str) -> Policy:
    return compile_policy(parse_yaml(text, "routes.yaml"), "routes.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        compile_text(text)
    return [str(p) for p in info.value.problems]


# ---- a valid file --------------------------------------------------------------------------


def test_valid_minimal() -> None:
    policy = compile_text(PREFIX + ROUTE)
    assert policy.source == "routes.yaml"
    assert (policy.default, policy.mode, policy.allow_semicolons) == ("deny", "enforce", False)
    (route,) = policy.routes
    assert route.template == "/api/projects/{project_id}"
    assert route.methods == frozenset({"GET"})
    assert route.permission == "projects:read"
    assert route.project_param == "project_id"
    assert route.line == 9
    assert policy.permissions == frozenset({"projects:read"})
    assert policy.roles["admin"].description == "Organization Admin"
    assert policy.roles["dev"].description == "dev"  # defaults to the role name
    assert policy.roles["dev"].patterns == ("projects:read", "workflows:*")
    assert policy.roles["dev"].granted == frozenset({"projects:read"})
    assert policy.plans["*"].roles == frozenset({"admin", "dev"})
    assert policy.plans["*"].project_bindings is False
    assert policy.plan("anything") is policy.plans["*"]
    assert policy.test_members is None and policy.test_cases == ()
    found = policy.matcher.match("GET", ("api", "projects", "p1"))
    assert found is not None and found.route is route


def test_valid_full() -> None:
    policy = compile_text(VALID)
    assert (policy.default, policy.mode, policy.allow_semicolons) == ("allow", "shadow", True)
    assert [r.template for r in policy.routes] == [
        "/healthz",
        "/api/projects/{project_id}/workflows/{workflow_id}/deploy",
        "/api/org/billing",
        "/api/org",
        "/api/p/{pid}/live",
        "/static/{project_id}/{path*}",
    ]
    healthz, deploy, billing, org, live, static = policy.routes
    assert healthz.public and healthz.permission is None
    assert deploy.mode == "enforce" and deploy.project_param == "project_id"
    assert billing.methods is None and billing.project_param is None and billing.mode is None
    assert org.authenticated and org.permission is None
    assert live.websocket and live.project_param == "pid"
    assert static.project_param == "project_id"
    assert policy.permissions == frozenset({"workflows:deploy", "billing:read", "projects:read"})
    # Granted covers route permissions and catalogue entries alike.
    assert policy.roles["admin"].granted == frozenset(
        {"projects:read", "workflows:deploy", "billing:read"}
    )
    assert policy.roles["dev"].granted == frozenset({"projects:read", "workflows:deploy"})
    assert policy.plans["enterprise"].project_bindings is True
    assert policy.test_members is not None
    assert policy.test_members.memberships("bob")[0].projects == {"p1": "dev"}
    assert policy.test_cases == (
        Case("bob", "POST", "/api/projects/p1/workflows/w1/deploy", "allow", None, None, 49),
        Case("alice", "GET", "/api/org/billing", "deny", Reason.MISSING_PERMISSION, "acme", 50),
        Case(None, "GET", "/healthz", "allow", Reason.PUBLIC, None, 52),
    )
    assert isinstance(policy.roles, MappingProxyType)
    assert isinstance(policy.plans, MappingProxyType)
    assert isinstance(policy.routes, tuple)


def test_catalogue_entries_without_routes_are_granted() -> None:
    catalogue = "version: 1\npermissions: {projects:read: r, workflows:run: w}\n"
    policy = compile_text(PREFIX.replace("version: 1\n", catalogue) + ROUTE)
    assert policy.roles["dev"].granted == frozenset({"projects:read", "workflows:run"})
    assert policy.permissions == frozenset({"projects:read"})


@pytest.mark.parametrize(
    ("pattern", "permission", "expected"),
    [
        ("*", "billing:read", True),
        ("workflows:*", "workflows:deploy", True),
        ("workflows:*", "workflows:a:b", True),
        ("workflows:*", "workflowsx:deploy", False),
        ("workflows:*", "workflows", False),
        ("billing:read", "billing:read", True),
        ("billing:read", "billing:write", False),
    ],
)
def test_grants(pattern: str, permission: str, expected: bool) -> None:
    assert grants(pattern, permission) is expected


# ---- rejections: each document, the exact line, a fragment of the message -----------------

R = PREFIX + "routes:\n"  # the next line is 9
NO_STAR = R.replace('["*"]', '["team:*"]')


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        # top level
        ("- a\n", 1, "routes file must be a mapping"),
        (PREFIX + ROUTE + "extra: 1\n", 12, "unknown key 'extra' in the routes file"),
        (PREFIX + ROUTE + "route: []\n", 12, "(did you mean 'routes'?)"),
        (PREFIX[len("version: 1\n") :] + ROUTE, 1, "missing required key 'version'"),
        (PREFIX.replace("version: 1", "version: 2") + ROUTE, 1, "unsupported version 2"),
        (PREFIX.replace("version: 1", "version: '1'") + ROUTE, 1, "unsupported version '1'"),
        (PREFIX.replace("version: 1", "version: true") + ROUTE, 1, "unsupported version True"),
        (PREFIX + ROUTE + "default: maybe\n", 12, "default must be 'deny' or 'allow'"),
        (PREFIX + ROUTE + "mode: loud\n", 12, "mode must be 'enforce' or 'shadow'"),
        (PREFIX + ROUTE + "allow_semicolons: 1\n", 12, "allow_semicolons must be true or false"),
        ("version: 1\nplans: {}\nroutes: []\n", 1, "missing required key 'roles'"),
        (PREFIX, 1, "missing required key 'routes'"),
        (R.replace("routes:\n", "routes: {}\n"), 8, "routes must be a list"),
        # roles
        (
            "version: 1\nroles: {}\nplans: {'*': {roles: [a]}}\nroutes: []\n",
            2,
            "roles must define at least one role",
        ),
        (
            PREFIX.replace("[projects:read,", "[projects:read, 'workflows*',") + ROUTE,
            5,
            "bad permission pattern 'workflows*'",
        ),
        (
            PREFIX.replace("[projects:read,", "[Projects:Read,") + ROUTE,
            5,
            "bad permission pattern 'Projects:Read'",
        ),
        (PREFIX.replace("[projects:read,", "[3,") + ROUTE, 5, "role 'dev' permission must be"),
        (
            PREFIX.replace("  dev:\n", "  Dev:\n").replace("dev]", "Dev]") + ROUTE,
            4,
            "bad role name 'Dev'",
        ),
        (
            PREFIX.replace("    permissions: [", "    perms: [") + ROUTE,
            5,
            "unknown key 'perms' in role 'dev' (did you mean 'permissions'?)",
        ),
        (
            PREFIX.replace("    permissions: [", "    perms: [") + ROUTE,
            4,
            "role 'dev' is missing 'permissions'",
        ),
        (
            PREFIX.replace(
                '  admin: {description: Organization Admin, permissions: ["*"]}', '  admin: ["*"]'
            )
            + ROUTE,
            3,
            "role 'admin' must be a mapping",
        ),
        (
            PREFIX.replace("description: Organization Admin", "description: 5") + ROUTE,
            3,
            "role 'admin' description must be a string",
        ),
        # plans
        (
            PREFIX.replace("[admin, dev]", "[admn, dev]") + ROUTE,
            7,
            "unknown role 'admn' in plan '*' (did you mean 'admin'?)",
        ),
        (PREFIX.replace("[admin, dev]", "[]") + ROUTE, 7, "plan '*' has no roles"),
        (PREFIX.replace("{roles: [admin, dev]}", "{}") + ROUTE, 7, "plan '*' is missing 'roles'"),
        (
            PREFIX.replace("{roles: [admin, dev]}", "{roles: [admin], bindings: true}") + ROUTE,
            7,
            "unknown key 'bindings' in plan '*'",
        ),
        (
            PREFIX.replace("{roles: [admin, dev]}", "{roles: [admin], project_bindings: 2}")
            + ROUTE,
            7,
            "plan '*' project_bindings must be true or false",
        ),
        (
            PREFIX.replace('  "*": {roles: [admin, dev]}\n', "  - admin\n") + ROUTE,
            6,
            "plans (plan name -> {roles, project_bindings}) must be a mapping",
        ),
        (
            PREFIX.replace('  "*": {roles: [admin, dev]}\n', "  {}\n") + ROUTE,
            6,
            "plans must define at least one plan",
        ),
        # routes: shape and keys
        (R + "  - /healthz\n", 9, "a route must be a mapping"),
        (
            R + "  - {path: /x, methods: [GET], public: true, owner: me}\n",
            9,
            "unknown key 'owner' in a route",
        ),
        (
            R + "  - {path: /x, methods: [GET], permision: projects:read}\n",
            9,
            "(did you mean 'permission'?)",
        ),
        (R + "  - {methods: [GET], public: true}\n", 9, "route is missing 'path'"),
        (R + "  - {path: /x, public: true}\n", 9, "route is missing 'methods'"),
        # templates (the message comes from parse_template)
        (R + "  - {path: /x/, methods: [GET], public: true}\n", 9, "remove the trailing slash"),
        (R + "  - {path: x, methods: [GET], public: true}\n", 9, "must start with '/'"),
        (R + "  - {path: /a//b, methods: [GET], public: true}\n", 9, "empty segment"),
        (
            R + "  - path: /a/v{x}\n    methods: [GET]\n    public: true\n",
            9,
            "bad path template '/a/v{x}': segment 'v{x}' mixes text and a parameter",
        ),
        (
            R + "  - path: /a/{x}/{x}\n    methods: [GET]\n    public: true\n",
            9,
            "parameter {x} appears twice",
        ),
        (
            R + "  - path: /a/{x*}/b\n    methods: [GET]\n    public: true\n",
            9,
            "must be the last segment",
        ),
        (R + "  - {path: 7, methods: [GET], public: true}\n", 9, "path must be a string"),
        # methods
        (R + "  - {path: /x, methods: [], public: true}\n", 9, "methods must be a non-empty list"),
        (R + "  - {path: /x, methods: GET, public: true}\n", 9, "methods must be a non-empty list"),
        (
            R + "  - path: /x\n    methods:\n      - GET\n      - get\n    public: true\n",
            12,
            "methods are case-sensitive, write 'GET'",
        ),
        (R + "  - {path: /x, methods: ['*'], public: true}\n", 9, 'write methods: "*"'),
        (R + "  - {path: /x, methods: [G T], public: true}\n", 9, "not an HTTP method token"),
        (
            R + "  - path: /x\n    methods:\n      - CONNECT\n    public: true\n",
            11,
            "CONNECT is never proxied",
        ),
        (R + "  - {path: /x, methods: [GET, TRACE], public: true}\n", 9, "TRACE is never proxied"),
        (
            R + "  - {path: /x, methods: [GET, GET], public: true}\n",
            9,
            "method GET is listed twice",
        ),
        # permission / public / authenticated
        (
            R + "  - {path: /x, methods: [GET]}\n",
            9,
            "route needs one of 'permission', 'public: true' or 'authenticated: true'",
        ),
        (R + "  - {path: /x, methods: [GET], public: false}\n", 9, "route needs one of"),
        (
            R + "  - {path: /x, methods: [GET], permission: projects:read, public: true}\n",
            9,
            "route sets permission and public: true: choose exactly one",
        ),
        (
            R + "  - {path: /x, methods: [GET], public: true, authenticated: true}\n",
            9,
            "route sets public: true and authenticated: true",
        ),
        (R + "  - {path: /x, methods: [GET], public: 'yes'}\n", 9, "public must be true or false"),
        (
            R + "  - {path: /x, methods: [GET], authenticated: 1}\n",
            9,
            "authenticated must be true or false",
        ),
        (
            R + "  - {path: /x, methods: [GET], permission: 'Billing Read'}\n",
            9,
            "bad permission name 'Billing Read'",
        ),
        # Without a catalogue only a role without "*" can expose a typo (hence the catalogue).
        (
            NO_STAR + "  - path: /x\n    methods: [GET]\n    permission: billing:read\n",
            11,
            "permission 'billing:read' is granted by no role (likely a typo)",
        ),
        (
            NO_STAR + "  - path: /x\n    methods: [GET]\n    permission: project:read\n",
            11,
            "(did you mean 'projects:read'?)",
        ),
        # other route keys
        (
            R + "  - {path: /x, methods: [GET], public: true, websocket: 'no'}\n",
            9,
            "websocket must be true or false",
        ),
        (
            R + "  - {path: /x, methods: [GET], public: true, mode: audit}\n",
            9,
            "route mode must be 'enforce' or 'shadow'",
        ),
        (
            R + "  - {path: /x, methods: [GET], public: true, description: ''}\n",
            9,
            "route description must not be empty",
        ),
        (
            R + "  - path: /p/{pid}\n    methods: [GET]\n    permission: projects:read\n"
            "    project_param: project\n",
            12,
            "project_param 'project' is not a parameter of the path (parameters: {pid})",
        ),
        (
            R + "  - path: /p/{pid*}\n    methods: [GET]\n    permission: projects:read\n"
            "    project_param: pid\n",
            12,
            "names {pid*}, which spans several segments",
        ),
        (
            R + "  - path: /p/{project_id*}\n    methods: [GET]\n    permission: projects:read\n",
            9,
            "{project_id*} spans several segments and cannot name a project",
        ),
        # conflicts
        (
            R + "  - {path: /x, methods: [GET], public: true}\n"
            "  - {path: /y, methods: [GET], public: true}\n"
            "  - {path: /x, methods: [POST, GET], public: true}\n",
            11,
            "route conflicts with the route at line 9 (same shape, overlapping methods)",
        ),
        (
            R + "  - path: /a/{x}\n    methods: [GET]\n    public: true\n"
            "  - path: /a/{y}\n    methods: '*'\n    public: true\n",
            12,
            "route conflicts with the route at line 9",
        ),
    ],
)
def test_rejections(text: str, line: int, fragment: str) -> None:
    found = problems(text)
    located = [p for p in found if p.startswith(f"routes.yaml:{line}: ")]
    assert any(fragment in p for p in located), found


CATALOGUE = PREFIX.replace(
    "version: 1\n",
    "version: 1\npermissions:\n  projects:read: Read\n  workflows:deploy: Deploy\n",
)  # ten lines: routes: is line 11


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (
            CATALOGUE
            + "routes:\n  - path: /x\n    methods: [GET]\n    permission: workflow:deploy\n",
            14,
            "unknown permission 'workflow:deploy' (did you mean 'workflows:deploy'?)",
        ),
        (
            CATALOGUE.replace("[projects:read,", "[projects:raed,") + ROUTE,
            8,
            "role 'dev' pattern 'projects:raed' matches no permission in the permissions catalogue"
            " (did you mean 'projects:read'?)",
        ),
        (
            CATALOGUE.replace('"workflows:*"', '"flows:*"') + ROUTE,
            8,
            "role 'dev' pattern 'flows:*' matches no permission",
        ),
        (
            CATALOGUE.replace("  projects:read: Read\n", "  projects:read: [Read]\n") + ROUTE,
            3,
            "permission 'projects:read' description must be a string",
        ),
        (
            CATALOGUE.replace("  projects:read: Read\n", "  Projects Read: Read\n") + ROUTE,
            3,
            "bad permission name 'Projects Read'",
        ),
        (
            PREFIX.replace("version: 1\n", "version: 1\npermissions: [a]\n") + ROUTE,
            2,
            "permissions (name -> description) must be a mapping",
        ),
    ],
)
def test_catalogue_rejections(text: str, line: int, fragment: str) -> None:
    found = problems(text)
    assert any(p.startswith(f"routes.yaml:{line}: ") and fragment in p for p in found), found


def test_unknown_catalogue_permission_is_reported_once() -> None:
    text = CATALOGUE + "routes:\n  - path: /x\n    methods: [GET]\n    permission: billing:read\n"
    assert problems(text) == ["routes.yaml:14: unknown permission 'billing:read'"]


# ---- tests: section ------------------------------------------------------------------------

T = PREFIX + ROUTE + "tests:\n"  # the next line is 13


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (T + "  runs: []\n", 13, "unknown key 'runs' in tests (allowed: members, cases)"),
        (PREFIX + ROUTE + "tests: []\n", 12, "tests must be a mapping"),
        (T + "  cases: {}\n", 13, "tests cases must be a list"),
        (
            T + "  cases:\n    - {method: GET, path: /x, expect: allow, who: bob}\n",
            14,
            "unknown key 'who' in a test case",
        ),
        (T + "  cases:\n    - {path: /x, expect: allow}\n", 14, "test case is missing 'method'"),
        (T + "  cases:\n    - {method: GET, expect: allow}\n", 14, "test case is missing 'path'"),
        (T + "  cases:\n    - {method: GET, path: /x}\n", 14, "test case is missing 'expect'"),
        (
            T + "  cases:\n    - {method: GET, path: /x, expect: allowed}\n",
            14,
            "expect must be 'allow' or 'deny', not 'allowed'",
        ),
        (
            T + "  cases:\n    - {method: GET, path: /x, expect: deny, reason: missing_perm}\n",
            14,
            "unknown reason 'missing_perm' (did you mean 'missing_permission'?)",
        ),
        (
            T + "  cases:\n    - {method: get, path: /x, expect: deny}\n",
            14,
            "methods are case-sensitive",
        ),
        (
            T + "  cases:\n    - {user: '', method: GET, path: /x, expect: deny}\n",
            14,
            "test case user must not be empty",
        ),
        (T + "  cases:\n    - not a case\n", 14, "a test case must be a mapping"),
        (
            T + "  members:\n    orgs:\n      acme:\n        plan: p\n        members:\n"
            "          alice: owner\n",
            18,
            "test member 'alice' of org 'acme' has role 'owner', which is not defined in roles",
        ),
        (
            T + "  members:\n    orgs:\n      acme:\n        plan: p\n        projects: [p1]\n"
            "        members:\n          bob: {projects: {p1: deve}}\n",
            19,
            "has role 'deve', which is not defined in roles (did you mean 'dev'?)",
        ),
        (
            T + "  members:\n    orgs:\n      acme:\n        plan: p\n        members:\n"
            "          bob: {projects: {p9: dev}}\n",
            18,
            "member 'bob' is bound to project 'p9', which is not listed in org 'acme'",
        ),
        (T + "  members:\n    people: {}\n", 14, "unknown key 'people' in the members file"),
    ],
)
def test_test_section_rejections(text: str, line: int, fragment: str) -> None:
    found = problems(text)
    assert any(p.startswith(f"routes.yaml:{line}: ") and fragment in p for p in found), found


def test_connect_is_allowed_in_test_cases() -> None:
    policy = compile_text(T + "  cases:\n    - {method: CONNECT, path: /x, expect: deny}\n")
    assert policy.test_cases[0].method == "CONNECT"


# ---- several problems at once, YAML errors ---------------------------------------------------


def test_multiple_problems_reported_together_in_line_order() -> None:
    text = (
        "version: 3\n"  # 1
        "roles:\n"
        "  admin: {permissions: ['*']}\n"
        "plans:\n"
        "  '*': {roles: [admin, ghost]}\n"  # 5
        "routes:\n"
        "  - {path: /a/, methods: [GET], public: true}\n"  # 7
        "  - {path: /b, methods: [get], public: true}\n"  # 8
        "  - {path: /c, methods: [GET]}\n"  # 9
        "colour: blue\n"  # 10
    )
    assert problems(text) == [
        "routes.yaml:1: unsupported version 3: only version 1 exists",
        "routes.yaml:5: unknown role 'ghost' in plan '*' (defined: admin)",
        "routes.yaml:7: bad path template '/a/': remove the trailing slash: a single trailing "
        "slash never changes matching",
        "routes.yaml:8: method 'get': methods are case-sensitive, write 'GET'",
        "routes.yaml:9: route needs one of 'permission', 'public: true' or 'authenticated: true'",
        "routes.yaml:10: unknown key 'colour' in the routes file (allowed: version, default, "
        "mode, allow_semicolons, permissions, roles, plans, routes, tests)",
    ]


def test_duplicate_yaml_key() -> None:
    text = PREFIX + ROUTE + "    permission: x:y\n"
    with pytest.raises(PolicyError) as info:
        compile_text(text)
    assert [str(p) for p in info.value.problems] == ["routes.yaml:12: duplicate key 'permission'"]
