"""The role store interface the proxy consumes, and the one error every backend raises."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from proxy.policy.model import Membership


class StoreError(Exception):
    """The store gave no usable answer: unreachable, timed out, or answered garbage.

    Callers fail closed on it (SPEC §2 step 5: 503 store_unavailable), so a backend must
    never turn a failure into an empty answer: () and None mean "really no membership".
    """


class StoreRefused(StoreError):
    """The store answered this one question with a client error (e.g. HTTP 400 for an id it
    rejects): still no usable answer (503, fail closed), but not evidence that the store is
    down, so it does not count towards the circuit breaker. Otherwise any caller could open
    the breaker for everyone by asking about ids the store refuses."""


class RoleStore(Protocol):
    """What the proxy asks a role store (SPEC §6); backends satisfy it structurally."""

    backend: str  # "file" | "postgresql" | "http": the bounded metric label

    async def memberships(self, user: str) -> tuple[Membership, ...]:
        """Every org the user belongs to; () when the user is a member of nothing."""
        ...

    async def project_org(self, project: str) -> str | None:
        """The org that owns the project; None when the project is unknown."""
        ...

    async def open(self) -> None:
        """Connect inside the running loop. An unreachable store must not raise here: the
        proxy starts unready (readyz 503, requests 503) and heals when the store comes up."""
        ...

    async def ping(self) -> None:
        """Return when the store can answer; raise StoreError when it cannot (readyz)."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


@runtime_checkable
class PushesInvalidations(Protocol):
    """A store that learns of role changes (PostgreSQL LISTEN) and tells the cache at once."""

    on_invalidate: Callable[[str | None], object] | None  # user id, or None for everything
