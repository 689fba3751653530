"""Shared plumbing for the bench scripts: tools, child processes, /proc sampling, wrk, docs."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"  # every listener and every request stays on loopback


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- installing what we need


def ensure_apt(binaries: dict[str, str]) -> None:
    """Install the Debian packages providing the missing binaries ({binary: package})."""
    missing = sorted({pkg for binary, pkg in binaries.items() if shutil.which(binary) is None})
    if not missing:
        return
    log(f"installing {', '.join(missing)} with apt-get")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [*sudo, "apt-get", "install", "-y", "-q", *missing]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        # A fresh machine has no package lists yet: update once, then try again.
        subprocess.run([*sudo, "apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    for binary in binaries:
        if shutil.which(binary) is None:
            raise SystemExit(f"bench: {binary} is still missing after apt-get install")


def ensure_uvloop() -> bool:
    """pip install uvloop into this venv when missing; True when it can be imported."""
    if find_spec("uvloop") is not None:
        return True
    log("installing uvloop into the current venv")
    done = subprocess.run([PYTHON, "-m", "pip", "install", "-q", "uvloop"], check=False)
    return done.returncode == 0


# ---------------------------------------------------------------- child processes


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the finally blocks that stop the children run."""

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    cpus: str

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Children:
    """Every process the bench starts; stop_all() (in a finally) ends each one by its id."""

    workdir: Path
    started: list[Child] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        cpus: str,
        stdout: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Child:
        out = open(stdout or self.workdir / f"{name}.out", "wb")  # noqa: SIM115
        err = open(self.workdir / f"{name}.err", "wb")  # noqa: SIM115
        with out, err:
            # taskset execs the command, so the child's pid is the measured process itself.
            proc = subprocess.Popen(
                ["taskset", "-c", cpus, *cmd],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=ROOT,
                start_new_session=True,  # its own process group: stop_all reaches its workers
            )
        child = Child(name, proc, cpus)
        self.started.append(child)
        return child

    def stop(self, child: Child) -> None:
        if child.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
            try:
                child.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.proc.wait(timeout=10)
        if child in self.started:
            self.started.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.started)):
            self.stop(child)

    def stderr_tail(self, child: Child, lines: int = 15) -> str:
        path = self.workdir / f"{child.name}.err"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def wait_http(child: Child, url: str, children: Children, timeout: float = 30.0) -> None:
    """Wait until url answers any HTTP status; fail fast if the child died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(
                f"{child.name} exited with {child.proc.returncode}:\n" + children.stderr_tail(child)
            )
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 (loopback, http only)
                return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{child.name} did not answer {url} within {timeout:.0f}s")


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


# ---------------------------------------------------------------- /proc sampling


def process_tree(pid: int) -> list[int]:
    """pid and all its live descendants (workers, nginx worker processes)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, ()))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()
        ticks += int(rest[11]) + int(rest[12])  # fields 14 and 15 of proc(5)
    return ticks / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A /proc/<pid>/status memory field (VmRSS, VmHWM) in KiB; 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_kib(pid: int, key: str) -> int:
    return sum(status_kib(p, key) for p in process_tree(pid))


def uses_uvloop(pid: int) -> bool:
    """True when the process or a descendant (a worker) has uvloop's extension mapped."""
    for p in process_tree(pid):
        try:
            if "uvloop" in Path(f"/proc/{p}/maps").read_text():
                return True
        except OSError:
            continue
    return False


# ---------------------------------------------------------------- wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


@dataclass(frozen=True)
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors plus non-2xx/3xx responses


def _ms(text: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if found is None:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(found.group(1)) * _UNITS[found.group(2)]


def parse_wrk(output: str) -> WrkResult:
    def grab(pattern: str) -> str:
        found = re.search(pattern, output, re.MULTILINE)
        if found is None:
            raise ValueError(f"wrk output without {pattern!r}:\n{output}")
        return found.group(1)

    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        requests=int(grab(r"^\s*(\d+) requests in")),
        rps=float(grab(r"^Requests/sec:\s*([\d.]+)")),
        p50_ms=_ms(grab(r"^\s*50%\s+(\S+)")),
        p99_ms=_ms(grab(r"^\s*99%\s+(\S+)")),
        errors=errors + (int(non2xx.group(1)) if non2xx else 0),
    )


def run_wrk(
    url: str, *, seconds: float, connections: int, cpus: str = "0", user: str | None = "bob"
) -> WrkResult:
    cmd = ["taskset", "-c", cpus, "wrk", "-t", "1", "-c", str(connections)]
    cmd += ["-d", f"{seconds:g}s", "--latency", "--timeout", "5s"]
    if user is not None:
        cmd += ["-H", f"X-User-Id: {user}"]
    done = subprocess.run(
        [*cmd, url], capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


# ---------------------------------------------------------------- statistics and reporting


def spread(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    """'median (min–max)', or just the value for a single round."""
    if not values:
        return "–"
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "proxy"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (proxy/ modified)" if dirty else "")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_facts(uvloop: str) -> str:
    import aiohttp

    return (
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}, commit {git_commit()}; "
        f"{os.cpu_count()} CPUs ({cpu_model()}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, uvloop {uvloop}"
    )


def append_to_section(heading: str, intro: str, body: str) -> None:
    """Add body at the end of the `## heading` section of docs/benchmarks.md (made if absent).

    Other sections of the file (written by other tools) are left byte for byte as they are.
    """
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    title = f"## {heading}"
    if title not in lines:
        new = text.rstrip("\n") + f"\n\n{title}\n\n{intro.strip()}\n\n{body.strip()}\n"
    else:
        start = lines.index(title)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        section = "\n".join(lines[start:end]).rstrip("\n")
        rest = "\n".join(lines[end:])
        new = "\n".join(lines[:start]) + "\n" + section + f"\n\n{body.strip()}\n"
        if rest:
            new += "\n" + rest + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(new)


@contextlib.contextmanager
def workspace(prefix: str) -> Iterator[Path]:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix))
    # nginx workers drop root for `nobody`: they must be able to read the files we write.
    path.chmod(0o755)
    try:
        yield path
    finally:
        if os.environ.get("BENCH_KEEP") is None:
            shutil.rmtree(path, ignore_errors=True)
        else:
            log(f"kept {path}")
