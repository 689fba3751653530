"""The typed state one proxy process runs with: settings, policy, identity, cache, metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import ClientSession
from yarl import URL

from proxy.audit import AuditLog
from proxy.config import PolicyHolder
from proxy.identity import Authenticator, TrustedProxies
from proxy.metrics import Metrics
from proxy.settings import Settings
from proxy.stores.base import RoleStore
from proxy.stores.cache import RoleCache
from proxy.web.forward import HeaderPolicy
from proxy.web.upstream import UpstreamPool


@dataclass(eq=False)
class Runtime:
    settings: Settings
    routes: PolicyHolder
    authenticator: Authenticator
    store: RoleStore
    cache: RoleCache
    metrics: Metrics
    audit: AuditLog
    trusted: TrustedProxies
    headers: HeaderPolicy
    upstream: URL
    session: ClientSession | None = None  # opened on startup, inside the running loop
    # The lean HTTP client (proxy/web/upstream.py); None = every request uses `session`.
    upstream_pool: UpstreamPool | None = None
    draining: bool = False
    store_reachable: bool = True
    inflight: int = field(default=0)
