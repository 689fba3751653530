"""routes.yaml document → frozen Policy, rejecting every problem with `file:line: message`."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, cast

from proxy.policy.match import AmbiguousRoutes, Matcher, parse_template
from proxy.policy.members import Directory, parse_members
from proxy.policy.model import (
    FORBIDDEN_METHODS,
    Mode,
    PlanDef,
    Policy,
    PolicyError,
    Problem,
    Reason,
    RoleDef,
    Route,
    Segment,
    SegmentKind,
    TestCase,
)
from proxy.policy.source import Node, text_problem

_TOP_KEYS = (
    "version",
    "default",
    "mode",
    "allow_semicolons",
    "permissions",
    "roles",
    "plans",
    "routes",
    "tests",
)
_ROLE_KEYS = ("description", "permissions")
_PLAN_KEYS = ("roles", "project_bindings")
_ROUTE_KEYS = (
    "path",
    "methods",
    "permission",
    "public",
    "authenticated",
    "project_param",
    "websocket",
    "mode",
    "description",
)
_TESTS_KEYS = ("members", "cases")
_CASE_KEYS = ("user", "org", "method", "path", "expect", "reason")

# Role and permission names end up in upstream headers (X-Auth-Role, X-Auth-Permission), logs
# and metrics: a small charset keeps them unambiguous and free of header-injection bytes.
_ROLE_NAME = re.compile(r"[a-z0-9_:.-]+")
_PERMISSION = re.compile(r"[a-z0-9_.-]+(?::[a-z0-9_.-]+)*")
# Methods are case-sensitive tokens (RFC 9110 §9.1); we accept the upper-case ones in use.
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]*")
_DEFAULT_PROJECT_PARAM = "project_id"


def compile_policy(root: Node, source: str) -> Policy:
    """Validate and compile a parsed routes.yaml; raise PolicyError with every problem found."""
    return _Compiler(source).compile(root)


def grants(pattern: str, permission: str) -> bool:
    """Whether one role pattern ("*", "prefix:*" or an exact name) grants `permission`."""
    if pattern == "*":
        return True
    if pattern.endswith(":*"):
        return permission.startswith(pattern[:-1])
    return pattern == permission


@dataclass(frozen=True, slots=True)
class _RoleSpec:
    name: str
    description: str
    patterns: tuple[tuple[str, int], ...]  # (pattern, line)


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(set(candidates)), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Compiler:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []

    # ---- small typed readers: each records a problem and returns None on a bad value --------

    def problem(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.source, line, message))

    def unknown_keys(self, node: Mapping[str, Node], allowed: tuple[str, ...], where: str) -> None:
        for key, child in node.items():
            if key not in allowed:
                hint = _did_you_mean(key, allowed)
                self.problem(
                    child.where,
                    f"unknown key {key!r} in {where}{hint} (allowed: {', '.join(allowed)})",
                )

    def mapping(self, node: Node, what: str) -> Mapping[str, Node] | None:
        if isinstance(node.value, Mapping):
            return node.value
        self.problem(node.where, f"{what} must be a mapping")
        return None

    def sequence(self, node: Node, what: str) -> tuple[Node, ...] | None:
        if isinstance(node.value, tuple):
            return node.value
        self.problem(node.where, f"{what} must be a list")
        return None

    def string(self, node: Node, what: str) -> str | None:
        """A non-empty string, or None after recording a problem."""
        problem = text_problem(node, what)
        if problem is not None:
            self.problem(node.where, problem)
            return None
        return cast(str, node.value)

    def boolean(self, node: Node | None, what: str) -> bool | None:
        if node is None:
            return False
        if isinstance(node.value, bool):
            return node.value
        self.problem(node.where, f"{what} must be true or false")
        return None

    def choice(self, node: Node | None, what: str, choices: tuple[str, ...]) -> str | None:
        if node is None:
            return choices[0]
        if isinstance(node.value, str) and node.value in choices:
            return node.value
        options = " or ".join(repr(c) for c in choices)
        self.problem(node.where, f"{what} must be {options}, not {node.value!r}")
        return None

    # ---- the document ------------------------------------------------------------------------

    def compile(self, root: Node) -> Policy:
        top = root.value
        if not isinstance(top, Mapping):
            raise PolicyError([Problem(self.source, root.line, "routes file must be a mapping")])
        self.unknown_keys(top, _TOP_KEYS, "the routes file")
        self.version(top.get("version"), root)
        default = self.choice(top.get("default"), "default", ("deny", "allow"))
        mode = self.choice(top.get("mode"), "mode", ("enforce", "shadow"))
        allow_semicolons = self.boolean(top.get("allow_semicolons"), "allow_semicolons")
        catalogue = self.catalogue(top.get("permissions"))
        roles = self.roles(self.required(top, "roles", root))
        plans = self.plans(self.required(top, "plans", root), roles)
        routes = self.routes(self.required(top, "routes", root), roles, catalogue)
        matcher = self.matcher(routes)
        required = frozenset(r.permission for r in routes if r.permission is not None)
        role_defs = self.role_defs(roles, required, catalogue)
        test_members, test_cases = self.tests(top.get("tests"), roles)
        if self.problems:
            raise PolicyError(sorted(self.problems, key=lambda p: p.line))
        assert default is not None and mode is not None and allow_semicolons is not None
        assert matcher is not None
        return Policy(
            source=self.source,
            default=cast(Literal["allow", "deny"], default),
            mode=cast(Mode, mode),
            allow_semicolons=allow_semicolons,
            roles=MappingProxyType(role_defs),
            plans=MappingProxyType(plans),
            routes=tuple(routes),
            permissions=required,
            matcher=matcher,
            test_members=test_members,
            test_cases=test_cases,
        )

    def required(self, top: Mapping[str, Node], key: str, root: Node) -> Node | None:
        node = top.get(key)
        if node is None:
            self.problem(root.line, f"missing required key {key!r}")
        return node

    def version(self, node: Node | None, root: Node) -> None:
        if node is None:
            self.problem(root.line, "missing required key 'version' (write 'version: 1')")
        elif type(node.value) is not int or node.value != 1:
            self.problem(node.where, f"unsupported version {node.value!r}: only version 1 exists")

    def catalogue(self, node: Node | None) -> dict[str, int] | None:
        """The optional `permissions:` catalogue: name -> line."""
        if node is None:
            return None
        entries = self.mapping(node, "permissions (name -> description)")
        if entries is None:
            return None
        found: dict[str, int] = {}
        for name, desc in entries.items():
            if not _PERMISSION.fullmatch(name):
                self.problem(desc.where, f"bad permission name {name!r} (use e.g. 'billing:read')")
                continue
            if not isinstance(desc.value, str):
                self.problem(desc.where, f"permission {name!r} description must be a string")
            found[name] = desc.where
        return found

    # ---- roles and plans ---------------------------------------------------------------------

    def roles(self, node: Node | None) -> dict[str, _RoleSpec] | None:
        """Role specs by name; None when the section is unusable (dependent checks are skipped)."""
        if node is None:
            return None
        entries = self.mapping(node, "roles (role name -> {description, permissions})")
        if entries is None:
            return None
        if not entries:
            self.problem(node.where, "roles must define at least one role")
            return None
        roles: dict[str, _RoleSpec] = {}
        for name, role_node in entries.items():
            if not _ROLE_NAME.fullmatch(name):
                self.problem(
                    role_node.where,
                    f"bad role name {name!r} (use lower-case letters, digits and _-.:)",
                )
            body = self.mapping(role_node, f"role {name!r}")
            if body is None:
                continue
            self.unknown_keys(body, _ROLE_KEYS, f"role {name!r}")
            description = name
            if "description" in body:
                description = self.string(body["description"], f"role {name!r} description") or name
            patterns: list[tuple[str, int]] = []
            perms_node = body.get("permissions")
            if perms_node is None:
                self.problem(role_node.where, f"role {name!r} is missing 'permissions' (a list)")
            else:
                for item in self.sequence(perms_node, f"role {name!r} permissions") or ():
                    pattern = self.pattern(item, name)
                    if pattern is not None:
                        patterns.append((pattern, item.line))
            roles[name] = _RoleSpec(name, description, tuple(patterns))
        return roles

    def pattern(self, node: Node, role: str) -> str | None:
        text = self.string(node, f"role {role!r} permission")
        if text is None:
            return None
        body = text[:-2] if text.endswith(":*") else text
        if text == "*" or _PERMISSION.fullmatch(body):
            return text
        self.problem(
            node.line,
            f"bad permission pattern {text!r} in role {role!r} "
            "(use a name like 'billing:read', 'prefix:*' or '*')",
        )
        return None

    def plans(self, node: Node | None, roles: dict[str, _RoleSpec] | None) -> dict[str, PlanDef]:
        plans: dict[str, PlanDef] = {}
        if node is None:
            return plans
        entries = self.mapping(node, "plans (plan name -> {roles, project_bindings})")
        if entries is None:
            return plans
        if not entries:
            self.problem(node.where, 'plans must define at least one plan ("*" for every plan)')
        for name, plan_node in entries.items():
            if not name.strip():
                self.problem(plan_node.where, "plan name must not be empty")
            body = self.mapping(plan_node, f"plan {name!r}")
            if body is None:
                continue
            self.unknown_keys(body, _PLAN_KEYS, f"plan {name!r}")
            role_names: set[str] = set()
            roles_node = body.get("roles")
            if roles_node is None:
                self.problem(plan_node.where, f"plan {name!r} is missing 'roles' (a list)")
            else:
                items = self.sequence(roles_node, f"plan {name!r} roles")
                if items == ():
                    self.problem(roles_node.where, f"plan {name!r} has no roles")
                for item in items or ():
                    role = self.string(item, f"plan {name!r} role")
                    if role is None:
                        continue
                    if roles is not None and role not in roles:
                        self.problem(
                            item.line,
                            f"unknown role {role!r} in plan {name!r}"
                            f"{_did_you_mean(role, roles)} (defined: {', '.join(roles)})",
                        )
                    role_names.add(role)
            bindings = self.boolean(body.get("project_bindings"), f"plan {name!r} project_bindings")
            plans[name] = PlanDef(name, frozenset(role_names), bool(bindings))
        return plans

    def role_defs(
        self,
        roles: dict[str, _RoleSpec] | None,
        required: frozenset[str],
        catalogue: dict[str, int] | None,
    ) -> dict[str, RoleDef]:
        if roles is None:
            return {}
        universe = required | frozenset(catalogue or ())
        defs: dict[str, RoleDef] = {}
        for spec in roles.values():
            if catalogue is not None:
                for pattern, line in spec.patterns:
                    if not any(grants(pattern, p) for p in catalogue):
                        hint = "" if pattern.endswith("*") else _did_you_mean(pattern, catalogue)
                        self.problem(
                            line,
                            f"role {spec.name!r} pattern {pattern!r} matches no permission "
                            f"in the permissions catalogue{hint}",
                        )
            granted = frozenset(
                p for p in universe if any(grants(pattern, p) for pattern, _ in spec.patterns)
            )
            defs[spec.name] = RoleDef(
                spec.name, spec.description, tuple(p for p, _ in spec.patterns), granted
            )
        return defs

    # ---- routes ------------------------------------------------------------------------------

    def routes(
        self,
        node: Node | None,
        roles: dict[str, _RoleSpec] | None,
        catalogue: dict[str, int] | None,
    ) -> list[Route]:
        routes: list[Route] = []
        if node is None:
            return routes
        for item in self.sequence(node, "routes") or ():
            route = self.route(item, roles, catalogue)
            if route is not None:
                routes.append(route)
        return routes

    def route(
        self,
        node: Node,
        roles: dict[str, _RoleSpec] | None,
        catalogue: dict[str, int] | None,
    ) -> Route | None:
        body = self.mapping(node, "a route")
        if body is None:
            return None
        start = len(self.problems)
        self.unknown_keys(body, _ROUTE_KEYS, "a route")
        template, segments = self.template(body.get("path"), node)
        methods = self.methods(body.get("methods"), node)
        permission = self.permission(body, node, roles, catalogue)
        public = self.boolean(body.get("public"), "public")
        authenticated = self.boolean(body.get("authenticated"), "authenticated")
        websocket = self.boolean(body.get("websocket"), "websocket")
        mode = None
        if "mode" in body:
            mode = self.choice(body["mode"], "route mode", ("enforce", "shadow"))
        if "description" in body:
            self.string(body["description"], "route description")
        chosen = [
            name
            for name, on in (
                ("permission", "permission" in body),
                ("public: true", public is True),
                ("authenticated: true", authenticated is True),
            )
            if on
        ]
        if not chosen:
            self.problem(
                node.line,
                "route needs one of 'permission', 'public: true' or 'authenticated: true'",
            )
        elif len(chosen) > 1:
            self.problem(node.line, f"route sets {' and '.join(chosen)}: choose exactly one")
        project_param = None
        if segments is not None:
            project_param = self.project_param(
                body.get("project_param"), segments, body["path"].where
            )
        if len(self.problems) > start or template is None or segments is None:
            return None
        return Route(
            template=template,
            segments=segments,
            methods=methods,
            permission=permission,
            public=bool(public),
            authenticated=bool(authenticated),
            project_param=project_param,
            websocket=bool(websocket),
            mode=cast(Mode | None, mode),
            line=node.line,
        )

    def template(
        self, node: Node | None, route: Node
    ) -> tuple[str | None, tuple[Segment, ...] | None]:
        if node is None:
            self.problem(route.line, "route is missing 'path'")
            return None, None
        text = self.string(node, "path")
        if text is None:
            return None, None
        try:
            return text, parse_template(text)
        except ValueError as exc:
            self.problem(node.where, f"bad path template {text!r}: {exc}")
            return None, None

    def methods(self, node: Node | None, route: Node) -> frozenset[str] | None:
        if node is None:
            self.problem(route.line, "route is missing 'methods' (a list like [GET], or \"*\")")
            return None
        if node.value == "*":
            return None
        if not isinstance(node.value, tuple) or not node.value:
            self.problem(node.where, 'methods must be a non-empty list like [GET, POST], or "*"')
            return None
        found: set[str] = set()
        for item in node.value:
            method = self.method(item, "method")
            if method is None:
                continue
            if method in FORBIDDEN_METHODS:
                # RFC 9110 §9.3.6 (tunnels) and §9.3.8 (cross-site tracing): always answered 405.
                self.problem(item.line, f"{method} is never proxied (answered 405): remove it")
            elif method in found:
                self.problem(item.line, f"method {method} is listed twice")
            found.add(method)
        return frozenset(found)

    def method(self, node: Node, what: str) -> str | None:
        text = self.string(node, what)
        if text is None:
            return None
        if text == "*":
            self.problem(node.line, 'write methods: "*" (a string, not a list) for any method')
            return None
        if _METHOD.fullmatch(text):
            return text
        if _METHOD.fullmatch(text.upper()):
            self.problem(
                node.line, f"{what} {text!r}: methods are case-sensitive, write {text.upper()!r}"
            )
        else:
            self.problem(node.line, f"{what} {text!r} is not an HTTP method token")
        return None

    def permission(
        self,
        body: Mapping[str, Node],
        route: Node,
        roles: dict[str, _RoleSpec] | None,
        catalogue: dict[str, int] | None,
    ) -> str | None:
        node = body.get("permission")
        if node is None:
            return None
        name = self.string(node, "permission")
        if name is None:
            return None
        if not _PERMISSION.fullmatch(name):
            self.problem(node.where, f"bad permission name {name!r} (use e.g. 'billing:read')")
            return None
        if catalogue is not None and name not in catalogue:
            self.problem(node.where, f"unknown permission {name!r}{_did_you_mean(name, catalogue)}")
            return None
        if roles is not None and not any(
            grants(pattern, name) for spec in roles.values() for pattern, _ in spec.patterns
        ):
            exact = (p for spec in roles.values() for p, _ in spec.patterns if "*" not in p)
            self.problem(
                node.where,
                f"permission {name!r} is granted by no role (likely a typo)"
                f"{_did_you_mean(name, exact)}",
            )
        return name

    def project_param(
        self, node: Node | None, segments: tuple[Segment, ...], path_line: int
    ) -> str | None:
        params = {s.value: s.kind for s in segments if s.kind is not SegmentKind.LITERAL}
        if node is None:
            kind = params.get(_DEFAULT_PROJECT_PARAM)
            if kind is SegmentKind.REST:
                # Silently treating it as an org route would drop the project scoping the author
                # most likely meant; make them say what they mean.
                self.problem(
                    path_line,
                    f"{{{_DEFAULT_PROJECT_PARAM}*}} spans several segments and cannot name a "
                    f"project: use {{{_DEFAULT_PROJECT_PARAM}}} or another parameter name",
                )
            return _DEFAULT_PROJECT_PARAM if kind is SegmentKind.PARAM else None
        name = self.string(node, "project_param")
        if name is None:
            return None
        kind = params.get(name)
        if kind is SegmentKind.PARAM:
            return name
        if kind is SegmentKind.REST:
            self.problem(
                node.where,
                f"project_param {name!r} names {{{name}*}}, which spans several segments: "
                "a project id is exactly one segment",
            )
        else:
            names = ", ".join(f"{{{p}}}" for p in params) or "none"
            self.problem(
                node.where,
                f"project_param {name!r} is not a parameter of the path (parameters: {names})",
            )
        return None

    def matcher(self, routes: list[Route]) -> Matcher | None:
        try:
            return Matcher(routes)
        except AmbiguousRoutes as exc:
            for first, second in exc.pairs:
                self.problem(
                    second.line,
                    f"route conflicts with the route at line {first.line} "
                    "(same shape, overlapping methods)",
                )
            return None

    # ---- tests -------------------------------------------------------------------------------

    def tests(
        self, node: Node | None, roles: dict[str, _RoleSpec] | None
    ) -> tuple[Directory | None, tuple[TestCase, ...]]:
        if node is None:
            return None, ()
        body = self.mapping(node, "tests")
        if body is None:
            return None, ()
        self.unknown_keys(body, _TESTS_KEYS, "tests")
        members: Directory | None = None
        members_node = body.get("members")
        if members_node is not None:
            try:
                members = parse_members(members_node, self.source)
            except PolicyError as exc:
                self.problems.extend(exc.problems)
            else:
                if roles is not None:
                    self.member_roles(members_node, roles)
        cases: list[TestCase] = []
        cases_node = body.get("cases")
        if cases_node is not None:
            for item in self.sequence(cases_node, "tests cases") or ():
                case = self.case(item)
                if case is not None:
                    cases.append(case)
        return members, tuple(cases)

    def member_roles(self, node: Node, roles: dict[str, _RoleSpec]) -> None:
        """Every role in the (already validated) test members must be defined in `roles`."""
        orgs = cast(Mapping[str, Node], cast(Mapping[str, Node], node.value)["orgs"].value)
        for org, org_node in orgs.items():
            members = cast(Mapping[str, Node], org_node.value).get("members")
            if members is None:
                continue
            for user, value in cast(Mapping[str, Node], members.value).items():
                if isinstance(value.value, str):
                    bound = [(value.value, value)]
                else:
                    projects = cast(Mapping[str, Node], value.value)["projects"]
                    bound = [
                        (cast(str, role.value), role)
                        for role in cast(Mapping[str, Node], projects.value).values()
                    ]
                for role, role_node in bound:
                    if role not in roles:
                        self.problem(
                            role_node.where,
                            f"test member {user!r} of org {org!r} has role {role!r}, which is "
                            f"not defined in roles{_did_you_mean(role, roles)}",
                        )

    def case(self, node: Node) -> TestCase | None:
        body = self.mapping(node, "a test case")
        if body is None:
            return None
        start = len(self.problems)
        self.unknown_keys(body, _CASE_KEYS, "a test case")
        values: dict[str, str | None] = {}
        for key in ("method", "path", "expect"):
            if key not in body:
                self.problem(node.line, f"test case is missing {key!r}")
        for key in ("user", "org", "path"):
            values[key] = self.string(body[key], f"test case {key}") if key in body else None
        method = self.method(body["method"], "test case method") if "method" in body else None
        expect = None
        if "expect" in body:
            expect = self.choice(body["expect"], "expect", ("allow", "deny"))
        reason: Reason | None = None
        if "reason" in body:
            reason_node = body["reason"]
            known = [r.value for r in Reason]
            if isinstance(reason_node.value, str) and reason_node.value in known:
                reason = Reason(reason_node.value)
            else:
                self.problem(
                    reason_node.where,
                    f"unknown reason {reason_node.value!r}"
                    f"{_did_you_mean(str(reason_node.value), known)}",
                )
        if len(self.problems) > start:
            return None
        assert method is not None and expect is not None and values["path"] is not None
        return TestCase(
            user=values["user"],
            method=method,
            path=values["path"],
            expect=cast(Literal["allow", "deny"], expect),
            reason=reason,
            org=values["org"],
            line=node.line,
        )
