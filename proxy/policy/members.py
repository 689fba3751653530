"""members.yaml (SPEC §6) as a validated, indexed, frozen directory of orgs and members."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import cast

from proxy.policy.model import Membership, MembershipInterner, PolicyError, Problem
from proxy.policy.source import Node, text_problem

_TOP_KEYS = ("orgs",)
_ORG_KEYS = ("plan", "projects", "members")
_BINDING_KEYS = ("projects",)


@dataclass(frozen=True, slots=True)
class OrgRecord:
    name: str
    plan: str
    projects: frozenset[str]
    members: Mapping[str, Membership]  # user -> that user's membership of this org


@dataclass(frozen=True, slots=True)
class Directory:
    """Every org of a members file, with O(1) user and project indexes built at construction."""

    orgs: Mapping[str, OrgRecord]
    _by_user: Mapping[str, tuple[Membership, ...]] = field(init=False, repr=False, compare=False)
    _by_project: Mapping[str, str] = field(init=False, repr=False, compare=False)
    _users: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_user: dict[str, list[Membership]] = {}
        by_project: dict[str, str] = {}
        for org_name in sorted(self.orgs):
            record = self.orgs[org_name]
            for project in record.projects:
                by_project[project] = org_name
            for user, membership in record.members.items():
                by_user.setdefault(user, []).append(membership)
        # Frozen dataclass: the indexes are derived once here and never change afterwards.
        shared = MembershipInterner(limit=len(by_user) + 1)  # equal tuples become one object
        object.__setattr__(
            self, "_by_user", MappingProxyType({u: shared(tuple(ms)) for u, ms in by_user.items()})
        )
        object.__setattr__(self, "_by_project", MappingProxyType(by_project))
        object.__setattr__(self, "_users", frozenset(by_user))

    def memberships(self, user: str) -> tuple[Membership, ...]:
        """The user's memberships sorted by org name; () when the user is in no org."""
        return self._by_user.get(user, ())

    def project_org(self, project: str) -> str | None:
        """The org that owns `project`, or None for an unknown project."""
        return self._by_project.get(project)

    def users(self) -> frozenset[str]:
        return self._users


def parse_members(root: Node, source: str) -> Directory:
    """Validate a members document; raise PolicyError listing every problem found."""
    parser = _Parser(source)
    directory = parser.directory(root)
    if parser.problems:
        raise PolicyError(parser.problems)
    return directory


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self.project_owner: dict[str, tuple[str, int]] = {}  # project -> (org, line)
        self.shared = MembershipInterner(limit=1 << 62)  # one object per distinct membership

    def problem(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.source, line, message))

    def unknown_keys(self, node: Mapping[str, Node], allowed: tuple[str, ...], where: str) -> None:
        for key, child in node.items():
            if key not in allowed:
                names = ", ".join(allowed)
                self.problem(child.where, f"unknown key {key!r} in {where} (allowed: {names})")

    def text(self, node: Node, what: str) -> str | None:
        """A non-empty string, or None after recording a problem."""
        problem = text_problem(node, what)
        if problem is not None:
            self.problem(node.where, problem)
            return None
        return cast(str, node.value)

    def directory(self, root: Node) -> Directory:
        if not isinstance(root.value, Mapping):
            self.problem(root.line, "the members file must be a mapping with an 'orgs' key")
            return Directory(MappingProxyType({}))
        self.unknown_keys(root.value, _TOP_KEYS, "the members file")
        orgs = root.value.get("orgs")
        if orgs is None:
            self.problem(root.line, "missing 'orgs' (a mapping of org name -> org)")
            return Directory(MappingProxyType({}))
        if not isinstance(orgs.value, Mapping):
            self.problem(orgs.where, "'orgs' must be a mapping of org name -> org")
            return Directory(MappingProxyType({}))
        records: dict[str, OrgRecord] = {}
        for name, node in orgs.value.items():
            record = self.org(name, node)
            if record is not None:
                records[name] = record
        return Directory(MappingProxyType(records))

    def org(self, name: str, node: Node) -> OrgRecord | None:
        if not name.strip():
            self.problem(node.where, "org name must not be empty")
        if not isinstance(node.value, Mapping):
            self.problem(node.where, f"org {name!r} must be a mapping with 'plan' and 'members'")
            return None
        self.unknown_keys(node.value, _ORG_KEYS, f"org {name!r}")
        plan_node = node.value.get("plan")
        plan: str | None = None
        if plan_node is None:
            self.problem(node.where, f"org {name!r} is missing 'plan'")
        else:
            plan = self.text(plan_node, f"org {name!r} plan")
        projects = self.projects(name, node.value.get("projects"))
        members: dict[str, Membership] = {}
        members_node = node.value.get("members")
        if members_node is not None:
            if isinstance(members_node.value, Mapping):
                for user, value in members_node.value.items():
                    membership = self.member(name, plan or "", projects, user, value)
                    if membership is not None:
                        members[user] = membership
            else:
                self.problem(members_node.where, f"org {name!r} members must be a mapping")
        if plan is None:
            return None
        return OrgRecord(name, plan, frozenset(projects), MappingProxyType(members))

    def projects(self, org: str, node: Node | None) -> set[str]:
        found: set[str] = set()
        if node is None:
            return found
        if not isinstance(node.value, tuple):
            self.problem(node.where, f"org {org!r} projects must be a list of project ids")
            return found
        for item in node.value:
            project = self.text(item, f"org {org!r} project id")
            if project is None:
                continue
            owner = self.project_owner.get(project)
            if owner is None:
                self.project_owner[project] = (org, item.line)
                found.add(project)
            elif owner[0] == org:
                self.problem(item.line, f"project {project!r} is listed twice in org {org!r}")
            else:
                found.add(project)  # keeps this org's bindings to it from reporting twice
                # A project id must name exactly one org, or project routes would be ambiguous.
                self.problem(
                    item.line,
                    f"project {project!r} is already listed under org {owner[0]!r} "
                    f"(line {owner[1]}): a project belongs to exactly one org",
                )
        return found

    def member(
        self, org: str, plan: str, projects: set[str], user: str, node: Node
    ) -> Membership | None:
        if not user.strip():
            self.problem(node.where, f"empty user name in org {org!r}")
            return None
        if isinstance(node.value, str):
            role = self.text(node, f"role of {user!r} in org {org!r}")
            return None if role is None else self.shared((Membership(org, plan, role),))[0]
        if not isinstance(node.value, Mapping):
            self.problem(
                node.where,
                f"member {user!r} of org {org!r} must be a role name or "
                "{projects: {project: role}}",
            )
            return None
        self.unknown_keys(node.value, _BINDING_KEYS, f"member {user!r} of org {org!r}")
        bindings_node = node.value.get("projects")
        if bindings_node is None:
            self.problem(node.where, f"member {user!r} of org {org!r} is missing 'projects'")
            return None
        if not isinstance(bindings_node.value, Mapping):
            self.problem(
                bindings_node.where,
                f"projects of member {user!r} must be a mapping of project -> role",
            )
            return None
        bindings: dict[str, str] = {}
        ok = True
        for project, role_node in bindings_node.value.items():
            role = self.text(role_node, f"role of {user!r} on project {project!r}")
            if role is None:
                ok = False
            elif project not in projects:
                ok = False
                self.problem(
                    role_node.where,
                    f"member {user!r} is bound to project {project!r}, "
                    f"which is not listed in org {org!r} projects",
                )
            else:
                bindings[project] = role
        if not ok:
            return None
        return self.shared((Membership(org, plan, None, MappingProxyType(bindings)),))[0]
