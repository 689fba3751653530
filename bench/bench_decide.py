"""Benchmark of the pure decision core: canonicalize + match + decide per request, by table size.

Run: .venv/bin/python bench/bench_decide.py [--runs 7] [--decisions 20000] [--sizes 50,1000,10000]

For each route-table size a routes.yaml is generated (realistic shapes: project resources with
list/create/read/update/delete/run/history routes, org-level literals, public routes) and
compiled with the real compiler; 4,000 requests spread uniformly over the table's routes, from
an admin, a developer and a per-project user, are decided again and again. Memberships are
already in memory (as after a role-cache hit): what is measured is the work per request that
does not wait on I/O. The sizes are timed round-robin; a control row times the largest table
with the smallest table's requests. Prints ns per decision (median of the rounds) and the
10,000 / 50 ratio. Results and their discussion: docs/benchmarks.md."""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

# Standalone: `python bench/bench_decide.py` puts bench/ (not the repo root) on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.policy.canonical import canonicalize
from proxy.policy.compile import compile_policy
from proxy.policy.decide import authorize, route_request
from proxy.policy.model import Decision, Identity, Membership, Policy, Reason
from proxy.yamlsource import parse_yaml

SEED = 20240601
FAMILIES = 24  # permission families: real policies have far fewer permissions than routes
VERBS = ("read", "write", "delete", "run")
PROJECTS = tuple(f"proj-{i}" for i in range(200))
REQUESTS_PER_TABLE = 4000

HEADER = """\
version: 1
default: deny
mode: enforce
roles:
  admin:
    description: Organization Admin
    permissions: ["*"]
  developer:
    permissions: [{developer}]
  support:
    permissions: [{support}]
plans:
  enterprise: {{roles: [admin, developer, support], project_bindings: true}}
  "*": {{roles: [admin, developer], project_bindings: false}}
routes:
  - {{path: /healthz, methods: [GET], public: true}}
  - path: /static/{{path*}}
    methods: [GET]
    public: true
  - {{path: /api/org, methods: [GET], authenticated: true}}
  - {{path: /api/projects, methods: [GET], authenticated: true}}
"""
BASE_ROUTES = 4  # the routes in HEADER


def route_specs(count: int) -> list[tuple[str, tuple[str, ...], str]]:
    """`count` (template, methods, permission) triples: 8 routes per resource, then org literals."""
    specs: list[tuple[str, tuple[str, ...], str]] = []
    resource = 0
    while len(specs) < count - BASE_ROUTES:
        name = f"resource-{resource}"
        fam = f"fam{resource % FAMILIES}"
        p = f"/api/projects/{{project_id}}/{name}"
        specs += [
            (p, ("GET",), f"{fam}:read"),
            (p, ("POST",), f"{fam}:write"),
            (f"{p}/{{item_id}}", ("GET",), f"{fam}:read"),
            (f"{p}/{{item_id}}", ("PUT", "PATCH"), f"{fam}:write"),
            (f"{p}/{{item_id}}", ("DELETE",), f"{fam}:delete"),
            (f"{p}/{{item_id}}/run", ("POST",), f"{fam}:run"),
            (f"{p}/{{item_id}}/history/{{entry_id}}", ("GET",), f"{fam}:read"),
            (f"/api/org/{name}/settings", ("GET", "PUT"), f"{fam}:write"),
        ]
        resource += 1
    return specs[: count - BASE_ROUTES]


def routes_yaml(count: int) -> str:
    developer = ", ".join(f'"fam{i}:*"' for i in range(FAMILIES) if i % 4 != 3)
    support = ", ".join(f"fam{i}:read" for i in range(FAMILIES))
    lines = [HEADER.format(developer=developer, support=support)]
    for template, methods, permission in route_specs(count):
        lines.append(
            f"  - path: {template}\n    methods: [{', '.join(methods)}]\n"
            f"    permission: {permission}\n"
        )
    return "".join(lines)


def concrete(template: str, rng: random.Random) -> str:
    parts = []
    for segment in template.split("/")[1:]:
        if segment == "{project_id}":
            parts.append(rng.choice(PROJECTS))
        elif segment == "{path*}":
            parts.append("js/app.js")
        elif segment.startswith("{"):
            parts.append(f"x{rng.randrange(10**6)}")
        else:
            parts.append(segment)
    path = "/" + "/".join(parts)
    return path + ("?page=2&limit=50" if rng.random() < 0.25 else "")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    identity: Identity


def make_requests(policy: Policy, rng: random.Random) -> list[Request]:
    """Requests spread over the whole table (uniformly over routes), from three kinds of user."""
    users = (Identity("alice"), Identity("bob"), Identity("carol"), Identity("bob", "acme"))
    requests = []
    for _ in range(REQUESTS_PER_TABLE):
        route = rng.choice(policy.routes)
        assert route.methods is not None
        method = rng.choice(sorted(route.methods))
        requests.append(Request(method, concrete(route.template, rng), rng.choice(users)))
    return requests


MEMBERSHIPS = MappingProxyType(
    {
        "alice": (Membership("acme", "enterprise", "admin"),),
        "bob": (Membership("acme", "enterprise", "developer"),),
        "carol": (
            Membership(
                "acme",
                "enterprise",
                None,
                MappingProxyType({p: "developer" for p in PROJECTS[::2]}),
            ),
        ),
    }
)
PROJECT_ORG = MappingProxyType(dict.fromkeys(PROJECTS, "acme"))


