"""Wraps a network role store with a per-call timeout, a circuit breaker and call metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

from proxy.policy.model import Membership
from proxy.stores.base import RoleStore, StoreError, StoreRefused

T = TypeVar("T")
CircuitState = Literal["closed", "open", "half_open"]
Observe = Callable[[str, float, bool], None]  # (backend, seconds, failed)

log = logging.getLogger("rbac_proxy.store")


class GuardedStore:
    """A RoleStore around `inner`: every lookup is bounded in time and a dead store is spared.

    Circuit breaker: after `failure_threshold` consecutive failed lookups the circuit opens
    and lookups fail at once with StoreError("circuit open") for `reset_after` seconds, so a
    dead store is not hammered by every request (the cache serves stale entries meanwhile).
    Then ONE trial lookup goes through (half-open) while the others keep failing fast; its
    success closes the circuit, its failure opens it again for another `reset_after`.
    """

    def __init__(
        self,
        inner: RoleStore,
        *,
        timeout: float,
        failure_threshold: int = 5,
        reset_after: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        observe: Observe | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("store timeout must be positive")
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_after < 0:
            raise ValueError("reset_after must not be negative")
        self.inner = inner
        self.backend: str = inner.backend
        self.timeout = timeout
        # Public so operators' tooling and tests can tune them on a running proxy.
        self.failure_threshold = failure_threshold
        self.reset_after = reset_after
        self._clock = clock
        self._observe = observe
        self._failures = 0  # consecutive failed lookups
        self._opened_at: float | None = None  # None: the circuit is closed
        self._trial_running = False

    @property
    def state(self) -> CircuitState:
        """The circuit: closed, open, or half_open (a trial lookup is running or may start)."""
        if self._opened_at is None:
            return "closed"
        if self._trial_running or self._clock() - self._opened_at >= self.reset_after:
            return "half_open"
        return "open"

    async def memberships(self, user: str) -> tuple[Membership, ...]:
        return await self._call(lambda: self.inner.memberships(user))

    async def project_org(self, project: str) -> str | None:
        return await self._call(lambda: self.inner.project_org(project))

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def ping(self) -> None:
        """Readiness asks the store itself: no breaker (an open circuit must not hide a
        recovered store from readyz), but the same timeout, and not counted as a lookup."""
        try:
            async with asyncio.timeout(self.timeout):
                await self.inner.ping()
        except TimeoutError:
            raise StoreError(f"role store ping timed out after {self.timeout:g}s") from None

    async def _call(self, lookup: Callable[[], Awaitable[T]]) -> T:
        trial = self._admit()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                value = await lookup()
        except TimeoutError:
            self._failed(trial, started)
            raise StoreError(
                f"role store timed out after {self.timeout:g}s ({self.backend})"
            ) from None
        except StoreRefused:
            self._succeeded(started)  # the store is up and answering: one question refused
            raise
        except StoreError:
            self._failed(trial, started)
            raise
        except Exception as exc:
            # A backend bug is still "no usable answer": fail closed (503), never 500, but
            # keep the traceback for whoever fixes the backend.
            self._failed(trial, started)
            log.exception("role store %s raised an unexpected error", self.backend)
            raise StoreError(f"role store error ({self.backend}): {type(exc).__name__}") from exc
        except BaseException:
            # Cancelled from outside: no verdict on the store and nothing observed; a trial
            # slot is handed back so the next lookup can be the trial.
            if trial:
                self._trial_running = False
            raise
        self._succeeded(started)
        return value

    def _admit(self) -> bool:
        """Let a lookup through, or raise StoreError("circuit open"). True for the trial."""
        if self._opened_at is None:
            return False
        if self._trial_running or self._clock() - self._opened_at < self.reset_after:
            raise StoreError(f"circuit open ({self.backend})")
        self._trial_running = True
        return True

    def _succeeded(self, started: float) -> None:
        self._report(started, failed=False)
        self._failures = 0
        if self._opened_at is not None:
            # Any answer proves the store is back, the trial's or a late one from before.
            log.info("role store %s answered again, circuit closed", self.backend)
        self._opened_at = None
        self._trial_running = False

    def _failed(self, trial: bool, started: float) -> None:
        self._report(started, failed=True)
        self._failures += 1
        if trial:
            self._trial_running = False
            self._opened_at = self._clock()
            log.warning("role store %s: trial lookup failed, circuit open again", self.backend)
        elif self._opened_at is None and self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
            log.warning(
                "role store %s: %d consecutive failures, circuit open for %gs",
                self.backend,
                self._failures,
                self.reset_after,
            )

    def _report(self, started: float, *, failed: bool) -> None:
        if self._observe is not None:
            self._observe(self.backend, time.perf_counter() - started, failed)
