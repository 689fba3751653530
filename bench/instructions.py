"""Instructions per request under callgrind: rbac-proxy beside the aiohttp pass-through.

Run: .venv/bin/python bench/instructions.py [--requests N] [--src DIR] [--only rbac|passthrough]

Wall-clock figures on this shared 2-core machine move by ±30 % between runs; user-space
instructions counted by `valgrind --tool=callgrind` repeat within about 1.5 % (often 0.2 %),
so this is how one change to the hot path is judged (docs/benchmarks.md, "What each
optimization bought").

Each target runs under callgrind with instrumentation off; after a warm-up (caches filled, the
decision memo and pools warm) it is switched on for exactly N cache-hit requests
(`GET /api/projects/proj-prod/workflows` as `bob`, 200 B from nginx, 8 keep-alive connections,
audit log and metrics on, `--reload-interval 0`), then off. `--src DIR` measures another source
tree, e.g. an older commit: `git archive <commit> | tar -x -C DIR`. Kernel work (the socket
calls) is not counted; it is the same for both targets. Needs valgrind and nginx.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import HOST, PYTHON, ROOT, Children, ensure_apt, free_port, wait_http, workspace
from run import SMALL_PATH, USER, nginx_cmd, small_body, upstream_conf

CONNECTIONS = 8
WARMUP = 400


async def _one_connection(port: int, count: int) -> int:
    reader, writer = await asyncio.open_connection(HOST, port)
    raw = (
        f"GET {SMALL_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nX-User-Id: {USER}\r\n\r\n"
    ).encode()
    ok = 0
    try:
        for _ in range(count):
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if found is None:
                raise RuntimeError(f"answer without Content-Length: {head[:200]!r}")
            await reader.readexactly(int(found.group(1)))
            ok += head.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    return ok


def load(port: int, requests: int) -> None:
    """Exactly `requests` sequential requests spread over CONNECTIONS keep-alive connections."""

    async def run() -> list[int]:
        share = [requests // CONNECTIONS + (i < requests % CONNECTIONS) for i in range(CONNECTIONS)]
        return await asyncio.gather(*(_one_connection(port, n) for n in share))

    ok = sum(asyncio.run(run()))
    if ok != requests:
        raise RuntimeError(f"{requests - ok} of {requests} requests did not get a 200")


def callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def measure(
    children: Children, wd: Path, name: str, cmd: list[str], env: dict[str, str], health: str
) -> int:
    out = wd / f"{name}.callgrind"
    vg = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    child = children.spawn(name, [*vg, *cmd], cpus="1", env=env)
    wait_http(child, health, children, timeout=180)
    port = int(cmd[cmd.index("--listen") + 1].rsplit(":", 1)[1])
    load(port, WARMUP)
    callgrind(child.pid, "--instr=on")
    load(port, ARGS.requests)
    callgrind(child.pid, "--instr=off")
    children.stop(child)  # callgrind writes its totals on exit
    text = out.read_text(errors="replace")
    found = re.search(r"^totals: (\d+)", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"{name}: no totals in {out}")
    return int(found.group(1))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--src", type=Path, default=ROOT, help="rbac-proxy source tree")
    parser.add_argument("--only", choices=("rbac", "passthrough"))
    return parser.parse_args(argv)


def passthrough_cmd(port: int, upstream: int) -> list[str]:
    cmd = [PYTHON, str(ROOT / "bench" / "passthrough.py"), "--listen", f"{HOST}:{port}"]
    return [*cmd, "--upstream", f"http://{HOST}:{upstream}"]


def rbac_cmd(src: Path, port: int, admin: int, upstream: int) -> list[str]:
    # -P: the working directory (ROOT) does not go first on sys.path; PYTHONPATH picks the tree.
    cmd = [PYTHON, "-P", "-m", "proxy", "serve", "--upstream", f"http://{HOST}:{upstream}"]
    cmd += ["--routes", str(src / "routes.yaml"), "--store", f"file:{src / 'members.yaml'}"]
    cmd += ["--listen", f"{HOST}:{port}", "--admin-listen", f"{HOST}:{admin}"]
    return [*cmd, "--audit", "all", "--log-level", "warning", "--reload-interval", "0"]


def main(argv: Sequence[str] | None = None) -> int:
    global ARGS
    ARGS = parse_args(argv)
    ensure_apt({"valgrind": "valgrind", "nginx": "nginx", "callgrind_control": "valgrind"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBAC_PROXY_")}
    results: dict[str, int] = {}
    with workspace("rbac-instr-") as wd:
        children = Children(wd)
        try:
            up = free_port()
            conf = upstream_conf(wd, "up", up, small_body())
            children.spawn("upstream", nginx_cmd(wd, conf), cpus="0")
            time.sleep(0.5)
            if ARGS.only != "rbac":
                port = free_port()
                health = f"http://{HOST}:{port}{SMALL_PATH}"
                cmd = passthrough_cmd(port, up)
                results["aiohttp pass-through"] = measure(children, wd, "pt", cmd, env, health)
            if ARGS.only != "passthrough":
                src = ARGS.src.resolve()
                port, admin = free_port(), free_port()
                cmd = rbac_cmd(src, port, admin, up)
                health = f"http://{HOST}:{admin}/healthz"
                src_env = {**env, "PYTHONPATH": str(src)}
                results[f"rbac-proxy ({src})"] = measure(children, wd, "rbac", cmd, src_env, health)
        finally:
            children.stop_all()
    for name, total in results.items():
        print(f"{name}: {total / ARGS.requests / 1000:.1f}k instructions per request")
    return 0


ARGS: argparse.Namespace

if __name__ == "__main__":
    raise SystemExit(main())