def decide_one(policy: Policy, request: Request) -> Decision:
    """One request through canonicalize → match → decide, as the proxy handler does it."""
    target = canonicalize(request.target, allow_semicolons=policy.allow_semicolons)
    routed = route_request(policy, request.method, target, None)
    if isinstance(routed, Decision):
        return routed
    route = routed.route
    project = routed.params.get(route.project_param) if route.project_param else None
    project_org = PROJECT_ORG.get(project) if project is not None else None
    memberships = MEMBERSHIPS.get(request.identity.user, ())
    return authorize(policy, routed, request.identity, memberships, project_org)


def match_one(policy: Policy, request: Request) -> object:
    """canonicalize + match only, to show which part of the cost grows with the table."""
    target = canonicalize(request.target, allow_semicolons=policy.allow_semicolons)
    return policy.matcher.match(request.method, target.segments)


@dataclass(slots=True)
class Table:
    """One generated route table, its requests, and the timings collected for it."""

    label: str
    policy: Policy
    requests: list[Request]
    compile_s: float
    match_ns: list[float] = field(default_factory=list)  # canonicalize + match, wall
    wall_ns: list[float] = field(default_factory=list)  # whole decision, wall clock
    cpu_ns: list[float] = field(default_factory=list)  # whole decision, process CPU time


def time_once(
    step: Callable[[Policy, Request], object], table: Table, decisions: int
) -> tuple[float, float]:
    """(wall, CPU) ns per call over about `decisions` calls of `step` on the table's requests.

    CPU time is reported beside wall time because a shared machine preempts the process:
    wall time then also counts other processes' time slices, CPU time does not.
    """
    loops = max(1, decisions // len(table.requests))
    gc.collect()
    start, start_cpu = time.perf_counter_ns(), time.process_time_ns()
    for _ in range(loops):
        for request in table.requests:
            step(table.policy, request)
    calls = loops * len(table.requests)
    return (
        (time.perf_counter_ns() - start) / calls,
        (time.process_time_ns() - start_cpu) / calls,
    )


def build_table(size: int) -> Table:
    text = routes_yaml(size)
    start = time.perf_counter()
    policy = compile_policy(parse_yaml(text, f"bench-{size}.yaml"), f"bench-{size}.yaml")
    compile_s = time.perf_counter() - start
    assert len(policy.routes) == size, len(policy.routes)
    return Table(f"{size:,}", policy, make_requests(policy, random.Random(SEED)), compile_s)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=7, help="timed rounds (median of)")
    parser.add_argument("--decisions", type=int, default=20_000, help="decisions per run")
    parser.add_argument("--sizes", default="50,1000,10000", help="route-table sizes")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.runs < 1 or any(s <= BASE_ROUTES for s in sizes):
        parser.error(f"--runs must be >= 1 and every size > {BASE_ROUTES}")

    print(
        f"# {time.strftime('%Y-%m-%d %H:%M %Z')}; nproc {os.cpu_count()}; {cpu_model()}; "
        f"Python {platform.python_version()} ({platform.python_implementation()}); "
        f"load average {os.getloadavg()[0]:.2f} (other processes share the CPUs when > 0)"
    )
    print(
        f"# {args.runs} rounds, each timing ~{args.decisions:,} decisions per table; "
        f"{REQUESTS_PER_TABLE:,} generated requests per table"
    )
    tables = [build_table(size) for size in sizes]
    # Control: the largest table answering the smallest table's requests. Its template set
    # contains the small one's, so the requests route the same; only the table size differs.
    control = Table(
        f"{sizes[-1]:,}, requests of the {sizes[0]:,} table",
        tables[-1].policy,
        tables[0].requests,
        0.0,
    )
    everything = [*tables, control]
    for table in everything:
        for request in table.requests:  # warm-up, and a sanity check of the request mix
            decision = decide_one(table.policy, request)
            assert decision.reason is not Reason.NO_ROUTE, request
    # Sizes are timed round-robin, so that load from other processes during the run falls on
    # every size alike instead of on whichever size happened to be running.
    for _ in range(args.runs):
        for table in everything:
            table.match_ns.append(time_once(match_one, table, args.decisions)[0])
            wall, cpu = time_once(decide_one, table, args.decisions)
            table.wall_ns.append(wall)
            table.cpu_ns.append(cpu)

    print(
        "| routes | compile s | routes hit | allowed/denied | canonicalize+match ns | "
        "decision ns: median | min | max | decision ns, CPU time: median |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    med = statistics.median
    for table in everything:
        outcomes = [decide_one(table.policy, r) for r in table.requests]
        allowed = sum(d.forward for d in outcomes)
        hit = len({(d.route.template, d.route.methods) for d in outcomes if d.route})
        compiled = "(same)" if table is control else f"{table.compile_s:.2f}"
        print(
            f"| {table.label} | {compiled} | {hit:,} | "
            f"{allowed}/{len(outcomes) - allowed} | {med(table.match_ns):,.0f} | "
            f"{med(table.wall_ns):,.0f} | {min(table.wall_ns):,.0f} | "
            f"{max(table.wall_ns):,.0f} | {med(table.cpu_ns):,.0f} |"
        )
    print()
    by_size = dict(zip(sizes, tables, strict=True))
    if 50 in by_size and 10_000 in by_size:
        small, large = by_size[50], by_size[10_000]
        per_round = [a / b for a, b in zip(large.wall_ns, small.wall_ns, strict=True)]
        print(
            "ratio 10,000 / 50 routes, median ns per decision: "
            f"{med(large.wall_ns) / med(small.wall_ns):.2f} (wall), "
            f"{med(large.cpu_ns) / med(small.cpu_ns):.2f} (CPU); "
            f"per round {min(per_round):.2f}-{max(per_round):.2f}"
        )
    if 1_000 in by_size:
        t = by_size[1_000]
        print(
            f"median at 1,000 routes: {med(t.wall_ns) / 1000:.2f} µs (wall), "
            f"{med(t.cpu_ns) / 1000:.2f} µs (CPU) per decision"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
