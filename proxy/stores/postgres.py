"""Role store backed by PostgreSQL (asyncpg pool), invalidated live through LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import Pool

from proxy.policy.model import Membership
from proxy.stores.base import StoreError

log = logging.getLogger("rbac_proxy.store.postgres")

CHANNEL = "rbac_proxy_invalidate"  # SPEC §6; payload: a user id, or "*" for everything
LISTEN_APPLICATION_NAME = "rbac-proxy-listen"  # visible in pg_stat_activity
POOL_APPLICATION_NAME = "rbac-proxy"

MEMBERSHIP_COLUMNS = ("org", "plan", "role", "project", "project_role")
PROJECT_ORG_COLUMNS = ("org",)

# The queries for the shipped schema.sql. A --store-query-file replaces both for an existing
# schema; the contract (one text parameter $1, these text columns) is in load_queries().
DEFAULT_MEMBERSHIPS = """\
SELECT m.org_id AS org, o.plan, m.role, NULL::text AS project, NULL::text AS project_role
  FROM members m JOIN orgs o ON o.id = m.org_id
 WHERE m.user_id = $1
UNION ALL
SELECT pm.org_id, o.plan, NULL::text, pm.project_id, pm.role
  FROM project_members pm JOIN orgs o ON o.id = pm.org_id
 WHERE pm.user_id = $1"""
DEFAULT_PROJECT_ORG = "SELECT org_id AS org FROM projects WHERE id = $1"

# Every failure of the driver, the socket or the clock: the store has no usable answer.
# asyncpg.ClientConfigurationError is an InterfaceError and also lands here at query time;
# open() reports a malformed DSN before that (see _CONFIG_ERRORS).
_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
# Errors of a connection that is gone, as opposed to a query that failed on a live one.
_STALE_CONNECTION: tuple[type[BaseException], ...] = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    ConnectionError,
)
# A DSN asyncpg cannot parse (e.g. a non-numeric port) is a ValueError: configuration, not an
# outage, so open() raises it instead of retrying forever.
_CONFIG_ERRORS = (ValueError,)
# Types the rows may carry: the proxy compares ids and role names as text.
_TEXT_TYPES = frozenset({"text", "varchar", "bpchar", "name", "citext"})
_NAME_LINE = re.compile(r"^\s*--\s*name:\s*(?P<name>\S*)\s*$")

_BACKOFF_START = 0.1
_BACKOFF_CAP = 5.0
_LISTEN_HEALTH_INTERVAL = 10.0  # a silent half-open TCP connection is found by a SELECT 1


@dataclass(frozen=True, slots=True)
class Queries:
    """The two statements the store runs, and where they came from (for error messages)."""

    memberships: str = DEFAULT_MEMBERSHIPS
    project_org: str = DEFAULT_PROJECT_ORG
    source: str = "the built-in queries for schema.sql"


def load_queries(path: str) -> Queries:
    """Parse a --store-query-file; raise ValueError with `file:line: message` problems.

    Format: two sections, each opened by a `-- name: NAME` line, NAME being `memberships` or
    `project_org`; the SQL runs to the next section (one statement; a final `;` is allowed).
    - memberships: $1 = user id (text). One row per org-wide membership and one per project
      binding, text columns org, plan, role (NULL = "Set by Project"), project, project_role
      (both NULL on an org-wide row). A user with no rows is a member of nothing.
    - project_org: $1 = project id (text). One row with a text column org, or no row for an
      unknown project.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the store query file: {exc}") from None
    problems: list[str] = []
    sections: dict[str, tuple[int, list[str]]] = {}
    current: list[str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        found = _NAME_LINE.match(line)
        if found is not None:
            name = found["name"]
            if name not in ("memberships", "project_org"):
                problems.append(
                    f"{path}:{number}: unknown query name {name!r} "
                    "(expected 'memberships' or 'project_org')"
                )
                current = []  # keep parsing; its lines belong to no query
            elif name in sections:
                problems.append(
                    f"{path}:{number}: query {name!r} is defined twice "
                    f"(first at line {sections[name][0]})"
                )
                current = []
            else:
                current = []
                sections[name] = (number, current)
        elif current is not None:
            current.append(line)
        elif line.strip() and not line.lstrip().startswith("--"):
            problems.append(f"{path}:{number}: SQL before the first '-- name: ...' line")
    bodies: dict[str, str] = {}
    for name in ("memberships", "project_org"):
        if name not in sections:
            problems.append(f"{path}:1: missing the '-- name: {name}' query")
            continue
        number, lines = sections[name]
        body = _statement(lines)
        if not body:
            problems.append(f"{path}:{number}: query {name!r} is empty")
        bodies[name] = body
    if problems:
        raise ValueError("\n".join(problems))
    return Queries(bodies["memberships"], bodies["project_org"], path)


def _statement(lines: list[str]) -> str:
    # A prepared statement is one command: a final ";" is dropped (harmless, but tidy in
    # error messages); a section of only comments holds no statement at all.
    body = "\n".join(lines).strip().removesuffix(";").rstrip()
    if all(not ln.strip() or ln.lstrip().startswith("--") for ln in body.splitlines()):
        return ""
    return body


def redact(dsn: str) -> str:
    """The DSN without its password, for logs and messages."""
    try:
        parts = urlsplit(dsn)
        if parts.password is None:
            return dsn
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "postgresql://(unparsable DSN)"


@dataclass(slots=True)
class _Org:
    plan: str
    role: str | None = None
    projects: dict[str, str] = field(default_factory=dict)


class PostgresStore:
    """`--store postgresql://...` (SPEC §6): one query per lookup, LISTEN for invalidations.

    open() never fails because PostgreSQL is down: the pool then connects lazily on each
    lookup (which raises StoreError until the database answers) and the listener retries
    with backoff, so the proxy starts unready and heals by itself.
    """

    backend: str = "postgresql"

    def __init__(
        self,
        dsn: str,
        *,
        timeout: float = 2.0,
        query_file: str | None = None,
        pool_min: int = 1,
        pool_max: int = 10,
    ) -> None:
        """Raise ValueError for bad arguments or a malformed query file (startup error)."""
        if timeout <= 0:
            raise ValueError("the PostgreSQL store timeout must be positive")
        if pool_max < 1 or not 0 <= pool_min <= pool_max:
            raise ValueError("PostgreSQL pool sizes need 0 <= pool_min <= pool_max, pool_max >= 1")
        self._dsn = dsn
        self._timeout = timeout
        self._pool_min = pool_min
        self._pool_max = pool_max
        self.queries = Queries() if query_file is None else load_queries(query_file)
        # Set by the owner (build_runtime: RoleCache.invalidate); user id, or None for all.
        self.on_invalidate: Callable[[str | None], object] | None = None
        self._pool: Pool[Any] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._validated = False
        self._last_problem: str | None = None  # logged once per distinct problem
        self._listening = False

    @property
    def listening(self) -> bool:
        """True while the LISTEN connection is up (invalidations arrive as they happen)."""
        return self._listening

    async def open(self) -> None:
        """Create the pool and start the listener.

        Raises ValueError for configuration PostgreSQL itself reports as wrong (malformed
        DSN, query file whose columns do not match); never for an unreachable database.
        """
        if self._pool is not None:
            return
        where = redact(self._dsn)
        try:
            self._pool = await self._create_pool(self._pool_min)
        except _CONFIG_ERRORS as exc:
            raise ValueError(f"--store {where}: invalid PostgreSQL DSN: {exc}") from None
        except _DB_ERRORS as exc:
            log.warning(
                "PostgreSQL role store %s unreachable (%s: %s); lookups fail until it answers",
                where,
                type(exc).__name__,
                exc,
            )
            # min_size=0 connects nothing now: every acquire connects on demand, so the pool
            # heals on the first lookup after the database comes up.
            self._pool = await self._create_pool(0)
        else:
            try:
                await self.validate()
            except ValueError:
                await self._pool.close()
                self._pool = None
                raise
            except StoreError as exc:  # went away between connect and validation
                log.warning("PostgreSQL role store %s: %s", where, exc)
        self._listener = asyncio.create_task(self._listen(), name="rbac-proxy-pg-listen")

    async def validate(self) -> None:
        """Prepare both queries and check their parameter and result columns.

        Raises ValueError naming the query source and the expected columns when the queries
        do not fit the contract (or the schema is missing), StoreError when PostgreSQL cannot
        be asked. Connects directly when the store is not open.
        """
        try:
            if self._pool is None:
                conn = await asyncpg.connect(self._dsn, timeout=self._timeout)
                try:
                    await self._check_queries(conn)
                finally:
                    await conn.close(timeout=self._timeout)
            else:
                async with self._pool.acquire(timeout=self._timeout) as pooled:
                    await self._check_queries(pooled)
        except ValueError:
            raise
        except _DB_ERRORS as exc:
            raise StoreError(f"cannot validate the PostgreSQL queries: {_describe(exc)}") from exc

    async def memberships(self, user: str) -> tuple[Membership, ...]:
        rows = await self._fetch(self.queries.memberships, user)
        return _memberships(rows)

    async def project_org(self, project: str) -> str | None:
        rows = await self._fetch(self.queries.project_org, project)
        orgs = {_text(row, "org") for row in rows}
        if len(orgs) > 1:
            raise StoreError(f"project {project!r} maps to several orgs: {sorted(orgs)}")
        return orgs.pop() if orgs else None

    async def ping(self) -> None:
        await self._fetch("SELECT 1", None)

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._timeout)
            except TimeoutError:  # a connection still busy: do not hang shutdown on it
                pool.terminate()

    # ---- queries ------------------------------------------------------------------------

    async def _create_pool(self, min_size: int) -> Pool[Any]:
        return await asyncpg.create_pool(
            self._dsn,
            min_size=min_size,
            max_size=self._pool_max,  # bounded: N replicas × pool_max <= max_connections
            timeout=self._timeout,  # connect
            command_timeout=self._timeout,  # client side, per query
            server_settings={
                "application_name": POOL_APPLICATION_NAME,
                # Server side too: a query the client gave up on must not keep running.
                "statement_timeout": str(max(1, int(self._timeout * 1000))),
            },
        )

    async def _fetch(self, sql: str, arg: str | None) -> list[asyncpg.Record]:
        pool = self._pool
        if pool is None:
            raise StoreError("the PostgreSQL role store is not open")
        deadline = time.monotonic() + self._timeout
        for attempt in (1, 2):
            try:
                async with pool.acquire(timeout=self._timeout) as conn:
                    if not self._validated:
                        await self._check_queries(conn)
                    remaining = max(0.001, deadline - time.monotonic())
                    if arg is None:
                        return await conn.fetch(sql, timeout=remaining)
                    return await conn.fetch(sql, arg, timeout=remaining)
            except ValueError as exc:  # the query contract, found on a late first connection
                raise StoreError(str(exc)) from exc
            except _STALE_CONNECTION as exc:
                # A pooled connection that died with the server (restart, failover, idle
                # kill): these lookups are read-only, so one retry on a fresh connection
                # hides the restart from callers.
                if attempt == 2 or time.monotonic() >= deadline:
                    raise StoreError(f"PostgreSQL role store: {_describe(exc)}") from exc
                log.info("PostgreSQL connection lost (%s); retrying once", _describe(exc))
            except _DB_ERRORS as exc:
                raise StoreError(f"PostgreSQL role store: {_describe(exc)}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _check_queries(self, conn: Any) -> None:
        """Raise ValueError when the queries break the contract.

        A failure is not remembered: the proxy may come up before `store init` ran, and
        must heal once the schema is there (each lookup checks again until one passes).
        """
        checks = (
            ("memberships", self.queries.memberships, MEMBERSHIP_COLUMNS),
            ("project_org", self.queries.project_org, PROJECT_ORG_COLUMNS),
        )
        problems: list[str] = []
        for name, sql, expected in checks:
            try:
                statement = await conn.prepare(sql, timeout=self._timeout)
            except asyncpg.PostgresError as exc:
                if _is_connection_problem(exc):
                    raise
                problems.append(f"query {name!r} does not prepare: {exc}")
                continue
            problems.extend(
                _contract_problems(
                    name, statement.get_parameters(), statement.get_attributes(), expected
                )
            )
        if problems:
            hint = (
                " (run `rbac-proxy store init` to create the schema)"
                if self.queries.source.startswith("the built-in")
                else ""
            )
            problem = f"{self.queries.source}: " + "; ".join(problems) + hint
            if problem != self._last_problem:
                log.error("PostgreSQL role store: %s", problem)
                self._last_problem = problem
            raise ValueError(problem)
        self._validated = True

    # ---- LISTEN ---------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Keep one dedicated connection LISTENing; reconnect with exponential backoff.

        Not a pool connection: LISTEN is session state, and a pooled connection is reset
        and shared. After every (re)connect the whole cache is dropped, because
        notifications sent while no connection listened are lost for good.
        """
        backoff = _BACKOFF_START
        failures = 0  # consecutive failed connection attempts
        while True:
            conn: asyncpg.Connection[Any] | None = None
            connected_at: float | None = None
            try:
                conn = await asyncpg.connect(
                    self._dsn,
                    timeout=self._timeout,
                    server_settings={"application_name": LISTEN_APPLICATION_NAME},
                )
                await conn.add_listener(CHANNEL, self._notified)
                connected_at = time.monotonic()
                if failures:
                    log.info("LISTEN %s re-established after %d attempt(s)", CHANNEL, failures)
                failures = 0
                await self._hold(conn)
                log.warning("LISTEN %s connection closed; reconnecting", CHANNEL)
            except _DB_ERRORS as exc:
                if connected_at is not None:
                    log.warning(
                        "LISTEN %s connection lost (%s); reconnecting", CHANNEL, _describe(exc)
                    )
                else:
                    if failures == 0:
                        log.warning(
                            "LISTEN %s on %s failed (%s); retrying with backoff",
                            CHANNEL,
                            redact(self._dsn),
                            _describe(exc),
                        )
                    failures += 1
            except Exception:  # the listener must outlive any surprise; it is logged
                log.exception("LISTEN %s: unexpected error", CHANNEL)
                failures += 1
            finally:
                self._listening = False
                if conn is not None:
                    await _close_quietly(conn, self._timeout)
            # A connection that held for a while earns a fast retry; one that dies at once
            # keeps backing off instead of reconnecting in a tight loop.
            if connected_at is not None and time.monotonic() - connected_at > _BACKOFF_CAP:
                backoff = _BACKOFF_START
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_CAP)

    async def _hold(self, conn: asyncpg.Connection[Any]) -> None:
        """Listen on `conn` until it closes (server side, or found silent by a SELECT 1)."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        if conn.is_closed():
            return
        self._listening = True
        # LISTEN is active now: whatever changed before it was set up is flushed here.
        self._invalidate(None)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), _LISTEN_HEALTH_INTERVAL)
            if lost.is_set():
                return
            # Raises (→ reconnect) on a half-open connection that no termination reports.
            await conn.fetchval("SELECT 1", timeout=self._timeout)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        user = payload if isinstance(payload, str) else ""
        # "*" means everything; so does an empty payload, since it names no user.
        self._invalidate(None if user in ("", "*") else user)

    def _invalidate(self, user: str | None) -> None:
        callback = self.on_invalidate
        if callback is None:
            return
        try:
            callback(user)
        except Exception:  # a failing callback must not stop the listener
            log.exception("on_invalidate(%r) failed", user)


