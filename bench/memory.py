"""Memory of rbac-proxy: 100,000 cached users and a 1 GiB streamed upload (issue 6 §3).

Run: .venv/bin/python bench/memory.py [--users N] [--upload-mib M] [--no-docs]

(a) rbac-proxy with --cache-size N gets one request per user u0…u{N-1}, which fills the role
    cache; once with a generated member file of N users (the file store keeps its directory in
    the proxy), once with the http store answered by bench/sink.py (only the cache is local);
    the proxy's VmRSS/VmHWM before and after and the cache-entries gauge are reported.
(b) a 1 GiB upload streams through rbac-proxy (POST /api/projects/proj-prod/workflows as bob,
    an allowed route of the shipped routes.yaml) to bench/sink.py, which discards it; the
    proxy's RSS is sampled during the upload.
The proxy runs on CPU 1; the client (this process) and the sink run on CPU 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from importlib.util import find_spec
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    HOST,
    PYTHON,
    ROOT,
    Child,
    Children,
    append_to_section,
    exit_on_sigterm,
    fetch,
    free_port,
    log,
    machine_facts,
    process_tree,
    status_kib,
    tree_kib,
    uses_uvloop,
    wait_http,
    workspace,
)

SECTION = "Memory (bench/memory.py)"
SECTION_INTRO = """\
`.venv/bin/python bench/memory.py` (about three minutes; `--users` and `--upload-mib` scale it
down). (a) rbac-proxy `serve --workers 1 --cache-size 100000 --cache-ttl 600`, then one
`GET /api/org/members` per user (an org route: one role-cache entry per user; 32 keep-alive
connections from an aiohttp client), twice: with `--store file:` and a generated member file of
100,000 users (one org on plan enterprise, `u0`…`u99999` developer), whose parsed directory
lives in the proxy, and with `--store http://…` answered by `bench/sink.py`, where only the
cache is local. (b) a 1 GiB body (`Content-Length`, 64 KiB chunks) as
`POST /api/projects/proj-prod/workflows` by `bob` through rbac-proxy (shipped files) to
`bench/sink.py`, which counts and discards it; the proxy's RSS is sampled every 50 ms. Audit log
and metrics on; the proxy on CPU 1, client and sink on CPU 0. Targets of issue 6: RSS ≤ 150 MB
with 100,000 cached users; the 1 GiB upload grows RSS by < 50 MB."""
MIB = 1024 * 1024
CHUNK = 64 * 1024


def members_yaml(users: int) -> str:
    lines = ["orgs:", "  bench:", "    plan: enterprise", "    projects: [proj-bench]"]
    lines.append("    members:")
    lines += [f"      u{i}: developer" for i in range(users)]
    return "\n".join(lines) + "\n"


def proxy_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RBAC_PROXY_")}


def start_proxy(
    children: Children, wd: Path, name: str, upstream: int, store: str, extra: Sequence[str]
) -> tuple[Child, int, int]:
    port, admin = free_port(), free_port()
    cmd = [PYTHON, "-m", "proxy", "serve", "--upstream", f"http://{HOST}:{upstream}"]
    cmd += ["--routes", str(ROOT / "routes.yaml"), "--store", store]
    cmd += ["--listen", f"{HOST}:{port}", "--admin-listen", f"{HOST}:{admin}"]
    cmd += ["--workers", "1", "--audit", "all", "--log-level", "warning", "--reload-interval", "0"]
    child = children.spawn(
        name, [*cmd, *extra], cpus="1", stdout=wd / f"{name}-audit.log", env=proxy_env()
    )
    wait_http(child, f"http://{HOST}:{admin}/healthz", children, timeout=120)
    return child, port, admin


def gauge(admin: int, name: str) -> float:
    status, body = fetch(f"http://{HOST}:{admin}/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError(f"{name} not in /metrics")


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


class RssSampler:
    """Samples the proxy's VmRSS in a thread (the event loop of the client stays free)."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_kib(self.pid, "VmRSS"))
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


async def one_request_per_user(port: int, users: int, concurrency: int) -> Counter[int]:
    statuses: Counter[int] = Counter()
    next_user = iter(range(users))
    url = f"http://{HOST}:{port}/api/org/members"
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for i in next_user:  # shared iterator: every user exactly once
                async with session.get(url, headers={"X-User-Id": f"u{i}"}) as resp:
                    await resp.read()
                    statuses[resp.status] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


async def upload(port: int, size: int) -> tuple[int, dict[str, object]]:
    block = b"\0" * CHUNK

    async def body() -> AsyncIterator[bytes]:
        sent = 0
        while sent < size:
            piece = block if size - sent >= CHUNK else block[: size - sent]
            sent += len(piece)
            yield piece

    url = f"http://{HOST}:{port}/api/projects/proj-prod/workflows"
    headers = {"X-User-Id": "bob", "Content-Length": str(size)}
    timeout = aiohttp.ClientTimeout(total=600)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url, data=body(), headers=headers) as resp,
    ):
        text = await resp.text()
        return resp.status, json.loads(text) if resp.status == 200 else {"body": text[:300]}


