"""PostgresStore, schema.sql and `store init/import` against a real PostgreSQL server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.policy.model import Membership
from proxy.stores.base import PushesInvalidations, StoreError
from proxy.stores.cli import add_parser, run
from proxy.stores.file import FileStore
from proxy.stores.postgres import LISTEN_APPLICATION_NAME, PostgresStore
from tests.stores.pg import connect, fresh_database, load_members, server_dsn, with_database

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_MEMBERS = str(ROOT / "members.yaml")
TABLES = ("orgs", "projects", "members", "project_members")

# Waits below are upper bounds on something that must happen, never speed assertions.
EVENTUALLY = 10.0


class Invalidations:
    """Records on_invalidate calls; lets a test wait until one arrives."""

    def __init__(self) -> None:
        self.calls: list[str | None] = []
        self._changed = asyncio.Event()

    def __call__(self, user: str | None) -> None:
        self.calls.append(user)
        self._changed.set()

    async def wait_until(self, predicate: Callable[[list[str | None]], bool]) -> None:
        async with asyncio.timeout(EVENTUALLY):
            while not predicate(self.calls):
                self._changed.clear()
                await self._changed.wait()

    async def wait_for(self, user: str | None, *, after: int = 0) -> None:
        """Until `user` (None = everything) is among the calls made after the first `after`."""
        await self.wait_until(lambda calls: user in calls[after:])


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with fresh_database() as dsn:
        yield dsn


@pytest.fixture
async def loaded(database: str) -> str:
    """A fresh database with schema.sql and the shipped members.yaml."""
    await load_members(database, SHIPPED_MEMBERS)
    return database


@contextlib.asynccontextmanager
async def opened(dsn: str, **kwargs: Any) -> AsyncIterator[tuple[PostgresStore, Invalidations]]:
    store = PostgresStore(dsn, **kwargs)
    seen = Invalidations()
    store.on_invalidate = seen
    await store.open()
    try:
        yield store, seen
    finally:
        await store.close()


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rbac-proxy")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["store", *argv])


async def run_cli(*argv: str) -> int:
    # run() owns its event loop (asyncio.run), as in `rbac-proxy store ...`: give it a thread.
    return await asyncio.to_thread(run, cli(*argv))


async def snapshot(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    conn = await connect(dsn)
    try:
        return {
            table: [tuple(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY 1, 2")]  # noqa: S608
            for table in TABLES
        }
    finally:
        await conn.close()


async def execute(dsn: str, *statements: str) -> None:
    conn = await connect(dsn)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- schema and `store init` -----------------------------------------------------------------


async def test_store_init_is_idempotent(database: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli("init", "--store", database) == 0
    await execute(database, "INSERT INTO orgs VALUES ('keep', 'pro')")
    assert await run_cli("init", "--store", database) == 0  # again: no error, data kept
    assert "schema applied to" in capsys.readouterr().out
    conn = await connect(database)
    try:
        for table in (*TABLES, "roles"):
            assert await conn.fetchval("SELECT to_regclass($1)::text", table) == table
        roles = {r["name"] for r in await conn.fetch("SELECT name FROM roles")}
        assert roles == {"admin", "developer", "support"}
        triggers = await conn.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE '%notify%' AND NOT tgisinternal"
        )
        assert triggers == 6  # not duplicated by the second run
        assert await conn.fetchval("SELECT plan FROM orgs WHERE id = 'keep'") == "pro"
    finally:
        await conn.close()


async def test_schema_rejects_invalid_rows(loaded: str) -> None:
    conn = await connect(loaded)
    try:
        rejected = [
            # A role that is not in table roles (a typo) ...
            (
                "INSERT INTO members VALUES ('acme', 'zed', 'develper')",
                asyncpg.ForeignKeyViolationError,
            ),
            (
                "UPDATE members SET role = 'owner' WHERE user_id = 'bob'",
                asyncpg.ForeignKeyViolationError,
            ),
            (
                "INSERT INTO project_members VALUES ('acme', 'carol', 'proj-prod', 'root')",
                asyncpg.ForeignKeyViolationError,
            ),
            # ... or not even role syntax,
            ("INSERT INTO roles (name) VALUES ('Org Admin')", asyncpg.CheckViolationError),
            # a binding to another org's project, or by a non-member,
            (
                "INSERT INTO project_members VALUES ('smallco', 'gus', 'proj-prod', 'developer')",
                asyncpg.ForeignKeyViolationError,
            ),
            (
                "INSERT INTO project_members VALUES ('acme', 'nobody', 'proj-prod', 'support')",
                asyncpg.ForeignKeyViolationError,
            ),
            # blank ids and plans, and a project without an org.
            ("INSERT INTO members VALUES ('acme', '  ', 'admin')", asyncpg.CheckViolationError),
            ("INSERT INTO orgs VALUES ('newco', '')", asyncpg.CheckViolationError),
            ("INSERT INTO projects VALUES ('p9', 'no-such-org')", asyncpg.ForeignKeyViolationError),
        ]
        for sql, error in rejected:
            with pytest.raises(error):
                await conn.execute(sql)
        # Roles are configuration: one routes.yaml defines is added once, then it is storable.
        await conn.execute("INSERT INTO roles (name) VALUES ('billing')")
        await conn.execute("INSERT INTO members VALUES ('acme', 'zed', 'billing')")
    finally:
        await conn.close()


# ---- `store import` --------------------------------------------------------------------------


async def test_import_shipped_members(database: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli("init", "--store", database) == 0
    assert await run_cli("import", SHIPPED_MEMBERS, "--store", database) == 0
    out = capsys.readouterr().out
    assert "2 orgs, 3 projects, 8 members, 2 project bindings" in out
    tables = await snapshot(database)
    assert tables["orgs"] == [("acme", "enterprise"), ("smallco", "pro")]
    assert ("acme", "carol", "proj-staging", "developer") in tables["project_members"]
    assert ("acme", "carol", None) in tables["members"]
    assert len(tables["members"]) == 8


async def test_import_replaces_the_previous_content(
    loaded: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = tmp_path / "members.yaml"
    small.write_text("orgs:\n  solo:\n    plan: pro\n    members:\n      ann: admin\n")
    assert await run_cli("import", str(small), "--store", loaded) == 0
    assert "(replaced 2 orgs, 3 projects, 8 members, 2 project bindings)" in capsys.readouterr().out
    assert await snapshot(loaded) == {
        "orgs": [("solo", "pro")],
        "projects": [],
        "members": [("solo", "ann", "admin")],
        "project_members": [],
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # Rejected by the parser: nothing even connects.
        ("orgs:\n  acme:\n    plan: pro\n    colour: red\n", "members.yaml:4: unknown key"),
        (
            "orgs:\n  acme:\n    plan: pro\n    members:\n      al: {projects: {nope: admin}}\n",
            "members.yaml:5:",
        ),
        ("orgs: [\n", "members.yaml:"),
        # Rejected inside the transaction, before anything is deleted.
        (
            "orgs:\n  acme:\n    plan: pro\n    members:\n      al: owner\n",
            "roles not in table roles: owner",
        ),
        # Rejected by the schema half-way through the inserts: the DELETEs roll back too.
        (
            "orgs:\n  acme:\n    plan: pro\n    members:\n      " + "u" * 1001 + ": admin\n",
            "members_user_id_syntax",
        ),
    ],
)
async def test_import_of_a_bad_file_changes_nothing(
    loaded: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    before = await snapshot(loaded)
    bad = tmp_path / "members.yaml"
    bad.write_text(content)
    assert await run_cli("import", str(bad), "--store", loaded) == 1
    assert message in capsys.readouterr().err
    assert await snapshot(loaded) == before


async def test_import_without_schema_says_to_run_init(
    database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_cli("import", SHIPPED_MEMBERS, "--store", database) == 1
    assert "run `rbac-proxy store init` first" in capsys.readouterr().err


async def test_store_commands_need_a_postgresql_dsn(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RBAC_PROXY_STORE", raising=False)
    assert await run_cli("init") == 2
    assert await run_cli("init", "--store", "file:members.yaml") == 2
    assert "--store postgresql://... is required" in capsys.readouterr().err


# ---- lookups ---------------------------------------------------------------------------------


async def test_answers_equal_the_file_store(loaded: str) -> None:
    files = FileStore(SHIPPED_MEMBERS)
    users = sorted(files.directory.users())
    projects = sorted({p for org in files.directory.orgs.values() for p in org.projects})
    assert len(users) == 8 and len(projects) == 3
    async with opened(loaded) as (store, _):
        assert isinstance(store, PushesInvalidations)
        for user in [*users, "nobody", ""]:
            assert await store.memberships(user) == await files.memberships(user), user
        for project in [*projects, "no-such-project"]:
            assert await store.project_org(project) == await files.project_org(project), project
        # Spot checks, so that equality above cannot come from two empty answers.
        assert await store.memberships("carol") == (
            Membership("acme", "enterprise", None, {"proj-staging": "developer"}),
        )
        assert await store.memberships("fay") == (Membership("smallco", "pro", "support"),)
        assert await store.project_org("sc-main") == "smallco"
        await store.ping()


async def test_several_orgs_come_back_sorted_with_bindings(loaded: str) -> None:
    await execute(
        loaded,
        "INSERT INTO members VALUES ('smallco', 'carol', NULL)",
        "INSERT INTO project_members VALUES ('smallco', 'carol', 'sc-main', 'admin')",
        "INSERT INTO project_members VALUES ('acme', 'carol', 'proj-prod', 'support')",
    )
    async with opened(loaded) as (store, _):
        assert await store.memberships("carol") == (
            Membership(
                "acme", "enterprise", None, {"proj-staging": "developer", "proj-prod": "support"}
            ),
            Membership("smallco", "pro", None, {"sc-main": "admin"}),
        )


# ---- LISTEN / NOTIFY -------------------------------------------------------------------------


async def test_changes_notify_the_users_concerned(loaded: str) -> None:
    async with opened(loaded) as (store, seen):
        await seen.wait_for(None)  # the initial "drop everything" after LISTEN started
        assert store.listening
        mark = len(seen.calls)
        await execute(loaded, "UPDATE members SET role = 'support' WHERE user_id = 'bob'")
        await seen.wait_for("bob", after=mark)
        assert await store.memberships("bob") == (Membership("acme", "enterprise", "support"),)

        mark = len(seen.calls)
        await execute(
            loaded, "INSERT INTO project_members VALUES ('acme', 'carol', 'proj-prod', 'support')"
        )
        await seen.wait_for("carol", after=mark)

        mark = len(seen.calls)  # a member row that changes hands: both users
        await execute(loaded, "UPDATE members SET user_id = 'robert' WHERE user_id = 'bob'")
        await seen.wait_until(lambda calls: {"bob", "robert"} <= set(calls[mark:]))

        mark = len(seen.calls)
        await execute(loaded, "DELETE FROM project_members WHERE user_id = 'dan'")
        await seen.wait_for("dan", after=mark)

        mark = len(seen.calls)  # a plan change concerns every member of the org: '*'
        await execute(loaded, "UPDATE orgs SET plan = 'enterprise' WHERE id = 'smallco'")
        await seen.wait_for(None, after=mark)

        mark = len(seen.calls)
        await execute(loaded, "INSERT INTO projects VALUES ('proj-new', 'acme')")
        await seen.wait_for(None, after=mark)

        # A rolled-back change announces nothing: the next committed change arrives alone.
        mark = len(seen.calls)
        conn = await connect(loaded)
        try:
            async with conn.transaction():
                await conn.execute("UPDATE members SET role = 'admin' WHERE user_id = 'sue'")
                await conn.execute("SELECT pg_notify('rbac_proxy_invalidate', 'ghost')")
                await conn.execute("SELECT 1/0")
        except asyncpg.DivisionByZeroError:
            pass
        finally:
            await conn.close()
        await execute(loaded, "UPDATE members SET role = 'developer' WHERE user_id = 'gus'")
        await seen.wait_for("gus", after=mark)
        assert seen.calls[mark:] == ["gus"]


async def test_listener_reconnects_after_its_connection_is_killed(loaded: str) -> None:
    async with opened(loaded) as (store, seen):
        await seen.wait_for(None)
        drops_before = seen.calls.count(None)
        conn = await connect(loaded)
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1 AND datname = current_database()",
                LISTEN_APPLICATION_NAME,
            )
            assert killed == 1
        finally:
            await conn.close()
        # Notifications sent while nobody listened are lost: a reconnect drops everything.
        await seen.wait_until(lambda calls: calls.count(None) > drops_before)
        assert store.listening
        mark = len(seen.calls)
        await execute(loaded, "UPDATE members SET role = 'admin' WHERE user_id = 'sue'")
        await seen.wait_for("sue", after=mark)


async def test_close_stops_the_listener(loaded: str) -> None:
    async with opened(loaded) as (store, seen):
        await seen.wait_for(None)
    assert not store.listening
    conn = await connect(loaded)
    try:
        async with asyncio.timeout(EVENTUALLY):  # the backend exits just after the socket closes
            while await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'rbac-proxy%' "
                "AND datname = current_database()"
            ):
                await asyncio.sleep(0.05)
    finally:
        await conn.close()
    with pytest.raises(StoreError):
        await store.memberships("bob")


# ---- --store-query-file ----------------------------------------------------------------------

CUSTOM_QUERIES = """\
-- Queries for an "existing" schema: here the shipped one, written another way.
-- name: memberships
WITH mine AS (SELECT * FROM members WHERE user_id = $1)
SELECT o.id AS org, o.plan AS plan, mine.role AS role,
       NULL::varchar AS project, NULL::varchar AS project_role
  FROM mine JOIN orgs o ON o.id = mine.org_id