def _contract_problems(
    name: str,
    parameters: Sequence[Any],
    attributes: Sequence[Any],
    expected: tuple[str, ...],
) -> list[str]:
    problems: list[str] = []
    if len(parameters) != 1:
        problems.append(f"query {name!r} must take exactly one parameter $1, not {len(parameters)}")
    elif parameters[0].name not in _TEXT_TYPES:
        problems.append(
            f"query {name!r} parameter $1 must be text, not {parameters[0].name} "
            "(compare as text, e.g. `WHERE id::text = $1`)"
        )
    names = [attr.name for attr in attributes]
    if sorted(names) != sorted(expected):
        problems.append(
            f"query {name!r} must return exactly the columns {', '.join(expected)}; "
            f"it returns {', '.join(names) or 'no columns'}"
        )
    else:
        for attr in attributes:
            if attr.type.name not in _TEXT_TYPES:
                problems.append(
                    f"query {name!r} column {attr.name!r} must be text, not {attr.type.name} "
                    f"(cast it: {attr.name}::text)"
                )
    return problems


def _memberships(rows: Sequence[asyncpg.Record]) -> tuple[Membership, ...]:
    """Fold one row per org-wide membership or project binding into Memberships by org."""
    orgs: dict[str, _Org] = {}
    for row in rows:
        org = _text(row, "org")
        plan = _text(row, "plan")
        role = _optional_text(row, "role")
        project = _optional_text(row, "project")
        project_role = _optional_text(row, "project_role")
        entry = orgs.setdefault(org, _Org(plan))
        if entry.plan != plan:
            raise StoreError(f"org {org!r} has two plans in one answer: {entry.plan!r}, {plan!r}")
        if role is not None:
            if entry.role not in (None, role):
                raise StoreError(f"two org-wide roles in org {org!r}: {entry.role!r}, {role!r}")
            entry.role = role
        if (project is None) != (project_role is None):
            raise StoreError(f"a row of org {org!r} has project or project_role, not both")
        if project is not None and project_role is not None:
            if entry.projects.get(project, project_role) != project_role:
                raise StoreError(f"two roles on project {project!r} in org {org!r}")
            entry.projects[project] = project_role
    # Sorted by org like the file store, so every backend answers identically.
    return tuple(
        Membership(name, entry.plan, entry.role, MappingProxyType(dict(entry.projects)))
        for name, entry in sorted(orgs.items())
    )


def _text(row: asyncpg.Record, column: str) -> str:
    value = row[column]
    if not isinstance(value, str) or not value:
        raise StoreError(f"column {column!r} must be non-empty text, got {value!r}")
    return value


def _optional_text(row: asyncpg.Record, column: str) -> str | None:
    return None if row[column] is None else _text(row, column)


def _is_connection_problem(exc: asyncpg.PostgresError) -> bool:
    # SQLSTATE classes 08 (connection), 53 (resources), 57 (operator intervention, e.g.
    # admin shutdown or query_canceled by statement_timeout) say nothing about the SQL.
    state = getattr(exc, "sqlstate", "") or ""
    return state[:2] in ("08", "53", "57")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _close_quietly(conn: asyncpg.Connection[Any], timeout: float) -> None:
    if conn.is_closed():
        return
    try:
        await asyncio.wait_for(conn.close(), timeout)
    except _DB_ERRORS:
        conn.terminate()
    except asyncio.CancelledError:
        conn.terminate()
        raise