def cached_users(
    args: argparse.Namespace, children: Children, wd: Path, sink: int, backend: str
) -> list[str]:
    """(a) with the member file (its directory lives in the proxy) or the http store."""
    if backend == "file":
        path = wd / "members-many.yaml"
        path.write_text(members_yaml(args.users))
        store = f"file:{path}"
        what = f"`--store file:` with a {args.users:,}-member file"
    else:
        store = f"http://{HOST}:{sink}/store"
        what = "`--store http://…` (bench/sink.py answers every u<N>; only the cache is local)"
    t0 = time.monotonic()
    child, port, admin = start_proxy(
        children,
        wd,
        f"rbac-users-{backend}",
        sink,
        store,
        ["--cache-size", str(args.users), "--cache-ttl", "600"],
    )
    load_s = time.monotonic() - t0
    pid = child.pid
    rss0, hwm0 = status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM")
    log(f"(a) {backend} store: proxy up in {load_s:.1f} s, RSS {mib(rss0)} MiB")
    t0 = time.monotonic()
    statuses = asyncio.run(one_request_per_user(port, args.users, args.concurrency))
    took = time.monotonic() - t0
    rss1, hwm1 = status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM")
    entries = gauge(admin, "rbac_proxy_role_cache_entries")
    misses = gauge(admin, 'rbac_proxy_role_cache_requests_total{result="miss"}')
    log(f"(a) {dict(statuses)} in {took:.0f} s; RSS {mib(rss1)} MiB, {entries:,.0f} entries")
    ok = statuses.get(200, 0) == args.users
    met = max(rss1, hwm1) * 1024 <= 150e6  # KiB → bytes; the target is in MB
    procs = len(process_tree(pid))
    loop = "uvloop" if uses_uvloop(pid) else "asyncio"
    children.stop(child)
    return [
        f"- (a) {what}: {args.users:,} distinct users, one request each ({took:.0f} s, "
        f"statuses {dict(sorted(statuses.items()))}{'' if ok else ' — NOT all 200'}; "
        f"{procs} process, {loop} loop):",
        f"  - after start-up ({load_s:.1f} s): VmRSS {mib(rss0)} MiB (VmHWM {mib(hwm0)} MiB)",
        f"  - after {args.users:,} cached users: VmRSS {mib(rss1)} MiB, VmHWM {mib(hwm1)} MiB "
        f"(+{mib(rss1 - rss0)} MiB while the cache filled); `rbac_proxy_role_cache_entries` "
        f"{entries:,.0f}, cache misses counted {misses:,.0f}",
        f"  - target RSS ≤ 150 MB (143.05 MiB) with 100,000 cached users: "
        f"{'**met**' if met and ok else '**missed**'}"
        + ("" if args.users == 100_000 else f" (measured with {args.users:,} users only)"),
    ]


def big_upload(args: argparse.Namespace, children: Children, wd: Path, sink: int) -> list[str]:
    child, port, _admin = start_proxy(
        children, wd, "rbac-upload", sink, f"file:{ROOT / 'members.yaml'}", []
    )
    pid = child.pid
    # A small request first, so lazily built state is not counted as upload growth.
    status, _ = fetch(
        f"http://{HOST}:{port}/api/projects/proj-prod/workflows", {"X-User-Id": "bob"}
    )
    if status != 200:
        raise RuntimeError(f"(b) warm-up request answered {status}")
    rss0, hwm0 = status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM")
    size = args.upload_mib * MIB
    t0 = time.monotonic()
    with RssSampler(pid) as sampler:
        status, answer = asyncio.run(upload(port, size))
    took = time.monotonic() - t0
    rss1, hwm1 = status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM")
    received = answer.get("received")
    peak = max(sampler.peak, rss1)
    growth = max(peak, hwm1) - rss0
    ok = status == 200 and received == size
    log(f"(b) {status} {answer} in {took:.1f} s; RSS {mib(rss0)} → peak {mib(peak)} MiB")
    children.stop(child)
    return [
        f"- (b) {args.upload_mib:,} MiB upload through rbac-proxy in {took:.1f} s "
        f"({size / took / MIB:,.0f} MiB/s): status {status}, the sink received "
        f"{received if isinstance(received, int) else '?'} bytes"
        f"{'' if ok else ' — UPLOAD FAILED'}:",
        f"  - proxy VmRSS before {mib(rss0)} MiB (VmHWM {mib(hwm0)}), peak sampled during the "
        f"upload {mib(sampler.peak)} MiB, after {mib(rss1)} MiB, VmHWM after {mib(hwm1)} MiB",
        f"  - growth {mib(growth)} MiB (peak − before); target < 50 MB (47.7 MiB): "
        f"{'**met**' if ok and growth * 1024 < 50e6 else '**missed**'}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--upload-mib", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.users <= 1_000_000 or not 1 <= args.upload_mib <= 8192:
        parser.error("--users must be 1..1,000,000 and --upload-mib 1..8192")
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {0})  # the client stays off the proxy's CPU
    exit_on_sigterm()
    started = time.monotonic()
    lines: list[str] = []
    with workspace("rbac-memory-") as wd:
        children = Children(wd)
        try:
            sink_port = free_port()
            cmd = [PYTHON, str(ROOT / "bench" / "sink.py"), "--port", str(sink_port)]
            sink = children.spawn("sink", cmd, cpus="0")
            wait_http(sink, f"http://{HOST}:{sink_port}/", children)
            for backend in ("file", "http"):
                lines += cached_users(args, children, wd, sink_port, backend)
            lines += big_upload(args, children, wd, sink_port)
        finally:
            children.stop_all()
    report = (
        f"### Run of {machine_facts('installed' if find_spec('uvloop') else 'not installed')}\n\n"
        + "\n".join(lines)
    )
    report += f"\n\nTotal wall time {time.monotonic() - started:.0f} s.\n"
    print(report)
    if not args.no_docs:
        append_to_section(SECTION, SECTION_INTRO, report)
        log("appended to docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
