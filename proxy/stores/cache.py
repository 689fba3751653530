"""Role cache in front of a RoleStore: TTLs, single-flight misses, stale-on-error, invalidation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar, cast

from cachetools import TTLCache

from proxy.policy.model import Membership, MembershipInterner
from proxy.stores.base import RoleStore, StoreError

T = TypeVar("T")

LookupResult = Literal["hit", "miss", "stale", "negative"]
_Kind = Literal["user", "project"]
# Users and projects live in separate bounded caches: --cache-size users, a tenth for projects.
_Key = tuple[_Kind, str]
_MISSING = object()  # "no fresh entry" where None is a valid cached answer (unknown project)


@dataclass(frozen=True, slots=True)
class Cached(Generic[T]):
    """A cached answer; stale=True when the store failed and an older answer was served."""

    value: T
    stale: bool


@dataclass(frozen=True, slots=True)
class _Entry:
    value: object
    fetched_at: float  # clock() when the store call that produced it started
    negative: bool  # no memberships / unknown project: the negative TTL applies


@dataclass(eq=False, slots=True)
class _Flight:
    """One running store call shared by every concurrent miss for its key.

    `current` is the key's generation check: an invalidation while the call runs flips it,
    so the (possibly pre-change) answer is handed to the callers already waiting but is
    never stored as fresh. A flag on the flight instead of a counter per key keeps nothing
    behind for keys that are invalidated and never looked up again.
    """

    task: asyncio.Task[object]
    current: bool = True


class RoleCache:
    """Answers role-store questions from a bounded TTL cache (SPEC §6)."""

    def __init__(
        self,
        store: RoleStore,
        *,
        ttl: float = 30,
        negative_ttl: float = 5,
        stale_ttl: float = 300,
        maxsize: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        on_lookup: Callable[[str], None] | None = None,
    ) -> None:
        if min(ttl, negative_ttl, stale_ttl) < 0:
            raise ValueError("cache TTLs must not be negative")
        if maxsize < 1:
            raise ValueError("cache size must be at least 1")
        self._store = store
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._stale_ttl = stale_ttl
        self._clock = clock
        self._on_lookup = on_lookup
        # Entries are kept as long as any use remains (fresh or stale fallback); freshness
        # is then judged per entry from fetched_at, positive and negative answers apart.
        keep = max(ttl, negative_ttl, stale_ttl)
        self._users: TTLCache[_Key, _Entry] = TTLCache(maxsize=maxsize, ttl=keep, timer=clock)
        # Project ids come from request paths, i.e. from callers: a flood of made-up ids may
        # churn this smaller cache but can never evict users' entries (and their stale
        # fallback) from the other one.
        self._projects: TTLCache[_Key, _Entry] = TTLCache(
            maxsize=max(100, maxsize // 10), ttl=keep, timer=clock
        )
        self._inflight: dict[_Key, _Flight] = {}
        self._shared = MembershipInterner()
        # The same _Entry objects as in the TTLCaches (one object per answer: 100,000 cached
        # users cost about 420 bytes of Python objects each, key and cachetools links included).
        self._hot: dict[_Key, _Entry] = {}
        self._hot_limit = maxsize + max(100, maxsize // 10)
        # Bumped by every change to what the cache answers (a new entry, an invalidation):
        # a decision memoized from fresh answers is reused only while this is unchanged.
        self.generation = 0

    async def memberships(self, user: str) -> Cached[tuple[Membership, ...]]:
        """The user's memberships; raises StoreError when neither store nor cache can answer."""
        return await self._lookup(("user", user), lambda: self._store.memberships(user))

    async def project_org(self, project: str) -> Cached[str | None]:
        """The project's org; raises StoreError when neither store nor cache can answer."""
        return await self._lookup(("project", project), lambda: self._store.project_org(project))

    def fresh_memberships(self, user: str) -> tuple[Membership, ...] | None:
        """The cached memberships when fresh, without awaiting (the hot path); else None.

        A hit is reported as `memberships()` would report it; on None the caller falls back
        to `memberships()`, which does the miss/stale work and its own reporting.
        """
        found = self._fresh(("user", user))
        return None if found is _MISSING else cast("tuple[Membership, ...]", found)

    def fresh_project_org(self, project: str) -> tuple[str | None] | None:
        """(org,) when a fresh answer is cached (org None: unknown project); else None."""
        found = self._fresh(("project", project))
        return None if found is _MISSING else (cast("str | None", found),)

    def fresh_until(self, user: str, project: str | None = None) -> float:
        """Until when (cache clock) the user's (and project's) fresh answers stay fresh.

        Only meaningful right after fresh_memberships / fresh_project_org answered for them.
        """
        hot = self._hot
        user_entry = hot.get(("user", user))
        until = self._fresh_until(user_entry) if user_entry is not None else -1.0
        if project is not None:
            project_entry = hot.get(("project", project))
            project_until = -1.0 if project_entry is None else self._fresh_until(project_entry)
            until = min(until, project_until)
        return until

    def _fresh_until(self, entry: _Entry) -> float:
        return entry.fetched_at + (self._negative_ttl if entry.negative else self._ttl)

    def now(self) -> float:
        """The cache's clock (injectable in tests)."""
        return self._clock()

    def count_fresh_hit(self, negative: bool) -> None:
        """Report a lookup answered from a memo of fresh answers, as the lookup would have."""
        self._report("negative" if negative else "hit")

    def _fresh(self, key: _Key) -> object:
        # A plain dict beside the TTLCaches: a hit is one dict lookup and one clock read
        # (cachetools' get costs several µs per call).
        hot = self._hot.get(key)
        if hot is None or self._clock() >= self._fresh_until(hot):
            return _MISSING
        self._report("negative" if hot.negative else "hit")
        return hot.value

    def _remember(self, key: _Key, value: object, started: float) -> None:
        self.generation += 1
        entry = _Entry(value, started, not value if key[0] == "user" else value is None)
        self._cache(key)[key] = entry
        if len(self._hot) >= self._hot_limit:
            self._hot.clear()  # bounded like the caches; entries refill on the next misses
        self._hot[key] = entry

    def invalidate(self, user: str | None = None) -> int:
        """Drop one user's memberships (or everything, for None); returns entries dropped."""
        self.generation += 1
        if user is None:
            dropped = len(self)
            self._users.clear()
            self._projects.clear()
            self._hot.clear()
            flights = list(self._inflight.values())
            self._inflight.clear()
        else:
            key: _Key = ("user", user)
            dropped = 0 if self._users.pop(key, None) is None else 1
            self._hot.pop(key, None)
            flight = self._inflight.pop(key, None)
            flights = [] if flight is None else [flight]
        # Lookups that start from now on must ask the store again, and the calls already
        # running may carry the answer from before the change: never store those.
        for flight in flights:
            flight.current = False
        return dropped

    def __len__(self) -> int:
        self._users.expire()
        self._projects.expire()
        return len(self._users) + len(self._projects)

    async def _lookup(self, key: _Key, fetch: Callable[[], Awaitable[T]]) -> Cached[T]:
        entry = self._cache(key).get(key)
        if entry is not None and self._clock() < self._fresh_until(entry):
            self._report("negative" if entry.negative else "hit")
            return Cached(cast(T, entry.value), stale=False)
        flight = self._inflight.get(key)
        if flight is None:
            flight = self._start(key, fetch)
        try:
            # shield: a caller that is cancelled (client gone) must not cancel the store
            # call that other callers of the same key are waiting for.
            fetched = cast(T, await asyncio.shield(flight.task))
        except (StoreError, TimeoutError) as exc:
            # Re-read: an invalidation during the call means the old entry must not be served.
            # Windows are half-open like the TTLs: usable while age < stale_ttl.
            entry = self._cache(key).get(key)
            if entry is not None and self._clock() - entry.fetched_at < self._stale_ttl:
                self._report("stale")
                return Cached(cast(T, entry.value), stale=True)
            self._report("miss")
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"role store timed out ({self._store.backend})") from exc
        self._report("miss")
        return Cached(fetched, stale=False)

    def _cache(self, key: _Key) -> TTLCache[_Key, _Entry]:
        return self._users if key[0] == "user" else self._projects

    def _start(self, key: _Key, fetch: Callable[[], Awaitable[T]]) -> _Flight:
        started = self._clock()

        async def run() -> object:
            value: object = await fetch()
            if key[0] == "user":
                # Most users share a few distinct memberships: keep one object of each.
                value = self._shared(cast("tuple[Membership, ...]", value))
            # No await between here and the store: an invalidation is seen or not, atomically.
            if flight.current:
                self._remember(key, value, started)
            return value

        flight = _Flight(asyncio.create_task(run()))
        self._inflight[key] = flight

        def finished(task: asyncio.Task[object]) -> None:
            if self._inflight.get(key) is flight:
                del self._inflight[key]
            if not task.cancelled():
                # Mark the error retrieved: when every waiter was cancelled nobody else will,
                # and asyncio would log "exception was never retrieved". Errors are not cached.
                task.exception()

        flight.task.add_done_callback(finished)
        return flight

    def _report(self, result: LookupResult) -> None:
        if self._on_lookup is not None:
            self._on_lookup(result)

