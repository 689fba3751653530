"""`rbac-proxy store init|import`: apply schema.sql to PostgreSQL, load a members file into it."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg

from proxy.policy.members import Directory, parse_members
from proxy.policy.model import PolicyError, Problem
from proxy.stores.postgres import redact
from proxy.yamlsource import parse_yaml

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SCHEMA_FILE = "schema.sql"
_CONNECT_TIMEOUT = 10.0
_SESSION = {
    "application_name": "rbac-proxy-store-cli",
    # A table locked by a long transaction makes the command fail, not hang.
    "lock_timeout": "10s",
    # "relation already exists, skipping" on every re-run is expected, not news.
    "client_min_messages": "warning",
}
# Serializes concurrent `store init` runs (two replicas' init jobs): CREATE ... IF NOT EXISTS
# alone races on the catalog. Any constant works; this one spells "rbacprox" in ASCII.
_SCHEMA_LOCK = 0x7262_6163_7072_6F78


_ADD_ROLE_HINT = "them first: INSERT INTO roles (name) VALUES ('...')"


class StoreCommandError(Exception):
    """The command cannot be completed; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Counts:
    orgs: int
    projects: int
    members: int
    bindings: int

    def __str__(self) -> str:
        return (
            f"{self.orgs} orgs, {self.projects} projects, {self.members} members, "
            f"{self.bindings} project bindings"
        )


