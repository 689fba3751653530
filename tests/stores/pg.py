"""PostgreSQL test helpers: a fresh throwaway database per test, schema and members loading.

The server comes from $RBAC_PROXY_TEST_PG (a postgresql:// URL whose user may CREATE DATABASE)
or postgresql://postgres@127.0.0.1:5432/test. An unreachable server FAILS the test with a clear
message: the store tests are never skipped (issue 4).

Use: `async with fresh_database() as dsn: ...`, or the `pg_dsn` fixture (import it into a
conftest.py: `from tests.stores.pg import pg_dsn  # noqa: F401`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from proxy.stores.cli import apply_schema, import_members, read_members
from proxy.stores.postgres import redact

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/test"
_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def server_dsn() -> str:
    return os.environ.get("RBAC_PROXY_TEST_PG") or DEFAULT_SERVER


def with_database(dsn: str, database: str) -> str:
    """The same server and credentials, another database."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


async def connect(dsn: str) -> asyncpg.Connection[Any]:
    """A connection, or a test failure that says how to provide PostgreSQL."""
    try:
        return await asyncpg.connect(dsn, timeout=5)
    except _ERRORS as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {redact(dsn)} ({type(exc).__name__}: {exc}). "
            "The role store tests need a real server: run .ci/run (it starts one) or set "
            "RBAC_PROXY_TEST_PG=postgresql://user@127.0.0.1:5432/db (user may CREATE DATABASE).",
            pytrace=False,
        )


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """Create an empty database rbac_proxy_test_<random>, yield its DSN, drop it afterwards."""
    server = server_dsn()
    name = f"rbac_proxy_test_{secrets.token_hex(6)}"
    admin = await connect(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(server, name)
    finally:
        admin = await connect(server)
        try:
            # FORCE (PostgreSQL 13+): a test that failed half-way may leave connections open.
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    """DSN of a FRESH, empty database (no schema), dropped after the test."""
    async with fresh_database() as dsn:
        yield dsn


async def load_members(dsn: str, path: str) -> None:
    """Apply schema.sql (idempotent) and replace the store's content with a members file."""
    await apply_schema(dsn)
    await import_members(dsn, read_members(path))
