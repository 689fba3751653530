"""Tests for proxy.stores.guard: timeout, circuit breaker states, observation, delegation."""

from __future__ import annotations

import asyncio

import pytest

from proxy.policy.model import Membership
from proxy.stores.base import RoleStore, StoreError, StoreRefused
from proxy.stores.guard import GuardedStore
from tests.fakes import FakeClock

ACME = Membership(org="acme", plan="enterprise", role="admin")



class FakeStore:
    """Inner store whose behaviour a test switches: ok, fail, hang, crash."""

    backend = "fake"

    def __init__(self) -> None:
        self.mode = "ok"
        self.calls = 0
        self.pings = 0
        self.opened = False
        self.closed = False
        self.gate: asyncio.Event | None = None
        self.on_invalidate = None

    async def _behave(self) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.mode == "fail":
            raise StoreError("down")
        if self.mode == "refuse":
            raise StoreRefused("400 for this key")
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "crash":
            raise KeyError("backend bug")

    async def memberships(self, user: str) -> tuple[Membership, ...]:
        await self._behave()
        return (ACME,) if user == "alice" else ()

    async def project_org(self, project: str) -> str | None:
        await self._behave()
        return "acme" if project == "proj-prod" else None

    async def open(self) -> None:
        self.opened = True

    async def ping(self) -> None:
        self.pings += 1
        if self.mode == "fail":
            raise StoreError("down")
        if self.mode == "refuse":
            raise StoreRefused("400 for this key")
        if self.mode == "hang":
            await asyncio.sleep(3600)

    async def close(self) -> None:
        self.closed = True


Observed = list[tuple[str, float, bool]]


def make(
    inner: FakeStore, clock: FakeClock, observed: Observed | None = None, **kw: float
) -> GuardedStore:
    def observe(backend: str, seconds: float, failed: bool) -> None:
        if observed is not None:
            observed.append((backend, seconds, failed))

    threshold = int(kw.pop("failure_threshold", 3))
    return GuardedStore(
        inner,
        timeout=kw.pop("timeout", 0.05),
        failure_threshold=threshold,
        reset_after=kw.pop("reset_after", 10.0),
        clock=clock,
        observe=observe,
    )


def state(guard: GuardedStore) -> str:
    """Read the state afresh (a plain str, so mypy does not narrow it across awaits)."""
    return guard.state


async def fail_times(guard: GuardedStore, n: int) -> None:
    for _ in range(n):
        with pytest.raises(StoreError):
            await guard.memberships("alice")


def test_satisfies_the_role_store_protocol() -> None:
    guard: RoleStore = GuardedStore(FakeStore(), timeout=1)
    assert guard.backend == "fake"


async def test_passes_answers_through_and_observes_each_call() -> None:
    inner, clock = FakeStore(), FakeClock(100.0)
    observed: Observed = []
    guard = make(inner, clock, observed)
    assert await guard.memberships("alice") == (ACME,)
    assert await guard.memberships("nobody") == ()
    assert await guard.project_org("proj-prod") == "acme"
    assert await guard.project_org("nope") is None
    assert [(b, f) for b, _, f in observed] == [("fake", False)] * 4
    assert all(seconds >= 0 for _, seconds, _ in observed)
    assert state(guard) == "closed"


async def test_timeout_becomes_store_error_and_counts_as_failure() -> None:
    inner, clock = FakeStore(), FakeClock(100.0)
    observed: Observed = []
    inner.mode = "hang"
    guard = make(inner, clock, observed, timeout=0.05)
    with pytest.raises(StoreError, match="timed out"):
        await guard.memberships("alice")
    assert observed[-1][0] == "fake" and observed[-1][2] is True
    with pytest.raises(StoreError, match="timed out"):
        await guard.project_org("proj-prod")


async def test_unexpected_backend_exception_becomes_store_error() -> None:
    inner, clock = FakeStore(), FakeClock(100.0)
    observed: Observed = []
    inner.mode = "crash"
    guard = make(inner, clock, observed)
    with pytest.raises(StoreError) as info:
        await guard.memberships("alice")
    assert isinstance(info.value.__cause__, KeyError)
    assert observed[-1][2] is True


async def test_circuit_opens_after_threshold_and_fails_fast_without_calling() -> None:
    inner, clock = FakeStore(), FakeClock(100.0)
    observed: Observed = []
    inner.mode = "fail"
    guard = make(inner, clock, observed, failure_threshold=3)
    await fail_times(guard, 2)
    assert state(guard) == "closed"
    await fail_times(guard, 1)
    assert state(guard) == "open"
    assert inner.calls == 3
    inner.mode = "ok"  # even a healthy store is not asked while the circuit is open
    for _ in range(50):
        with pytest.raises(StoreError, match="circuit open"):
            await guard.memberships("alice")
        with pytest.raises(StoreError, match="circuit open"):
            await guard.project_org("proj-prod")
    assert inner.calls == 3
    assert len(observed) == 3  # rejected calls are not store calls