@dataclass(frozen=True, slots=True)
class ImportSummary:
    imported: Counts
    replaced: Counts  # what the tables held before


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `store init` and `store import` to the rbac-proxy command line."""
    store = sub.add_parser("store", help="set up and load the PostgreSQL role store")
    actions = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    init = actions.add_parser(
        "init", help="create or update the tables and NOTIFY triggers (idempotent)"
    )
    _store_flag(init)
    load = actions.add_parser(
        "import",
        help="replace the store's orgs, projects and members with a members file's, "
        "in one transaction",
    )
    load.add_argument("members", metavar="MEMBERS.yaml", help="a members file (SPEC §6)")
    _store_flag(load)


def _store_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", default=None, help="postgresql://user@host:port/db [env RBAC_PROXY_STORE]"
    )


def run(args: argparse.Namespace) -> int:
    """Run `store init` or `store import`; 0 done, 1 failed (nothing changed), 2 usage."""
    dsn = args.store or os.environ.get("RBAC_PROXY_STORE")
    if not dsn or not dsn.startswith(("postgresql://", "postgres://")):
        print(
            "rbac-proxy store: --store postgresql://... is required "
            "(or RBAC_PROXY_STORE); only the PostgreSQL store has a schema",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        if args.store_command == "init":
            schema = find_schema()
            asyncio.run(apply_schema(dsn, schema.read_text(encoding="utf-8")))
            print(f"schema applied to {redact(dsn)} ({schema})")
            return EXIT_OK
        # Parse before connecting: a bad file must not even open a transaction.
        directory = read_members(args.members)
        summary = asyncio.run(import_members(dsn, directory))
    except PolicyError as exc:
        print(exc, file=sys.stderr)
    except (OSError, StoreCommandError) as exc:
        print(f"rbac-proxy store {args.store_command}: {exc}", file=sys.stderr)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, ValueError) as exc:
        detail = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        print(f"rbac-proxy store {args.store_command}: {redact(dsn)}: {detail}", file=sys.stderr)
    else:
        print(
            f"{args.members}: imported into {redact(dsn)}: {summary.imported} "
            f"(replaced {summary.replaced})"
        )
        return EXIT_OK
    return EXIT_FAILED


def find_schema() -> Path:
    """schema.sql at the root of a source checkout, in the working directory (the Docker
    image's WORKDIR), else a copy packaged in proxy/data/."""
    candidates = [Path(__file__).resolve().parents[2] / SCHEMA_FILE, Path.cwd() / SCHEMA_FILE]
    packaged = resources.files("proxy").joinpath("data", SCHEMA_FILE)
    if isinstance(packaged, Path):
        candidates.append(packaged)
    for path in candidates:
        if path.is_file():
            return path
    raise StoreCommandError(
        f"cannot find {SCHEMA_FILE} (looked in {', '.join(str(p) for p in candidates)})"
    )


def read_members(path: str) -> Directory:
    """Parse and validate a members file; raise OSError or PolicyError (file:line problems)."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyError([Problem(path, line, "the file is not valid UTF-8")]) from None
    return parse_members(parse_yaml(text, path), path)


async def _connect(dsn: str) -> asyncpg.Connection[Any]:
    return await asyncpg.connect(dsn, timeout=_CONNECT_TIMEOUT, server_settings=_SESSION)


async def apply_schema(dsn: str, schema_sql: str | None = None) -> None:
    """Apply schema.sql (or the given SQL) in one transaction; safe to run again."""
    sql = schema_sql if schema_sql is not None else find_schema().read_text(encoding="utf-8")
    conn = await _connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
            await conn.execute(sql)
    finally:
        await conn.close()


async def import_members(dsn: str, directory: Directory) -> ImportSummary:
    """Replace the four tables' content with the directory's, all or nothing.

    DELETE rather than TRUNCATE: running proxies keep reading the old rows until COMMIT
    (TRUNCATE's exclusive lock would stall their lookups), and the row triggers announce
    every affected user.
    """
    orgs = [(name, record.plan) for name, record in sorted(directory.orgs.items())]
    projects = [
        (project, name)
        for name, record in sorted(directory.orgs.items())
        for project in sorted(record.projects)
    ]
    members = [
        (name, user, membership.role)
        for name, record in sorted(directory.orgs.items())
        for user, membership in sorted(record.members.items())
    ]
    bindings = [
        (name, user, project, role)
        for name, record in sorted(directory.orgs.items())
        for user, membership in sorted(record.members.items())
        for project, role in sorted(membership.projects.items())
    ]
    used_roles = {m[2] for m in members if m[2] is not None} | {b[3] for b in bindings}
    conn = await _connect(dsn)
    try:
        async with conn.transaction():
            try:
                # Writers wait (one consistent replacement); readers carry on with old rows.
                await conn.execute(
                    "LOCK TABLE orgs, projects, members, project_members "
                    "IN SHARE ROW EXCLUSIVE MODE"
                )
            except asyncpg.UndefinedTableError:
                raise StoreCommandError(
                    f"{redact(dsn)} has no rbac-proxy schema: run `rbac-proxy store init` first"
                ) from None
            known = {row["name"] for row in await conn.fetch("SELECT name FROM roles")}
            unknown = sorted(used_roles - known)
            if unknown:
                names = ", ".join(unknown)
                raise StoreCommandError(
                    f"roles not in table roles: {names}. If routes.yaml defines them, add "
                    + _ADD_ROLE_HINT
                )
            replaced = await _counts(conn)
            for table in ("project_members", "members", "projects", "orgs"):
                await conn.execute(f"DELETE FROM {table}")  # noqa: S608 (constant names)
            await _insert(conn, "INSERT INTO orgs (id, plan) VALUES ($1, $2)", orgs)
            await _insert(conn, "INSERT INTO projects (id, org_id) VALUES ($1, $2)", projects)
            await _insert(
                conn, "INSERT INTO members (org_id, user_id, role) VALUES ($1, $2, $3)", members
            )
            await _insert(
                conn,
                "INSERT INTO project_members (org_id, user_id, project_id, role) "
                "VALUES ($1, $2, $3, $4)",
                bindings,
            )
    finally:
        await conn.close()
    imported = Counts(len(orgs), len(projects), len(members), len(bindings))
    return ImportSummary(imported, replaced)


async def _insert(conn: asyncpg.Connection[Any], sql: str, rows: list[Any]) -> None:
    if rows:
        await conn.executemany(sql, rows)


async def _counts(conn: asyncpg.Connection[Any]) -> Counts:
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM orgs), (SELECT count(*) FROM projects), "
        "(SELECT count(*) FROM members), (SELECT count(*) FROM project_members)"
    )
    assert row is not None  # a SELECT without FROM returns exactly one row
    return Counts(int(row[0]), int(row[1]), int(row[2]), int(row[3]))
