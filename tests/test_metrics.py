"""Metrics batching: what flush() applies equals prometheus-client's own inc()/observe()."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, generate_latest

from proxy.metrics import DECISION_BUCKETS, REQUEST_BUCKETS, Metrics
from proxy.policy.model import Reason

ROUTE = "/api/projects/{project_id}/workflows"
# Every bucket bound exactly, values between bounds, below the first and above the last.
AMOUNTS = [*DECISION_BUCKETS, *REQUEST_BUCKETS, 0.0, 3e-6, 0.0007, 0.3, 75.0, 1e-5, 0.05]


def _exposition(registry: CollectorRegistry) -> list[str]:
    # _created timestamps differ between registries; everything else must be identical.
    return [
        line
        for line in generate_latest(registry).decode().splitlines()
        if "_created" not in line
    ]


def _record(metrics: Metrics) -> None:
    for amount in AMOUNTS:
        metrics.observe_decision(amount)
        metrics.observe_upstream(ROUTE, amount)
        metrics.count_request(ROUTE, "GET", "allow", Reason.ALLOWED, 200, amount)
        metrics.count_cache_lookup("hit")
    metrics.count_request(ROUTE, "BREW", "deny", Reason.NO_ROUTE, 404, 0.001)


def _direct(metrics: Metrics) -> None:
    """The same through prometheus-client's public API, one call per event."""
    for amount in AMOUNTS:
        metrics.decision_duration.observe(amount)
        metrics.upstream_duration.labels(ROUTE).observe(amount)
        metrics.requests.labels(ROUTE, "GET", "allow", "allowed", "200").inc()
        metrics.request_duration.labels(ROUTE).observe(amount)
        metrics.cache_requests.labels("hit").inc()
    metrics.requests.labels(ROUTE, "OTHER", "deny", "no_route", "404").inc()
    metrics.request_duration.labels(ROUTE).observe(0.001)


def test_without_a_loop_every_call_applies_at_once() -> None:
    batched, direct = CollectorRegistry(), CollectorRegistry()
    _record(Metrics(batched))
    _direct(Metrics(direct))
    assert _exposition(batched) == _exposition(direct)


def test_in_a_loop_one_iteration_is_applied_by_the_next() -> None:
    batched, direct = CollectorRegistry(), CollectorRegistry()
    metrics = Metrics(batched)
    _direct(Metrics(direct))

    async def scenario() -> None:
        _record(metrics)
        # Noted, not yet applied.
        assert batched.get_sample_value("rbac_proxy_decision_duration_seconds_count") == 0
        await asyncio.sleep(0)  # the flush scheduled with call_soon runs first
        assert _exposition(batched) == _exposition(direct)

    asyncio.run(scenario())


def test_flush_applies_what_is_pending() -> None:
    batched, direct = CollectorRegistry(), CollectorRegistry()
    metrics = Metrics(batched)
    _direct(Metrics(direct))

    async def scenario() -> None:
        _record(metrics)
        metrics.flush()  # shutdown does this after draining
        assert _exposition(batched) == _exposition(direct)

    asyncio.run(scenario())