async def test_success_resets_the_consecutive_failure_count() -> None:
    inner, clock = FakeStore(), FakeClock(100.0)
    guard = make(inner, clock, failure_threshold=3)
    inner.mode = "fail"
    await fail_times(guard, 2)
    inner.mode = "ok"
    assert await guard.memberships("alice") == (ACME,)
    inner.mode = "fail"
    await fail_times(guard, 2)
    assert state(guard) == "closed"


async def test_half_open_trial_success_closes_the_circuit() -> None:
    inner, clock = FakeStore(), FakeClock(100.0)
    guard = make(inner, clock, failure_threshold=2, reset_after=5.0)
    inner.mode = "fail"
    await fail_times(guard, 2)
    clock.advance(4.9)
    assert state(guard) == "open"
    with pytest.raises(StoreError, match="circuit open"):
        await guard.memberships("alice")
    clock.advance(0.1)
    assert state(guard) == "half_open"
    inner.mode = "ok"
    assert await guard.memberships("alice") == (ACME,)
    assert state(guard) == "closed"
    assert inner.calls == 3
    # Closed again: a fresh run of failures is needed to reopen.
    inner.mode = "fail"
    await fail_times(guard, 1)
    assert state(guard) == "closed"


async def test_half_open_trial_failure_reopens_for_another_period() -> None:
    inner, clock = FakeStore(), FakeClock(100.0)
    guard = make(inner, clock, failure_threshold=2, reset_after=5.0)
    inner.mode = "fail"
    await fail_times(guard, 2)
    clock.advance(5.0)
    with pytest.raises(StoreError, match="down"):  # the trial reached the store
        await guard.memberships("alice")
    assert inner.calls == 3
    assert state(guard) == "open"
    clock.advance(4.0)
    with pytest.raises(StoreError, match="circuit open"):
        await guard.memberships("alice")
    assert inner.calls == 3
    clock.advance(1.0)
    inner.mode = "ok"
    assert await guard.memberships("alice") == (ACME,)
    assert state(guard) == "closed"


async def test_only_one_trial_runs_while_half_open() -> None:
    inner, clock = FakeStore(), FakeClock(100.0)
    guard = make(inner, clock, failure_threshold=1, reset_after=1.0)
    inner.mode = "fail"
    await fail_times(guard, 1)
    clock.advance(1.0)
    inner.mode = "ok"
    inner.gate = asyncio.Event()
    trial = asyncio.create_task(guard.memberships("alice"))
    await asyncio.sleep(0)
    assert inner.calls == 2
    assert state(guard) == "half_open"
    for _ in range(10):
        with pytest.raises(StoreError, match="circuit open"):
            await guard.memberships("alice")
    assert inner.calls == 2
    inner.gate.set()
    assert await trial == (ACME,)
    assert state(guard) == "closed"
    assert await guard.memberships("alice") == (ACME,)


async def test_cancelled_trial_hands_the_slot_back() -> None:
    inner, clock = FakeStore(), FakeClock(100.0)
    observed: Observed = []
    guard = make(inner, clock, observed, failure_threshold=1, reset_after=1.0)
    inner.mode = "fail"
    await fail_times(guard, 1)
    clock.advance(1.0)
    inner.gate = asyncio.Event()
    trial = asyncio.create_task(guard.memberships("alice"))
    await asyncio.sleep(0)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert len(observed) == 1  # the cancelled call gave no verdict
    inner.gate = None
    inner.mode = "ok"
    assert await guard.memberships("alice") == (ACME,)
    assert state(guard) == "closed"


async def test_ping_bypasses_the_breaker_but_has_the_timeout() -> None:
    inner, clock = FakeStore(), FakeClock(100.0)
    observed: Observed = []
    guard = make(inner, clock, observed, failure_threshold=1, timeout=0.05)
    inner.mode = "fail"
    await fail_times(guard, 1)
    assert state(guard) == "open"
    inner.mode = "ok"
    await guard.ping()  # reaches the store although the circuit is open
    assert inner.pings == 1
    inner.mode = "hang"
    with pytest.raises(StoreError, match="timed out"):
        await guard.ping()
    inner.mode = "fail"
    with pytest.raises(StoreError):
        await guard.ping()
    assert len(observed) == 1  # pings are not lookups
    assert state(guard) == "open"


async def test_open_and_close_delegate_and_inner_is_exposed() -> None:
    inner = FakeStore()
    guard = GuardedStore(inner, timeout=1)
    assert guard.inner is inner
    await guard.open()
    await guard.close()
    assert inner.opened and inner.closed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": 1, "failure_threshold": 0}, "failure_threshold"),
        ({"timeout": 1, "reset_after": -1}, "reset_after"),
    ],
)
def test_rejects_nonsense_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GuardedStore(FakeStore(), **kwargs)  # type: ignore[arg-type]


async def test_refused_keys_never_open_the_circuit() -> None:
    """Review finding: ids the store refuses (HTTP 400) must not switch it off for everyone."""
    inner = FakeStore()
    guard = GuardedStore(inner, timeout=1.0, failure_threshold=2, clock=FakeClock(100.0))
    inner.mode = "refuse"
    for _ in range(10):
        with pytest.raises(StoreRefused):
            await guard.project_org("a.b")
    assert guard.state == "closed"
    inner.mode = "ok"
    assert await guard.memberships("alice") == (ACME,)
