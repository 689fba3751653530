"""Tests for proxy.stores.cache: TTLs, single-flight, stale-on-error, invalidation races."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from proxy.policy.model import Membership
from proxy.stores.base import RoleStore, StoreError
from proxy.stores.cache import RoleCache
from tests.fakes import FakeClock

ACME = Membership(org="acme", plan="enterprise", role="admin")
ACME_DEV = Membership(org="acme", plan="enterprise", role="developer")



class FakeStore:
    """In-memory RoleStore with a failure switch and an optional gate to hold calls open."""

    backend = "fake"

    def __init__(self) -> None:
        self.members: dict[str, tuple[Membership, ...]] = {"alice": (ACME,)}
        self.projects: dict[str, str] = {"proj-prod": "acme"}
        self.calls: Counter[str] = Counter()
        self.fail: BaseException | None = None
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def _wait(self) -> None:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail

    async def memberships(self, user: str) -> tuple[Membership, ...]:
        self.calls[f"user:{user}"] += 1
        # Read the answer before waiting: the answer reflects the store when the call began.
        answer = self.members.get(user, ())
        await self._wait()
        return answer

    async def project_org(self, project: str) -> str | None:
        self.calls[f"project:{project}"] += 1
        answer = self.projects.get(project)
        await self._wait()
        return answer

    async def open(self) -> None:
        return None

    async def ping(self) -> None:
        await self._wait()

    async def close(self) -> None:
        return None


class Setup:
    def __init__(self, **kwargs: float) -> None:
        self.store = FakeStore()
        self.clock = FakeClock()
        self.results: list[str] = []
        store: RoleStore = self.store  # the fake must satisfy the Protocol
        self.cache = RoleCache(
            store,
            clock=self.clock,
            on_lookup=self.results.append,
            ttl=kwargs.get("ttl", 30),
            negative_ttl=kwargs.get("negative_ttl", 5),
            stale_ttl=kwargs.get("stale_ttl", 300),
            maxsize=int(kwargs.get("maxsize", 100)),
        )


async def test_miss_then_hit_within_ttl() -> None:
    s = Setup()
    first = await s.cache.memberships("alice")
    second = await s.cache.memberships("alice")
    assert first.value == (ACME,) and not first.stale
    assert second.value == (ACME,) and not second.stale
    assert s.store.calls["user:alice"] == 1
    assert s.results == ["miss", "hit"]


async def test_positive_entry_expires_after_ttl() -> None:
    s = Setup(ttl=30)
    await s.cache.memberships("alice")
    s.clock.advance(29.9)
    await s.cache.memberships("alice")
    assert s.store.calls["user:alice"] == 1
    s.store.members["alice"] = (ACME_DEV,)
    s.clock.advance(0.1)
    answer = await s.cache.memberships("alice")
    assert answer.value == (ACME_DEV,)
    assert s.store.calls["user:alice"] == 2
    assert s.results == ["miss", "hit", "miss"]


async def test_negative_answer_is_cached_for_negative_ttl_only() -> None:
    s = Setup(ttl=30, negative_ttl=5)
    assert (await s.cache.memberships("nobody")).value == ()
    s.clock.advance(4)
    assert (await s.cache.memberships("nobody")).value == ()
    assert s.store.calls["user:nobody"] == 1
    s.clock.advance(1)  # 5 s old: a negative answer is no longer fresh
    s.store.members["nobody"] = (ACME,)
    assert (await s.cache.memberships("nobody")).value == (ACME,)
    assert s.store.calls["user:nobody"] == 2
    assert s.results == ["miss", "negative", "miss"]


async def test_project_org_positive_and_negative() -> None:
    s = Setup(ttl=30, negative_ttl=5)
    assert (await s.cache.project_org("proj-prod")).value == "acme"
    assert (await s.cache.project_org("proj-prod")).value == "acme"
    assert (await s.cache.project_org("ghost")).value is None
    assert (await s.cache.project_org("ghost")).value is None
    s.clock.advance(6)
    assert (await s.cache.project_org("ghost")).value is None
    assert (await s.cache.project_org("proj-prod")).value == "acme"
    assert s.store.calls == Counter({"project:proj-prod": 1, "project:ghost": 2})
    assert s.results == ["miss", "hit", "miss", "negative", "miss", "hit"]


async def test_users_and_projects_do_not_share_keys() -> None:
    s = Setup()
    s.store.members["same"] = (ACME,)
    s.store.projects["same"] = "acme"
    assert (await s.cache.memberships("same")).value == (ACME,)
    assert (await s.cache.project_org("same")).value == "acme"
    assert len(s.cache) == 2


async def test_size_is_bounded() -> None:
    s = Setup(maxsize=3)
    for i in range(10):
        s.store.members[f"u{i}"] = (ACME,)
        await s.cache.memberships(f"u{i}")
    assert len(s.cache) == 3
    # The least recently used went first: the newest user is still a hit.
    await s.cache.memberships("u9")
    assert s.results[-1] == "hit"
    await s.cache.memberships("u0")
    assert s.results[-1] == "miss"


async def test_made_up_project_ids_never_evict_users() -> None:
    """Review finding: project ids come from callers; a flood must not push users out."""
    s = Setup(maxsize=50)
    s.store.members["alice"] = (ACME,)
    await s.cache.memberships("alice")
    for i in range(1000):
        await s.cache.project_org(f"made-up-{i}")  # unknown: cached negative answers
    await s.cache.memberships("alice")
    assert s.results[-1] == "hit"
    assert len(s.cache) == 1 + 100  # alice + the project cache's own bound (max(100, 50 // 10))


async def test_len_does_not_count_expired_entries() -> None:
    s = Setup(ttl=30, negative_ttl=5, stale_ttl=60)
    await s.cache.memberships("alice")
    assert len(s.cache) == 1
    s.clock.advance(61)
    assert len(s.cache) == 0


async def test_concurrent_misses_share_one_store_call() -> None:
    s = Setup()
    s.store.gate = asyncio.Event()
    lookups = [asyncio.create_task(s.cache.memberships("alice")) for _ in range(100)]
    await s.store.entered.wait()
    s.store.gate.set()
    answers = await asyncio.gather(*lookups)
    assert s.store.calls["user:alice"] == 1
    assert all(a.value == (ACME,) and not a.stale for a in answers)
    assert s.results == ["miss"] * 100
    assert (await s.cache.memberships("alice")).value == (ACME,)
    assert s.store.calls["user:alice"] == 1


async def test_cancelled_waiter_does_not_break_the_others() -> None:
    s = Setup()
    s.store.gate = asyncio.Event()
    first = asyncio.create_task(s.cache.memberships("alice"))
    await s.store.entered.wait()
    second = asyncio.create_task(s.cache.memberships("alice"))
    await asyncio.sleep(0)  # let the second caller join the flight
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    s.store.gate.set()
    answer = await second
    assert answer.value == (ACME,)
    assert s.store.calls["user:alice"] == 1


async def test_call_completes_and_is_cached_when_every_waiter_is_cancelled() -> None:
    s = Setup()
    s.store.gate = asyncio.Event()
    only = asyncio.create_task(s.cache.memberships("alice"))
    await s.store.entered.wait()
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    s.store.gate.set()
    # Bounded wait for the shielded call to finish and fill the cache.
    for _ in range(100):
        if len(s.cache) == 1:
            break
        await asyncio.sleep(0)
    assert len(s.cache) == 1
    s.results.clear()
    assert (await s.cache.memberships("alice")).value == (ACME,)
    assert s.results == ["hit"]
    assert s.store.calls["user:alice"] == 1


async def test_errors_are_not_cached() -> None:
    s = Setup()
    s.store.fail = StoreError("down")
    with pytest.raises(StoreError):
        await s.cache.memberships("alice")
    assert len(s.cache) == 0
    s.store.fail = None
    assert (await s.cache.memberships("alice")).value == (ACME,)
    assert s.store.calls["user:alice"] == 2
    assert s.results == ["miss", "miss"]


async def test_concurrent_waiters_all_get_the_error_then_the_next_lookup_retries() -> None:
    s = Setup()
    s.store.gate = asyncio.Event()
    s.store.fail = StoreError("down")
    lookups = [asyncio.create_task(s.cache.memberships("alice")) for _ in range(5)]
    await s.store.entered.wait()
    s.store.gate.set()
    outcomes = await asyncio.gather(*lookups, return_exceptions=True)
    assert all(isinstance(o, StoreError) for o in outcomes)
    assert s.store.calls["user:alice"] == 1
    s.store.fail = None
    assert (await s.cache.memberships("alice")).value == (ACME,)
    assert s.store.calls["user:alice"] == 2


async def test_timeout_becomes_store_error() -> None:
    s = Setup()
    s.store.fail = TimeoutError()
    with pytest.raises(StoreError) as caught:
        await s.cache.project_org("proj-prod")
    assert isinstance(caught.value.__cause__, TimeoutError)


async def test_stale_entry_served_on_error_within_stale_ttl() -> None:
    s = Setup(ttl=30, stale_ttl=300)
    await s.cache.memberships("alice")
    s.clock.advance(299.5)
    s.store.fail = StoreError("down")
    answer = await s.cache.memberships("alice")
    assert answer.value == (ACME,)
    assert answer.stale
    assert s.results == ["miss", "stale"]
    # The failure did not refresh the entry: it still ages and becomes unusable.
    s.clock.advance(0.5)
    with pytest.raises(StoreError):
        await s.cache.memberships("alice")
    assert s.results == ["miss", "stale", "miss"]


async def test_stale_served_on_timeout_too() -> None:
    s = Setup(ttl=30, stale_ttl=300)
    await s.cache.project_org("proj-prod")
    s.clock.advance(31)
    s.store.fail = TimeoutError()
    answer = await s.cache.project_org("proj-prod")
    assert answer.value == "acme" and answer.stale


async def test_no_stale_after_stale_ttl() -> None:
    s = Setup(ttl=30, stale_ttl=300)
    await s.cache.memberships("alice")
    s.clock.advance(300)
    s.store.fail = StoreError("down")
    with pytest.raises(StoreError):
        await s.cache.memberships("alice")
    assert s.results == ["miss", "miss"]


async def test_recovery_after_stale_gives_fresh_answer() -> None:
    s = Setup(ttl=30, stale_ttl=300)
    await s.cache.memberships("alice")
    s.clock.advance(40)
    s.store.fail = StoreError("down")
    assert (await s.cache.memberships("alice")).stale
    s.store.fail = None
    s.store.members["alice"] = (ACME_DEV,)
    answer = await s.cache.memberships("alice")
    assert answer.value == (ACME_DEV,) and not answer.stale


async def test_other_exceptions_propagate_unchanged() -> None:
    s = Setup()
    s.store.fail = RuntimeError("bug")
    with pytest.raises(RuntimeError):
        await s.cache.memberships("alice")


async def test_invalidate_one_user() -> None:
    s = Setup()
    s.store.members["bob"] = (ACME_DEV,)
    await s.cache.memberships("alice")
    await s.cache.memberships("bob")
    await s.cache.project_org("proj-prod")
    assert s.cache.invalidate("alice") == 1
    assert s.cache.invalidate("alice") == 0
    assert s.cache.invalidate("stranger") == 0
    assert len(s.cache) == 2
    s.store.members["alice"] = (ACME_DEV,)
    assert (await s.cache.memberships("alice")).value == (ACME_DEV,)
    await s.cache.memberships("bob")
    assert s.results[-2:] == ["miss", "hit"]


async def test_invalidated_user_gets_no_stale_answer() -> None:
    s = Setup()
    await s.cache.memberships("alice")
    s.cache.invalidate("alice")
    s.store.fail = StoreError("down")
    with pytest.raises(StoreError):
        await s.cache.memberships("alice")


async def test_invalidate_everything() -> None:
    s = Setup()
    await s.cache.memberships("alice")
    await s.cache.memberships("nobody")
    await s.cache.project_org("proj-prod")
    assert s.cache.invalidate() == 3
    assert len(s.cache) == 0
    await s.cache.project_org("proj-prod")
    assert s.store.calls["project:proj-prod"] == 2


async def test_invalidation_during_fetch_is_not_undone_by_the_old_answer() -> None:
    s = Setup()
    s.store.gate = asyncio.Event()
    old_lookup = asyncio.create_task(s.cache.memberships("alice"))
    await s.store.entered.wait()  # the store call has read the old roles and is in flight
    s.store.members["alice"] = (ACME_DEV,)  # role change...
    s.cache.invalidate("alice")  # ...announced while the old call is still running
    s.store.gate.set()
    old = await old_lookup
    assert old.value == (ACME,)  # that caller asked before the change
    assert len(s.cache) == 0  # but the old answer was not stored as fresh
    new = await s.cache.memberships("alice")
    assert new.value == (ACME_DEV,)
    assert s.store.calls["user:alice"] == 2


async def test_lookup_after_invalidation_does_not_join_the_old_flight() -> None:
    s = Setup()
    s.store.gate = asyncio.Event()
    old_lookup = asyncio.create_task(s.cache.memberships("alice"))
    await s.store.entered.wait()
    s.store.members["alice"] = (ACME_DEV,)
    s.cache.invalidate()  # everything, including in-flight calls
    new_lookup = asyncio.create_task(s.cache.memberships("alice"))
    await asyncio.sleep(0)
    s.store.gate.set()
    old, new = await asyncio.gather(old_lookup, new_lookup)
    assert old.value == (ACME,)
    assert new.value == (ACME_DEV,)
    assert s.store.calls["user:alice"] == 2
    s.results.clear()
    assert (await s.cache.memberships("alice")).value == (ACME_DEV,)
    assert s.results == ["hit"]


@pytest.mark.parametrize(
    "kwargs",
    [{"ttl": -1.0}, {"negative_ttl": -1.0}, {"stale_ttl": -1.0}, {"maxsize": 0}],
)
def test_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Setup(**kwargs)


async def test_equal_memberships_of_different_users_share_one_object() -> None:
    """Interning keeps a full cache small: 1,000 equal answers, one object."""
    from proxy.policy.model import Membership

    class Same:
        backend = "fake"

        async def open(self) -> None:
            return None

        async def memberships(self, user: str) -> tuple[Membership, ...]:
            return (Membership("acme", "enterprise", "developer"),)  # a new object each call

        async def project_org(self, project: str) -> str | None:
            return None

        async def ping(self) -> None:
            return None

        async def close(self) -> None:
            return None

    cache = RoleCache(Same())
    answers = [(await cache.memberships(f"u{i}")).value for i in range(1000)]
    assert len({id(a) for a in answers}) == 1
    assert len({id(a[0]) for a in answers}) == 1
    assert answers[0] == (Membership("acme", "enterprise", "developer"),)


async def test_fresh_fast_path_follows_ttl_and_invalidation() -> None:
    s = Setup(ttl=30, negative_ttl=5)
    s.store.members["alice"] = (ACME,)
    assert s.cache.fresh_memberships("alice") is None  # nothing cached yet: no report
    assert s.results == []
    await s.cache.memberships("alice")
    assert s.cache.fresh_memberships("alice") == (ACME,)
    assert s.results == ["miss", "hit"]
    await s.cache.project_org("nope")  # negative answer, fresh for 5 s
    assert s.cache.fresh_project_org("nope") == (None,)
    assert s.results[-1] == "negative"
    s.clock.advance(6)
    assert s.cache.fresh_project_org("nope") is None
    assert s.cache.fresh_memberships("alice") == (ACME,)
    s.cache.invalidate("alice")
    assert s.cache.fresh_memberships("alice") is None
    await s.cache.memberships("alice")
    s.clock.advance(31)
    assert s.cache.fresh_memberships("alice") is None
