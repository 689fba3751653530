"""The authorization rules of SPEC §1–§2 as pure functions over frozen values."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from proxy.policy.model import (
    FORBIDDEN_METHODS,
    Decision,
    Identity,
    Membership,
    Policy,
    Reason,
    Route,
    RouteMatch,
    Target,
)

# Denials that `mode: shadow` turns into "log, count and forward anyway". A malformed target
# (400) and an unreachable store (503) are never shadowed: forwarding them would forward a path
# we could not vet, or fail open on an outage.
_SHADOWABLE = frozenset(
    {
        Reason.NO_ROUTE,
        Reason.MISSING_CREDENTIALS,
        Reason.INVALID_CREDENTIALS,
        Reason.NOT_A_MEMBER,
        Reason.UNKNOWN_PROJECT,
        Reason.PLAN_RESTRICTED,
        Reason.MISSING_PERMISSION,
    }
)


@dataclass(frozen=True, slots=True)
class RoleResolution:
    """The caller's effective role in one organization (or project), after plan gating."""

    membership: Membership
    role: str | None  # None: a member without an org-level role (project bindings only)
    denial: Reason | None  # PLAN_RESTRICTED or MISSING_PERMISSION when the role cannot apply
    message: str = ""


def route_request(
    policy: Policy, method: str, target: Target, upgrade: str | None = None
) -> RouteMatch | Decision:
    """Step 2–3 of the pipeline: the route for this request, or a decision taken without identity.

    `upgrade` is the request's Upgrade header value (None when absent).
    """
    if method in FORBIDDEN_METHODS:
        return Decision(
            Reason.BAD_REQUEST,
            forward=False,
            message=f"method {method} is not allowed through this proxy",
            status_override=405,
        )
    match = policy.matcher.match(method, target.segments)
    if upgrade is not None:
        # Only a WebSocket upgrade, only on a route that allows it: h2c and unknown upgrades
        # smuggle a second protocol past the authorization of the first request.
        route = match.route if match is not None else None
        if upgrade.strip().lower() != "websocket" or route is None or not route.websocket:
            return Decision(
                Reason.BAD_REQUEST,
                forward=False,
                route=route,
                message="protocol upgrade not allowed on this route",
            )
    if match is None:
        if policy.default == "allow":
            # default: allow forwards unmatched requests without identity; the reason still
            # says no route matched, so audit and metrics show what slipped through.
            return Decision(Reason.NO_ROUTE, forward=True, message="no route; default: allow")
        return _shadowed(policy, None, Decision(Reason.NO_ROUTE, forward=False, message="no route"))
    if match.route.public:
        return Decision(Reason.PUBLIC, forward=True, route=match.route)
    return match


def deny_unauthenticated(
    policy: Policy, match: RouteMatch, reason: Reason, message: str
) -> Decision:
    """Step 4 failed: no or invalid credentials (shadow mode may still forward)."""
    route = match.route
    return _shadowed(
        policy,
        route,
        Decision(reason, forward=False, route=route, permission=route.permission, message=message),
    )


def authorize(
    policy: Policy,
    match: RouteMatch,
    identity: Identity,
    memberships: Sequence[Membership],
    project_org: str | None,
    *,
    org_hint_name: str = "X-Org-Id",
) -> Decision:
    """Step 6: decide for an authenticated caller whose memberships are known.

    `project_org` is the owner of the route's project (None: unknown project); it is ignored
    on org routes. `org_hint_name` only names the header or claim in messages.
    """
    route = match.route
    project = match.params.get(route.project_param) if route.project_param else None
    if not memberships:
        message = "not a member of any organization"
        return _verdict(policy, route, Reason.NOT_A_MEMBER, project, None, None, message)

    if project is not None:
        if project_org is None:
            message = f"unknown project {project!r}"
            return _verdict(policy, route, Reason.UNKNOWN_PROJECT, project, None, None, message)
        org = project_org
        if identity.org is not None and identity.org != project_org:
            # The caller named an organization; a project of another one is out of scope even
            # if they happen to be a member there too.
            message = f"project belongs to another organization than {org_hint_name}"
            return _verdict(policy, route, Reason.NOT_A_MEMBER, project, org, None, message)
        membership = _membership_in(memberships, project_org)
        if membership is None:
            message = "not a member of the project's org"
            return _verdict(policy, route, Reason.NOT_A_MEMBER, project, org, None, message)
        resolution = resolve_project_role(policy, membership, project)
    else:
        found = pick_org(memberships, identity.org, org_hint_name)
        if isinstance(found, str):
            return _verdict(policy, route, Reason.NOT_A_MEMBER, None, None, None, found)
        org = found.org
        resolution = resolve_org_role(policy, found)

    role = resolution.role
    if resolution.denial is Reason.PLAN_RESTRICTED:
        message = resolution.message
        return _verdict(policy, route, Reason.PLAN_RESTRICTED, project, org, role, message)
    if route.authenticated and (project is None or resolution.denial is None):
        # authenticated: true needs only an honoured membership of the organization; on a
        # project route that means a role on that project (a binding to another project of
        # the org is not access to this one).
        return _verdict(policy, route, Reason.ALLOWED, project, org, role, "")
    if resolution.denial is not None or role is None:
        message = resolution.message
        return _verdict(policy, route, Reason.MISSING_PERMISSION, project, org, role, message)
    role_def = policy.roles.get(role)
    if role_def is None:
        message = f"role {role!r} is not defined"
        return _verdict(policy, route, Reason.MISSING_PERMISSION, project, org, role, message)
    if route.permission is not None and route.permission in role_def.granted:
        return _verdict(policy, route, Reason.ALLOWED, project, org, role, "")
    message = f"role {role} lacks permission {route.permission}"
    return _verdict(policy, route, Reason.MISSING_PERMISSION, project, org, role, message)


