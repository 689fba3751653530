"""Frozen value types shared by the pure policy core: routes, policy, memberships, decisions."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from proxy.policy.match import Matcher
    from proxy.policy.members import Directory

# Methods that a reverse proxy must never serve (RFC 9110 §9.3.6 CONNECT tunnels,
# §9.3.8 TRACE echoes credentials back: cross-site tracing).
FORBIDDEN_METHODS = frozenset({"CONNECT", "TRACE"})


class Reason(enum.StrEnum):
    """Every outcome of the pipeline has exactly one stable reason (SPEC §2)."""

    ALLOWED = "allowed"
    PUBLIC = "public"
    SHADOW_DENY = "shadow_deny"
    BAD_REQUEST = "bad_request"
    NO_ROUTE = "no_route"
    MISSING_CREDENTIALS = "missing_credentials"
    INVALID_CREDENTIALS = "invalid_credentials"
    NOT_A_MEMBER = "not_a_member"
    UNKNOWN_PROJECT = "unknown_project"
    PLAN_RESTRICTED = "plan_restricted"
    MISSING_PERMISSION = "missing_permission"
    STORE_UNAVAILABLE = "store_unavailable"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"


# The one table from reason to the status the proxy itself answers with. Allowed,
# public and shadow_deny are forwarded: their status is the upstream's.
STATUS: Mapping[Reason, int] = MappingProxyType(
    {
        Reason.ALLOWED: 200,
        Reason.PUBLIC: 200,
        Reason.SHADOW_DENY: 200,
        Reason.BAD_REQUEST: 400,
        Reason.NO_ROUTE: 403,
        Reason.MISSING_CREDENTIALS: 401,
        Reason.INVALID_CREDENTIALS: 401,
        Reason.NOT_A_MEMBER: 403,
        Reason.UNKNOWN_PROJECT: 403,
        Reason.PLAN_RESTRICTED: 403,
        Reason.MISSING_PERMISSION: 403,
        Reason.STORE_UNAVAILABLE: 503,
        Reason.UPSTREAM_UNAVAILABLE: 502,
        Reason.UPSTREAM_TIMEOUT: 504,
    }
)

# Short error word for the JSON body's "error" field, by status.
ERROR_WORD: Mapping[int, str] = MappingProxyType(
    {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        405: "method_not_allowed",
        408: "request_timeout",
        414: "uri_too_long",
        431: "request_header_fields_too_large",
        500: "internal_error",
        501: "not_implemented",
        502: "bad_gateway",
        503: "service_unavailable",
        504: "gateway_timeout",
    }
)

Mode = Literal["enforce", "shadow"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One configuration error, located in its file."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class PolicyError(Exception):
    """A routes or members file that cannot be used; carries every problem found."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class BadTarget(Exception):
    """The request target is unsafe or ambiguous (SPEC §4); answered with 400."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class SegmentKind(enum.IntEnum):
    """Kinds of template segments, ordered from most to least specific."""

    LITERAL = 0
    PARAM = 1
    REST = 2


@dataclass(frozen=True, slots=True)
class Segment:
    kind: SegmentKind
    value: str  # the literal text, or the parameter name


@dataclass(frozen=True, slots=True)
class Route:
    """One compiled entry of routes.yaml."""

    template: str  # as written, e.g. /api/projects/{project_id}; used as the metric label
    segments: tuple[Segment, ...]
    methods: frozenset[str] | None  # None means every method ("*")
    permission: str | None  # None for public and authenticated routes
    public: bool = False
    authenticated: bool = False
    project_param: str | None = None  # set when the template holds the project parameter
    websocket: bool = False
    mode: Mode | None = None  # None: follow the policy's global mode
    line: int = 0  # line in routes.yaml, for messages

    def allows_method(self, method: str) -> bool:
        return self.methods is None or method in self.methods


@dataclass(frozen=True, slots=True)
class RoleDef:
    name: str
    description: str
    patterns: tuple[str, ...]  # as written: "*", "workflows:*", "projects:read"
    granted: frozenset[str]  # the concrete permissions of the policy that this role grants


@dataclass(frozen=True, slots=True)
class PlanDef:
    name: str  # "*" is the fallback for every plan not listed
    roles: frozenset[str]
    project_bindings: bool


@dataclass(frozen=True, slots=True)
class Membership:
    """A user's membership of one organization, as the role store answers it."""

    org: str
    plan: str
    role: str | None  # org-wide role, or None for "Set by Project"
    projects: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    org: str | None = None  # org named by the X-Org-Id header or the token's org claim


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: Route
    params: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Target:
    """A canonical request target: what the proxy authorizes is exactly what it forwards."""

    path: str  # canonical, re-encoded path to forward (starts with "/")
    segments: tuple[str, ...]  # decoded, non-empty segments used for matching
    query: str  # the original raw query string without "?", "" when absent


@dataclass(frozen=True, slots=True)
class Decision:
    reason: Reason
    forward: bool  # True for allowed, public and shadow_deny
    route: Route | None = None
    permission: str | None = None
    org: str | None = None
    project: str | None = None
    role: str | None = None  # effective role used for the decision
    message: str = ""  # human explanation, safe to return to the client
    shadow_reason: Reason | None = None  # the real denial when reason is shadow_deny
    status_override: int | None = None  # 405/408/414/431/501, all with reason bad_request

    @property
    def status(self) -> int:
        return self.status_override or STATUS[self.reason]


@dataclass(frozen=True, slots=True)
class TestCase:
    """One entry of routes.yaml `tests.cases`."""

    __test__ = False  # not a pytest test class, despite the name

    user: str | None
    method: str
    path: str
    expect: Literal["allow", "deny"]
    reason: Reason | None
    org: str | None
    line: int


@dataclass(frozen=True, slots=True)
class Policy:
    """A whole compiled routes.yaml. Swapped atomically on reload; never mutated."""

    source: str  # file name, for messages
    default: Literal["allow", "deny"]
    mode: Mode
    allow_semicolons: bool
    roles: Mapping[str, RoleDef]
    plans: Mapping[str, PlanDef]
    routes: tuple[Route, ...]
    permissions: frozenset[str]  # every permission some route requires
    matcher: Matcher
    test_members: Directory | None = None
    test_cases: tuple[TestCase, ...] = ()

    def plan(self, name: str) -> PlanDef | None:
        found = self.plans.get(name)
        return found if found is not None else self.plans.get("*")


class MembershipInterner:
    """Shares one object per distinct membership (and per distinct tuple of them).

    100,000 users of one org with the same role would otherwise hold 100,000 equal objects;
    interned they hold one, which keeps a full role cache small. Bounded: the table is
    cleared when it grows past `limit` distinct values (objects already shared stay valid).
    """

    def __init__(self, limit: int = 50_000) -> None:
        self._limit = limit
        self._seen: dict[object, object] = {}

    def __call__(self, memberships: tuple[Membership, ...]) -> tuple[Membership, ...]:
        if len(self._seen) > self._limit:
            self._seen.clear()
        shared = tuple(self._one(m) for m in memberships)
        key = ("tuple", *(id(m) for m in shared))
        found = self._seen.get(key)
        if found is None:
            # The key holds ids: keep the members alive through the stored tuple itself.
            self._seen[key] = found = shared
        return found  # type: ignore[return-value]

    def _one(self, m: Membership) -> Membership:
        key = (m.org, m.plan, m.role, tuple(sorted(m.projects.items())))
        found = self._seen.get(key)
        if found is None:
            self._seen[key] = found = m
        return found  # type: ignore[return-value]
