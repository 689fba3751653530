"""Regressions for the third review (performance branch: decision memo, one-write answers,
batched metrics, audit/Connection caches). Real proxy, raw sockets, loopback only."""

from __future__ import annotations

import gc
import tracemalloc

from tests.security.harness import Recorder, request, send_raw
from tests.web.conftest import Proxy

# --- 1. hostile Connection headers must not be kept by the connection_names cache ----------


def _hostile_connection_lines(i: int) -> list[str]:
    """~120 Connection lines of ~8 KB, each listing distinct tokens (~1 MB of head)."""
    lines = []
    for j in range(120):
        tokens = ",".join(f"t{i}x{j}x{k}" for k in range(600))
        lines.append("Connection: " + tokens[:8000])
    return lines


async def test_hostile_connection_headers_are_not_retained(
    recorder: Recorder, guarded: Proxy
) -> None:
    # /healthz is public: no identity needed. Each request used to leave its ~1 MB Connection
    # values and a frozenset of ~100k tokens in an lru_cache of 256 entries (about 7 MB per
    # request, ~1.9 GB per worker once full).
    port = guarded.server.proxy_port
    requests = 6
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(requests):
            reply = await send_raw(
                port,
                request("/healthz", user=None, headers=_hostile_connection_lines(i)),
                quiet=2,
                limit=20,
            )
            assert reply.status == 200, reply.data[:200]
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(recorder.requests) == requests
    # Without the fix: ~40 MB retained for 6 requests; with it, a few hundred KB.
    assert retained < 8 * 2**20, f"{retained / 2**20:.1f} MB retained after {requests} requests"


# --- 2. a memo hit answered 503 while draining must not count role-cache lookups -----------


def _cache_hits(proxy: Proxy) -> float:
    rt = proxy.server.runtime
    rt.metrics.flush()
    value = rt.metrics.registry.get_sample_value(
        "rbac_proxy_role_cache_requests_total", {"result": "hit"}
    )
    return value or 0.0


async def test_draining_memo_hit_counts_no_cache_lookup(recorder: Recorder, guarded: Proxy) -> None:
    port = guarded.server.proxy_port
    for _ in range(3):  # miss, fresh hit (memo stored), memo hit
        reply = await send_raw(port, request("/api/org/billing", user="alice"), quiet=0.2)
        assert reply.status == 200
    before = _cache_hits(guarded)
    guarded.server.runtime.draining = True
    try:
        reply = await send_raw(port, request("/api/org/billing", user="alice"), quiet=0.2)
        assert reply.status == 503
        # The full pipeline answers draining before any role lookup; the memo must too.
        assert _cache_hits(guarded) == before
    finally:
        guarded.server.runtime.draining = False
    reply = await send_raw(port, request("/api/org/billing", user="alice"), quiet=0.2)
    assert reply.status == 200
    assert _cache_hits(guarded) == before + 1  # memo hits are still reported as cache hits
