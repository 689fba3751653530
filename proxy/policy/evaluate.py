"""The whole pipeline without I/O, over in-memory memberships: for `check`, `explain`, tests."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from proxy.policy.canonical import canonicalize
from proxy.policy.decide import authorize, deny_unauthenticated, route_request
from proxy.policy.members import Directory
from proxy.policy.model import (
    BadTarget,
    Decision,
    Identity,
    Membership,
    Policy,
    Reason,
    RouteMatch,
    Target,
    TestCase,
)


class MemberLookup(Protocol):
    """What evaluate() asks: a members Directory, or answers fetched from a store beforehand."""

    def memberships(self, user: str) -> tuple[Membership, ...]: ...

    def project_org(self, project: str) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Store answers fetched ahead of a synchronous evaluate() (explain with a network store)."""

    user: str | None
    found: tuple[Membership, ...]
    owners: dict[str, str | None]

    def memberships(self, user: str) -> tuple[Membership, ...]:
        return self.found if user == self.user else ()

    def project_org(self, project: str) -> str | None:
        return self.owners.get(project)


def project_of(policy: Policy, method: str, raw_target: str) -> str | None:
    """The project id the request concerns (None: bad target, no route or an org route)."""
    try:
        target = canonicalize(raw_target, allow_semicolons=policy.allow_semicolons)
    except BadTarget:
        return None
    routed = route_request(policy, method, target)
    if isinstance(routed, Decision) or routed.route.project_param is None:
        return None
    return routed.params.get(routed.route.project_param)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Everything `explain` shows: the steps of the pipeline and their result."""

    target: Target | None
    match: RouteMatch | None
    memberships: tuple[Membership, ...]
    project_org: str | None
    decision: Decision


def evaluate(
    policy: Policy,
    method: str,
    raw_target: str,
    identity: Identity | None,
    directory: MemberLookup,
    *,
    upgrade: str | None = None,
) -> Evaluation:
    """Canonicalize, match, authenticate (given), resolve from `directory`, decide."""
    try:
        target = canonicalize(raw_target, allow_semicolons=policy.allow_semicolons)
    except BadTarget as exc:
        denied = Decision(Reason.BAD_REQUEST, forward=False, message=exc.message)
        return Evaluation(None, None, (), None, denied)
    routed = route_request(policy, method, target, upgrade)
    if isinstance(routed, Decision):
        return Evaluation(target, None, (), None, routed)
    if identity is None:
        denied = deny_unauthenticated(policy, routed, Reason.MISSING_CREDENTIALS, "no credentials")
        return Evaluation(target, routed, (), None, denied)
    memberships = directory.memberships(identity.user)
    route = routed.route
    project = routed.params.get(route.project_param) if route.project_param else None
    project_org = directory.project_org(project) if project is not None else None
    decision = authorize(policy, routed, identity, memberships, project_org)
    return Evaluation(target, routed, memberships, project_org, decision)


@dataclass(frozen=True, slots=True)
class CaseFailure:
    case: TestCase
    actual: Decision
    source: str

    def __str__(self) -> str:
        c = self.case
        who = c.user if c.user is not None else "anonymous"
        if c.org is not None:
            who += f" (org {c.org})"
        want = c.expect + (f" ({c.reason})" if c.reason is not None else "")
        allowed, reason = enforced_outcome(self.actual)
        got = ("allow" if allowed else "deny") + f" ({reason})"
        detail = f": {self.actual.message}" if self.actual.message else ""
        return (
            f"{self.source}:{c.line}: {c.method} {c.path} as {who}: "
            f"expected {want}, got {got}{detail}"
        )


def enforced_outcome(decision: Decision) -> tuple[bool, Reason]:
    """What the decision would be in enforce mode: policy tests ignore `mode: shadow`."""
    if decision.reason is Reason.SHADOW_DENY and decision.shadow_reason is not None:
        return False, decision.shadow_reason
    return decision.forward, decision.reason


def run_policy_tests(policy: Policy) -> list[CaseFailure]:
    """Run routes.yaml `tests.cases` against `tests.members`; an empty list means all pass."""
    directory = policy.test_members or Directory(MappingProxyType({}))
    failures: list[CaseFailure] = []
    for case in policy.test_cases:
        identity = Identity(case.user, case.org) if case.user is not None else None
        decision = evaluate(policy, case.method, case.path, identity, directory).decision
        allowed, reason = enforced_outcome(decision)
        if allowed != (case.expect == "allow") or (
            case.reason is not None and case.reason is not reason
        ):
            failures.append(CaseFailure(case, decision, policy.source))
    return failures
