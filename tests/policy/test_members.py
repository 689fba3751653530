"""Tests for proxy.policy.members: parsing, indexes and every validation error of members.yaml."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from proxy.policy.members import Directory, OrgRecord, parse_members
from proxy.policy.model import Membership, PolicyError
from proxy.yamlsource import parse_yaml
from tests.fakes import TWO_ORGS_MEMBERS

SHIPPED = TWO_ORGS_MEMBERS + '      bob: admin\n'


def load(text: str) -> Directory:
    return parse_members(parse_yaml(text, "members.yaml"), "members.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load(text)
    return [str(p) for p in info.value.problems]


def test_shipped_shape() -> None:
    directory = load(SHIPPED)
    assert set(directory.orgs) == {"acme", "smallco"}
    acme = directory.orgs["acme"]
    assert isinstance(acme, OrgRecord)
    assert acme.plan == "enterprise"
    assert acme.projects == frozenset({"proj-prod", "proj-staging"})
    assert directory.memberships("alice") == (Membership("acme", "enterprise", "admin"),)
    carol = directory.memberships("carol")
    assert len(carol) == 1
    assert carol[0].role is None
    assert dict(carol[0].projects) == {"proj-staging": "developer"}
    assert isinstance(carol[0].projects, MappingProxyType)
    assert isinstance(directory.orgs, MappingProxyType)
    assert isinstance(acme.members, MappingProxyType)


def test_memberships_sorted_by_org_name() -> None:
    directory = load(SHIPPED.replace("acme", "zeta"))
    assert [m.org for m in directory.memberships("bob")] == ["smallco", "zeta"]
    assert [m.role for m in directory.memberships("bob")] == ["admin", "developer"]


def test_lookups() -> None:
    directory = load(SHIPPED)
    assert directory.memberships("mallory") == ()
    assert directory.project_org("proj-staging") == "acme"
    assert directory.project_org("sc-main") == "smallco"
    assert directory.project_org("nope") is None
    assert directory.users() == frozenset(
        {"alice", "bob", "sue", "carol", "dan", "ed", "gus", "fay"}
    )


def test_directory_built_directly_has_indexes() -> None:
    membership = Membership("o", "pro", "admin")
    record = OrgRecord("o", "pro", frozenset({"p"}), MappingProxyType({"u": membership}))
    directory = Directory(MappingProxyType({"o": record}))
    assert directory.memberships("u") == (membership,)
    assert directory.project_org("p") == "o"
    assert directory.users() == frozenset({"u"})


def test_optional_sections_and_empty_bindings() -> None:
    directory = load(
        "orgs:\n  a:\n    plan: pro\n  b:\n    plan: x\n    members: {u: {projects: {}}}\n"
    )
    assert directory.orgs["a"].members == {}
    assert directory.orgs["a"].projects == frozenset()
    assert directory.memberships("u") == (Membership("b", "x", None),)
    assert load("orgs: {}\n").users() == frozenset()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n", "members.yaml:1: the members file must be a mapping"),
        ("users: {}\n", "members.yaml:1: unknown key 'users' in the members file (allowed: orgs)"),
        ("users: {}\n", "members.yaml:1: missing 'orgs'"),
        ("orgs: [a]\n", "members.yaml:1: 'orgs' must be a mapping"),
        ("orgs:\n  a: pro\n", "members.yaml:2: org 'a' must be a mapping"),
        ("orgs:\n  a:\n    projects: []\n", "members.yaml:2: org 'a' is missing 'plan'"),
        ("orgs:\n  a:\n    plan: 3\n", "members.yaml:3: org 'a' plan must be a string"),
        ("orgs:\n  a:\n    plan: ''\n", "members.yaml:3: org 'a' plan must not be empty"),
        (
            "orgs:\n  a:\n    plan: p\n    owner: x\n",
            "members.yaml:4: unknown key 'owner' in org 'a' (allowed: plan, projects, members)",
        ),
        ("orgs:\n  '':\n    plan: p\n", "members.yaml:2: org name must not be empty"),
        (
            "orgs:\n  a:\n    plan: p\n    projects: p1\n",
            "members.yaml:4: org 'a' projects must be a list",
        ),
        (
            "orgs:\n  a:\n    plan: p\n    projects:\n      - p1\n      - 7\n",
            "members.yaml:6: org 'a' project id must be a string",
        ),
        (
            "orgs:\n  a:\n    plan: p\n    projects:\n      - p1\n      - ''\n",
            "members.yaml:6: org 'a' project id must not be empty",
        ),
        (
            "orgs:\n  a:\n    plan: p\n    projects:\n      - p1\n      - p1\n",
            "members.yaml:6: project 'p1' is listed twice in org 'a'",
        ),
        (
            "orgs:\n  a:\n    plan: p\n    projects: [p1]\n  b:\n    plan: p\n"
            "    projects:\n      - p1\n",
            "members.yaml:8: project 'p1' is already listed under org 'a' (line 4)",
        ),
        (
            "orgs:\n  a:\n    plan: p\n    members: [alice]\n",
            "members.yaml:4: org 'a' members must be a mapping",
        ),
        (
            "orgs:\n  a:\n    plan: p\n    members:\n      alice: 1\n",
            "members.yaml:5: member 'alice' of org 'a' must be a role name",
        ),
        (
            "orgs:\n  a:\n    plan: p\n    members:\n      alice: ''\n",
            "members.yaml:5: role of 'alice' in org 'a' must not be empty",
        ),
        (
            "orgs:\n  a:\n    plan: p\n    members:\n      '': admin\n",
            "members.yaml:5: empty user name in org 'a'",
        ),
        (
            "orgs:\n  a:\n    plan: p\n    members:\n      alice: {role: admin}\n",
            "members.yaml:5: unknown key 'role' in member 'alice' of org 'a' (allowed: projects)",
        ),
        (
            "orgs:\n  a:\n    plan: p\n    members:\n      alice: {role: admin}\n",
            "members.yaml:5: member 'alice' of org 'a' is missing 'projects'",
        ),
        (
            "orgs:\n  a:\n    plan: p\n    members:\n      alice: {projects: [p1]}\n",
            "members.yaml:5: projects of member 'alice' must be a mapping of project -> role",
        ),
        (
            "orgs:\n  a:\n    plan: p\n    projects: [p1]\n    members:\n"
            "      alice:\n        projects:\n          p1: [admin]\n",
            "members.yaml:8: role of 'alice' on project 'p1' must be a string",
        ),
        (
            "orgs:\n  a:\n    plan: p\n    projects: [p1]\n    members:\n"
            "      alice:\n        projects:\n          p2: admin\n",
            "members.yaml:8: member 'alice' is bound to project 'p2', which is not listed in "
            "org 'a' projects",
        ),
    ],
)
def test_rejections(text: str, expected: str) -> None:
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_binding_to_another_orgs_project_is_rejected() -> None:
    text = (
        "orgs:\n  a:\n    plan: p\n    projects: [p1]\n  b:\n    plan: p\n    projects: [p2]\n"
        "    members:\n      bob: {projects: {p1: admin}}\n"
    )
    assert problems(text) == [
        "members.yaml:9: member 'bob' is bound to project 'p1', which is not listed in org 'b' "
        "projects"
    ]


def test_all_problems_reported_together() -> None:
    text = (
        "orgs:\n"
        "  a:\n"
        "    plan: ''\n"  # 3
        "    extra: 1\n"  # 4
        "    members:\n"
        "      x: 5\n"  # 6
        "  b:\n"
        "    members: {y: admin}\n"  # 8: missing plan (blamed on the org key line 7)
    )
    lines = [p.split(":")[1] for p in problems(text)]
    assert lines == ["4", "3", "6", "7"]


def test_duplicate_member_key_is_a_yaml_error() -> None:
    text = "orgs:\n  a:\n    plan: p\n    members:\n      alice: admin\n      alice: support\n"
    with pytest.raises(PolicyError) as info:
        load(text)
    assert str(info.value) == "members.yaml:6: duplicate key 'alice'"
