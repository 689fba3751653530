"""One suite over every role store backend: each answers the shipped members.yaml identically."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from proxy.policy.members import Directory, parse_members
from proxy.policy.model import Membership
from proxy.stores.base import RoleStore
from proxy.stores.file import FileStore
from proxy.stores.http import HttpStore
from proxy.stores.postgres import PostgresStore
from proxy.yamlsource import parse_yaml
from tests.stores.pg import fresh_database, load_members

ROOT = Path(__file__).resolve().parents[2]
MEMBERS = str(ROOT / "members.yaml")

# Ids no file user has; the odd spellings also check that no backend normalizes or
# splits an id on its way (path segments, case folding, SQL wildcards).
UNKNOWN_USERS = ("nobody", "ALICE", "alice ", "../alice", "alice/..", "a/b", "%", "_", "'")
UNKNOWN_PROJECTS = ("no-such-project", "PROJ-PROD", "proj-%", "../proj-prod", "'")

Normalized = tuple[str, str, str | None, tuple[tuple[str, str], ...]]


def load_directory() -> Directory:
    return parse_members(parse_yaml(Path(MEMBERS).read_text("utf-8"), MEMBERS), MEMBERS)


DIRECTORY = load_directory()
USERS = sorted(DIRECTORY.users())
PROJECTS = sorted(p for org in DIRECTORY.orgs.values() for p in org.projects)


def normalize(memberships: tuple[Membership, ...]) -> set[Normalized]:
    """Memberships as hashable values (Membership.projects is a mapping, so unhashable)."""
    found = {(m.org, m.plan, m.role, tuple(sorted(m.projects.items()))) for m in memberships}
    assert len(found) == len(memberships), "a backend answered the same membership twice"
    return found


def spec_http_app(directory: Directory) -> web.Application:
    """The SPEC §6 HTTP role service, answering from a parsed members file."""

    async def member(request: web.Request) -> web.Response:
        user = request.match_info["user"]
        found = directory.memberships(user)
        if not found:
            return web.json_response({"error": "not found"}, status=404)
        body = {
            "user": user,
            "memberships": [
                {"org": m.org, "plan": m.plan, "role": m.role, "projects": dict(m.projects)}
                for m in found
            ],
        }
        return web.json_response(body)

    async def project(request: web.Request) -> web.Response:
        name = request.match_info["project"]
        org = directory.project_org(name)
        if org is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response({"project": name, "org": org})

    app = web.Application()
    app.router.add_get("/members/{user}", member)
    app.router.add_get("/projects/{project}", project)
    return app


@pytest.fixture(params=["file", "http", "postgresql"])
async def store(
    request: pytest.FixtureRequest, aiohttp_server: AiohttpServer
) -> AsyncIterator[RoleStore]:
    async with contextlib.AsyncExitStack() as stack:
        backend: RoleStore
        if request.param == "file":
            backend = FileStore(MEMBERS)
        elif request.param == "http":
            server = await aiohttp_server(spec_http_app(load_directory()))
            backend = HttpStore(str(server.make_url("/")), timeout=2.0)
        else:
            # A throwaway database loaded from the same file (schema.sql + import).
            dsn = await stack.enter_async_context(fresh_database())
            await load_members(dsn, MEMBERS)
            backend = PostgresStore(dsn, timeout=2.0)
        assert backend.backend == request.param
        await backend.open()
        stack.push_async_callback(backend.close)
        await backend.ping()
        yield backend


@pytest.fixture
def reference() -> FileStore:
    return FileStore(MEMBERS)


async def test_every_user_has_the_file_stores_memberships(
    store: RoleStore, reference: FileStore
) -> None:
    assert len(USERS) >= 8  # the shipped file: a vacuous loop would prove nothing
    for user in USERS:
        expected = normalize(await reference.memberships(user))
        assert expected, user
        assert normalize(await store.memberships(user)) == expected, user


async def test_unknown_users_have_no_memberships(store: RoleStore) -> None:
    for user in UNKNOWN_USERS:
        assert await store.memberships(user) == (), user


async def test_every_project_has_the_file_stores_org(
    store: RoleStore, reference: FileStore
) -> None:
    assert len(PROJECTS) >= 3
    for project in PROJECTS:
        expected = await reference.project_org(project)
        assert expected is not None
        assert await store.project_org(project) == expected, project


async def test_unknown_projects_have_no_org(store: RoleStore) -> None:
    for project in UNKNOWN_PROJECTS:
        assert await store.project_org(project) is None, project


async def test_memberships_are_sorted_by_org(store: RoleStore) -> None:
    for user in USERS:
        orgs = [m.org for m in await store.memberships(user)]
        assert orgs == sorted(orgs), user


async def test_per_project_bindings_and_null_roles_survive(store: RoleStore) -> None:
    (carol,) = await store.memberships("carol")
    assert carol.role is None
    assert dict(carol.projects) == {"proj-staging": "developer"}
    (fay,) = await store.memberships("fay")
    assert (fay.org, fay.plan, fay.role) == ("smallco", "pro", "support")