UNION ALL
SELECT pm.org_id, o.plan, NULL, pm.project_id, pm.role
  FROM project_members pm JOIN orgs o ON o.id = pm.org_id
 WHERE pm.user_id = $1;

-- name: project_org
SELECT org_id AS org FROM projects WHERE id = $1;
"""


async def test_query_file_with_the_expected_columns(loaded: str, tmp_path: Path) -> None:
    queries = tmp_path / "queries.sql"
    queries.write_text(CUSTOM_QUERIES)
    files = FileStore(SHIPPED_MEMBERS)
    async with opened(loaded, query_file=str(queries)) as (store, _):
        await store.validate()
        for user in [*sorted(files.directory.users()), "nobody"]:
            assert await store.memberships(user) == await files.memberships(user), user
        assert await store.project_org("proj-prod") == "acme"
        assert await store.project_org("nope") is None


@pytest.mark.parametrize(
    ("memberships", "project_org", "message"),
    [
        (
            "SELECT org_id AS org, 'p'::text AS plan, role FROM members WHERE user_id = $1",
            "SELECT org_id AS org FROM projects WHERE id = $1",
            "query 'memberships' must return exactly the columns org, plan, role, project, "
            "project_role; it returns org, plan, role",
        ),
        (
            "SELECT 'a'::text org, 'p'::text plan, NULL::text role, NULL::text project, "
            "NULL::text project_role WHERE $1::text <> ''",
            "SELECT length(id) AS org FROM projects WHERE id = $1",
            "query 'project_org' column 'org' must be text, not int4",
        ),
        (
            "SELECT 'a'::text org, 'p'::text plan, NULL::text role, NULL::text project, "
            "NULL::text project_role WHERE $1::text <> ''",
            "SELECT org_id AS org FROM projects WHERE length(id) = $1",
            "query 'project_org' parameter $1 must be text, not int4",
        ),
        (
            "SELECT * FROM no_such_table WHERE user_id = $1",
            "SELECT org_id AS org FROM projects WHERE id = $1",
            "query 'memberships' does not prepare: relation \"no_such_table\" does not exist",
        ),
    ],
)
async def test_query_file_that_breaks_the_contract(
    loaded: str, tmp_path: Path, memberships: str, project_org: str, message: str
) -> None:
    queries = tmp_path / "queries.sql"
    queries.write_text(
        f"-- name: memberships\n{memberships}\n-- name: project_org\n{project_org}\n"
    )
    # validate() on its own (a startup check), and open(), both refuse with one clear message.
    with pytest.raises(ValueError, match=r"queries\.sql") as raised:
        await PostgresStore(loaded, query_file=str(queries)).validate()
    assert message in str(raised.value)
    store = PostgresStore(loaded, query_file=str(queries))
    with pytest.raises(ValueError) as raised:
        await store.open()
    assert str(queries) in str(raised.value) and message in str(raised.value)
    await store.close()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("-- name: memberships\nSELECT 1\n", ":1: missing the '-- name: project_org' query"),
        ("SELECT 1\n-- name: memberships\nSELECT 1\n", ":1: SQL before the first"),
        (
            "-- name: memberships\nSELECT 1\n-- name: memberships\nSELECT 2\n"
            "-- name: project_org\nSELECT 3\n",
            ":3: query 'memberships' is defined twice (first at line 1)",
        ),
        (
            "-- name: memberships\nSELECT 1\n-- name: projects\nSELECT 2\n",
            ":3: unknown query name 'projects'",
        ),
        (
            "-- name: memberships\n-- nothing yet\n;\n-- name: project_org\nSELECT 1\n",
            ":1: query 'memberships' is empty",
        ),
    ],
)
def test_query_file_format_errors(tmp_path: Path, content: str, message: str) -> None:
    queries = tmp_path / "queries.sql"
    queries.write_text(content)
    with pytest.raises(ValueError, match=r"queries\.sql") as raised:
        PostgresStore("postgresql://127.0.0.1/x", query_file=str(queries))
    assert message in str(raised.value)


def test_missing_query_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read the store query file"):
        PostgresStore("postgresql://127.0.0.1/x", query_file=str(tmp_path / "none.sql"))


@pytest.mark.parametrize(
    ("memberships", "error"),
    [
        (
            "SELECT 'acme'::text org, 'enterprise'::text plan, r AS role, NULL::text project, "
            "NULL::text project_role FROM unnest(ARRAY['admin', 'support']) r WHERE $1 <> ''",
            "two org-wide roles in org 'acme'",
        ),
        (
            "SELECT 'acme'::text org, p AS plan, NULL::text AS role, NULL::text project, "
            "NULL::text project_role FROM unnest(ARRAY['pro', 'enterprise']) p WHERE $1 <> ''",
            "two plans",
        ),
        (
            "SELECT 'acme'::text org, 'pro'::text plan, NULL::text role, 'p1'::text project, "
            "NULL::text project_role WHERE $1 <> ''",
            "project or project_role, not both",
        ),
        (
            "SELECT ''::text org, 'pro'::text plan, 'admin'::text role, NULL::text project, "
            "NULL::text project_role WHERE $1 <> ''",
            "column 'org' must be non-empty text",
        ),
    ],
)
async def test_garbage_rows_are_store_errors(
    loaded: str, tmp_path: Path, memberships: str, error: str
) -> None:
    queries = tmp_path / "queries.sql"
    queries.write_text(
        f"-- name: memberships\n{memberships}\n"
        "-- name: project_org\nSELECT org_id AS org FROM projects WHERE id = $1\n"
    )
    async with opened(loaded, query_file=str(queries)) as (store, _):
        with pytest.raises(StoreError, match=error):
            await store.memberships("bob")


# ---- failures --------------------------------------------------------------------------------


async def test_a_slow_query_fails_within_the_timeout(loaded: str, tmp_path: Path) -> None:
    queries = tmp_path / "slow.sql"
    queries.write_text(
        "-- name: memberships\n"
        "SELECT 'acme'::text AS org, 'enterprise'::text AS plan, 'admin'::text AS role,\n"
        "       NULL::text AS project, NULL::text AS project_role\n"
        "  FROM pg_sleep(5) WHERE $1::text <> ''\n"
        "-- name: project_org\n"
        "SELECT org_id AS org FROM projects WHERE id = $1\n"
    )
    async with opened(loaded, timeout=0.3, query_file=str(queries)) as (store, _):
        started = time.monotonic()
        with pytest.raises(StoreError):
            await store.memberships("bob")
        # Bounded by the timeout, not by pg_sleep(5): a hung query never hangs the proxy.
        assert time.monotonic() - started < 3.0
        # The pool is still usable afterwards (the cancelled connection was recycled).
        assert await store.project_org("proj-prod") == "acme"


async def test_unreachable_database_opens_unready() -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{closed_port()}/nothing"
    store = PostgresStore(dsn, timeout=0.5)
    seen = Invalidations()
    store.on_invalidate = seen
    await store.open()  # must not raise: the proxy starts unready and heals later
    try:
        with pytest.raises(StoreError):
            await store.memberships("bob")
        with pytest.raises(StoreError):
            await store.project_org("proj-prod")
        with pytest.raises(StoreError):
            await store.ping()
        assert not store.listening and seen.calls == []
    finally:
        await store.close()


async def test_store_heals_when_the_database_appears() -> None:
    server = server_dsn()
    name = f"rbac_proxy_test_{secrets.token_hex(6)}"
    dsn = with_database(server, name)
    admin = await connect(server)
    try:
        async with opened(dsn, timeout=1.0) as (store, seen):
            with pytest.raises(StoreError, match="does not exist"):
                await store.memberships("bob")
            await admin.execute(f'CREATE DATABASE "{name}"')
            await load_members(dsn, SHIPPED_MEMBERS)
            # No restart: lookups connect on demand, the listener retries with backoff.
            async with asyncio.timeout(EVENTUALLY):
                while True:
                    with contextlib.suppress(StoreError):
                        if await store.memberships("bob"):
                            break
                    await asyncio.sleep(0.05)
            assert await store.memberships("bob") == (
                Membership("acme", "enterprise", "developer"),
            )
            await store.ping()
            async with asyncio.timeout(EVENTUALLY):  # the listener connected too
                while not store.listening:
                    await asyncio.sleep(0.05)
            assert None in seen.calls  # ... and dropped the cache on connecting
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_missing_schema_is_a_startup_error(database: str) -> None:
    store = PostgresStore(database)
    with pytest.raises(ValueError, match="run `rbac-proxy store init`"):
        await store.open()
    await store.close()


async def test_malformed_dsn_is_a_startup_error() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:notaport/x")
    with pytest.raises(ValueError, match="invalid PostgreSQL DSN"):
        await store.open()
    await store.close()


def test_constructor_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="timeout"):
        PostgresStore("postgresql://127.0.0.1/x", timeout=0)
    with pytest.raises(ValueError, match="pool"):
        PostgresStore("postgresql://127.0.0.1/x", pool_min=5, pool_max=2)
