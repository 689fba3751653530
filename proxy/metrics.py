"""Every Prometheus metric of SPEC §9, built against an injected registry."""

from __future__ import annotations

import asyncio
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy import __version__
from proxy.policy.model import STATUS, Reason

# Decisions are sub-millisecond; requests and upstream calls span ms to tens of seconds.
DECISION_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05,
)  # fmt: skip
REQUEST_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Methods outside this set are counted as "OTHER" so hostile traffic cannot grow label sets.
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)
NO_ROUTE_LABEL = "(none)"  # route label when no route matched (never the raw path)
_FORWARDED = frozenset({Reason.ALLOWED, Reason.PUBLIC, Reason.SHADOW_DENY})


class Metrics:
    """The metric catalogue. One instance per registry; tests build as many as they like."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "rbac_proxy_requests",
            "Requests by route template, method, decision, reason and status code.",
            ["route", "method", "decision", "reason", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "rbac_proxy_request_duration_seconds",
            "Time from request received to response finished, by route template.",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.decision_duration = Histogram(
            "rbac_proxy_decision_duration_seconds",
            "Time spent deciding (canonicalize, match, authenticate, resolve, decide).",
            buckets=DECISION_BUCKETS,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "rbac_proxy_upstream_duration_seconds",
            "Time from sending upstream to the upstream's response headers.",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "rbac_proxy_upstream_errors",
            "Upstream failures by kind (connect, timeout, disconnect, broken mid-response).",
            ["kind"],
            registry=registry,
        )
        self.cache_requests = Counter(
            "rbac_proxy_role_cache_requests",
            "Role cache lookups by result.",
            ["result"],
            registry=registry,
        )
        self.cache_entries = Gauge(
            "rbac_proxy_role_cache_entries",
            "Entries in the role cache.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.store_duration = Histogram(
            "rbac_proxy_role_store_duration_seconds",
            "Role store call latency by backend.",
            ["backend"],
            buckets=STORE_BUCKETS,
            registry=registry,
        )
        self.store_errors = Counter(
            "rbac_proxy_role_store_errors",
            "Role store failures by backend.",
            ["backend"],
            registry=registry,
        )
        self.config_reloads = Counter(
            "rbac_proxy_config_reloads",
            "Configuration reload attempts by file and result.",
            ["file", "result"],
            registry=registry,
        )
        self.config_last_success = Gauge(
            "rbac_proxy_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful load of each file.",
            ["file"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.config_last_ok = Gauge(
            "rbac_proxy_config_last_reload_successful",
            "1 when the last load of the file succeeded, 0 when it failed (old one kept).",
            ["file"],
            registry=registry,
            multiprocess_mode="min",
        )
        self.config_routes = Gauge(
            "rbac_proxy_config_routes",
            "Routes in the active table.",
            registry=registry,
            multiprocess_mode="max",
        )
        self.inflight = Gauge(
            "rbac_proxy_inflight_requests",
            "Requests being handled.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.build_info = Gauge(
            "rbac_proxy_build_info",
            "Build information.",
            ["version"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__).set(1)
        for kind in ("connect", "timeout", "disconnect", "broken"):
            self.upstream_errors.labels(kind)
        # Every reason exists from the start (as route "(none)"), so `sum by (reason)`
        # panels and rate() alerts show 0 instead of "no data" until the first occurrence.
        for reason in Reason:
            verdict = "allow" if reason in _FORWARDED else "deny"
            code = "200" if reason in _FORWARDED else str(STATUS[reason])
            self.requests.labels(NO_ROUTE_LABEL, "GET", verdict, reason.value, code)
        # Pre-bound children: the hot path looks up a tuple in a dict, not labels() each time.
        self._request_children: dict[tuple[str, str, str, str, int], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}
        self._upstream_children: dict[str, Histogram] = {}
        self._cache_children = {
            r: self.cache_requests.labels(r) for r in ("hit", "miss", "stale", "negative")
        }
        # The per-request counters and histograms are batched: each call only notes what to
        # add, and flush() applies one loop iteration's worth at the end of that iteration
        # (prometheus-client takes a lock per inc(), and a histogram walks its buckets in
        # Python: ~15 µs a request on this path). Scraping happens on a later iteration, so it
        # always sees everything counted before it.
        self._counts: dict[Counter, int] = {}
        self._observed: list[tuple[Histogram, float]] = []
        self._flush_pending = False

    def count_cache_lookup(self, result: str) -> None:
        child = self._cache_children[result]
        self._counts[child] = self._counts.get(child, 0) + 1
        if not self._flush_pending:
            self._schedule_flush()

    def observe_decision(self, seconds: float) -> None:
        self._observed.append((self.decision_duration, seconds))
        if not self._flush_pending:
            self._schedule_flush()

    def observe_upstream(self, route: str, seconds: float) -> None:
        hist = self._upstream_children.get(route)
        if hist is None:
            hist = self._upstream_children[route] = self.upstream_duration.labels(route)
        self._observed.append((hist, seconds))
        if not self._flush_pending:
            self._schedule_flush()

    def count_request(
        self, route: str, method: str, decision: str, reason: Reason, code: int, seconds: float
    ) -> None:
        method = method if method in KNOWN_METHODS else "OTHER"
        key = (route, method, decision, reason.value, code)
        child = self._request_children.get(key)
        if child is None:
            child = self.requests.labels(route, method, decision, reason.value, str(code))
            self._request_children[key] = child
        self._counts[child] = self._counts.get(child, 0) + 1
        hist = self._duration_children.get(route)
        if hist is None:
            hist = self.request_duration.labels(route)
            self._duration_children[route] = hist
        self._observed.append((hist, seconds))
        if not self._flush_pending:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (tests, command-line use): apply at once
            self.flush()
            return
        self._flush_pending = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Apply the batched increments and observations (also called on shutdown)."""
        self._flush_pending = False
        counts, self._counts = self._counts, {}
        observed, self._observed = self._observed, []
        for counter, n in counts.items():
            counter.inc(n)
        if not observed:
            return
        # Histogram.observe(x) adds x to _sum and 1 to the first bucket whose bound is >= x;
        # the same done once per bucket for the batch. These are prometheus-client internals
        # (stable since 0.4); tests/test_metrics.py compares the result with observe().
        per_hist: dict[Histogram, list[float]] = {}
        for hist, seconds in observed:
            amounts = per_hist.get(hist)
            if amounts is None:
                per_hist[hist] = [seconds]
            else:
                amounts.append(seconds)
        for hist, amounts in per_hist.items():
            bounds = hist._upper_bounds
            buckets = hist._buckets
            hits: dict[int, int] = {}
            total = 0.0
            for amount in amounts:
                total += amount
                i = bisect_left(bounds, amount)
                hits[i] = hits.get(i, 0) + 1
            hist._sum.inc(total)
            for i, n in hits.items():
                buckets[i].inc(n)