def pick_org(
    memberships: Sequence[Membership], org: str | None, org_hint_name: str = "X-Org-Id"
) -> Membership | str:
    """The membership an org route applies to, or a message saying why there is none."""
    if org is not None:
        found = _membership_in(memberships, org)
        return found if found is not None else f"not a member of organization {org!r}"
    if len(memberships) == 1:
        return memberships[0]
    if not memberships:
        return "not a member of any organization"
    return f"member of several organizations; name one with {org_hint_name}"


def resolve_org_role(policy: Policy, membership: Membership) -> RoleResolution:
    """Org-wide role after plan gating; project bindings give no org-level role."""
    plan = policy.plan(membership.plan)
    if membership.role is not None:
        if plan is None or membership.role not in plan.roles:
            return RoleResolution(
                membership,
                membership.role,
                Reason.PLAN_RESTRICTED,
                f"plan {membership.plan!r} does not include role {membership.role}",
            )
        return RoleResolution(membership, membership.role, None)
    if plan is None or not plan.project_bindings:
        return _no_bindings(membership)
    return RoleResolution(
        membership, None, Reason.MISSING_PERMISSION, "per-project roles grant no org permissions"
    )


def resolve_project_role(policy: Policy, membership: Membership, project: str) -> RoleResolution:
    """Effective role on one project: the org-wide role if any, else the project's binding."""
    if membership.role is not None:
        return resolve_org_role(policy, membership)
    plan = policy.plan(membership.plan)
    if plan is None or not plan.project_bindings:
        return _no_bindings(membership)
    bound = membership.projects.get(project)
    if bound is None:
        return RoleResolution(
            membership, None, Reason.MISSING_PERMISSION, f"no role on project {project!r}"
        )
    if bound not in plan.roles:
        return RoleResolution(
            membership,
            bound,
            Reason.PLAN_RESTRICTED,
            f"plan {membership.plan!r} does not include role {bound}",
        )
    return RoleResolution(membership, bound, None)


def _no_bindings(membership: Membership) -> RoleResolution:
    return RoleResolution(
        membership,
        None,
        Reason.PLAN_RESTRICTED,
        f"plan {membership.plan!r} does not include per-project roles",
    )


def _membership_in(memberships: Sequence[Membership], org: str) -> Membership | None:
    for membership in memberships:
        if membership.org == org:
            return membership
    return None


def _verdict(
    policy: Policy,
    route: Route,
    reason: Reason,
    project: str | None,
    org: str | None,
    role: str | None,
    message: str,
) -> Decision:
    # Built once, not refined with dataclasses.replace(): replace() costs several µs a call
    # and was most of the time of a decision (see docs/benchmarks.md).
    decision = Decision(
        reason,
        forward=reason is Reason.ALLOWED,
        route=route,
        permission=route.permission,
        org=org,
        project=project,
        role=role,
        message=message,
    )
    return decision if decision.forward else _shadowed(policy, route, decision)


def _shadowed(policy: Policy, route: Route | None, decision: Decision) -> Decision:
    mode = route.mode if route is not None and route.mode is not None else policy.mode
    if mode == "shadow" and not decision.forward and decision.reason in _SHADOWABLE:
        return replace(
            decision, reason=Reason.SHADOW_DENY, forward=True, shadow_reason=decision.reason
        )
    return decision
