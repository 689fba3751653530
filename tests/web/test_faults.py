"""Failure paths: dead or hanging upstreams, vanishing clients, bad config, draining, signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from aiohttp import ClientSession, web

from proxy.settings import Settings
from proxy.web.serve import Server, StartupError, build_runtime, free_port, start
from tests.security.harness import open_non_reader
from tests.web.conftest import (
    ROOT,
    SHIPPED_MEMBERS,
    SHIPPED_ROUTES,
    Backend,
    Proxy,
    StartBackend,
    StartProxy,
)

WAIT = 10.0  # bound for "eventually"; never a speed assertion
CHUNK = 64 * 1024
BOB = {"X-User-Id": "bob"}

ROUTES = """\
version: 1
default: deny
roles:
  admin:
    permissions: ["*"]
  developer:
    permissions: [demo:use]
plans:
  "*": {roles: [admin, developer], project_bindings: false}
routes:
  - path: /healthz
    methods: [GET]
    public: true
  - path: /_demo/slow
    methods: [GET]
    permission: demo:use
  - path: /_demo/status/{code}
    methods: [GET]
    permission: PERMISSION
  - path: /up/{path*}
    methods: "*"
    permission: demo:use
"""


def routes_text(status_permission: str = "demo:use") -> str:
    return ROUTES.replace("PERMISSION", status_permission)


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(routes_text())
    return path


def base_settings(upstream: str, **overrides: object) -> Settings:
    settings = Settings(
        upstream=upstream,
        routes=SHIPPED_ROUTES,
        store=f"file:{SHIPPED_MEMBERS}",
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        reload_interval=0,
    )
    return replace(settings, **overrides)  # type: ignore[arg-type]


async def wait_for(condition: str, check: object) -> None:
    """Poll a zero-argument callable until it is true (bounded by WAIT)."""
    assert callable(check)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {condition}"
        await asyncio.sleep(0.01)


# --- upstream failures ----------------------------------------------------------------------


async def test_refused_upstream_is_502_upstream_unavailable(start_proxy: StartProxy) -> None:
    port = free_port()  # bound and released: nothing listens there
    proxy = await start_proxy(f"http://127.0.0.1:{port}")
    async with ClientSession() as session, session.get(proxy.url + "/healthz") as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["reason"] == "upstream_unavailable"
    assert resp.headers["Content-Type"].startswith("application/json")


@dataclass
class Hanging:
    """Accepts connections and reads requests, but never answers."""

    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WAIT * 3):
                await self.release.wait()
        writer.close()


@pytest.fixture
async def hanging() -> AsyncIterator[tuple[Hanging, int]]:
    state = Hanging()
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    async with server:
        yield state, port
        state.release.set()
        for writer in state.writers:
            writer.close()
        await asyncio.sleep(0)  # let the handlers see the release and finish


async def test_hanging_upstream_is_504_after_the_upstream_timeout(
    start_proxy: StartProxy, hanging: tuple[Hanging, int]
) -> None:
    _state, port = hanging
    proxy = await start_proxy(f"http://127.0.0.1:{port}", upstream_timeout=0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with ClientSession() as session, session.get(proxy.url + "/healthz") as resp:
        assert resp.status == 504
        body = await resp.json()
    elapsed = loop.time() - started
    assert body["reason"] == "upstream_timeout"
    # It waited for the timeout (not an immediate failure) and did not hang much beyond it.
    assert 0.4 <= elapsed < WAIT


async def start_raw_upstream(response: bytes) -> tuple[asyncio.Server, int]:
    """An upstream that reads a request head, sends `response` verbatim and hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(response)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


TRUNCATED = {
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nhelloworld",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
}


async def _get_until_eof(proxy: Proxy, target: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nX-User-Id: bob\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(WAIT):  # keep-alive request: only a cut connection ends it
            return await reader.read(-1)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize("framing", sorted(TRUNCATED))
async def test_upstream_dying_mid_response_cuts_the_client_connection(
    start_proxy: StartProxy, framing: str
) -> None:
    server, port = await start_raw_upstream(TRUNCATED[framing])
    async with server:
        proxy = await start_proxy(f"http://127.0.0.1:{port}")
        data = await _get_until_eof(proxy, "/api/org")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    if framing == "chunked":
        # The terminating zero-size chunk would tell the client the body was complete.
        assert b"hello" in body
        assert not body.endswith(b"0\r\n\r\n")
    else:
        assert b"Content-Length: 1000" in head
        assert body == b"helloworld"  # 10 of 1000 bytes, then EOF: visibly truncated


def _upstream_errors(proxy: Proxy) -> float:
    total = 0.0
    for metric in proxy.server.runtime.metrics.registry.collect():
        if metric.name == "rbac_proxy_upstream_errors":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


async def test_upstream_dying_mid_response_is_accounted_not_an_unhandled_error(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    server, port = await start_raw_upstream(TRUNCATED["content-length"])
    async with server:
        proxy = await start_proxy(f"http://127.0.0.1:{port}")
        await _get_until_eof(proxy, "/api/org")
    audit = [json.loads(line) for line in proxy.audit_lines()]
    assert [a["path"] for a in audit] == ["/api/org"]
    assert audit[0]["status"] == 200  # the status line the client received, not 0
    assert _upstream_errors(proxy) == 1  # rbac_proxy_upstream_errors_total counts it
    unhandled = [
        r for r in caplog.records if r.name == "aiohttp.server" and r.levelno >= logging.ERROR
    ]
    assert unhandled == [], [r.getMessage() for r in unhandled]


# --- clients that go away -------------------------------------------------------------------


@dataclass
class Observed:
    """What an inline upstream handler saw: first contact, and how it ended."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: list[str] = field(default_factory=list)
    nbytes: int = 0


def sink_app(seen: Observed) -> web.Application:
    """POST /up/sink reads the body as a stream; GET /up/source streams (nearly) forever."""

    async def sink(request: web.Request) -> web.Response:
        seen.started.set()
        try:
            async for chunk in request.content.iter_chunked(CHUNK):
                seen.nbytes += len(chunk)
        except asyncio.CancelledError:
            seen.outcome.append("cancelled")
            raise
        except Exception as exc:  # whatever the disconnect looks like, record it
            seen.outcome.append(f"error:{type(exc).__name__}")
            raise
        else:
            seen.outcome.append("complete")
        finally:
            seen.finished.set()
        return web.Response(text=str(seen.nbytes))

    async def source(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 1 << 40
        await resp.prepare(request)
        seen.started.set()
        block = b"x" * CHUNK
        try:
            for _ in range(1 << 24):  # bounded; the client leaves long before
                await resp.write(block)
                seen.nbytes += len(block)
        except asyncio.CancelledError:
            seen.outcome.append("cancelled")
            raise
        except Exception as exc:
            seen.outcome.append(f"error:{type(exc).__name__}")
            raise
        else:
            seen.outcome.append("complete")
        finally:
            seen.finished.set()
        return resp

    app = web.Application()
    app.router.add_post("/up/sink", sink)
    app.router.add_get("/up/source", source)
    return app


async def test_client_disconnect_mid_upload_cancels_the_upstream_request(
    start_backend: StartBackend, start_proxy: StartProxy, routes_file: Path
) -> None:
    seen = Observed()
    upstream = await start_backend(sink_app(seen))
    proxy = await start_proxy(upstream.url, routes=str(routes_file))
    total = 10 * 1024 * 1024
    _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
    writer.write(
        f"POST /up/sink HTTP/1.1\r\nHost: x\r\nX-User-Id: bob\r\n"
        f"Content-Length: {total}\r\n\r\n".encode()
    )
    writer.write(b"y" * (4 * CHUNK))
    await writer.drain()
    async with asyncio.timeout(WAIT):
        await seen.started.wait()
    writer.close()  # mid-body: the rest of the 10 MiB never comes
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    async with asyncio.timeout(WAIT):
        await seen.finished.wait()
    assert len(seen.outcome) == 1
    assert seen.outcome[0] != "complete", seen.outcome
    assert seen.nbytes < total


async def test_client_disconnect_mid_download_closes_the_upstream_response(
    start_backend: StartBackend, start_proxy: StartProxy, routes_file: Path
) -> None:
    seen = Observed()
    upstream = await start_backend(sink_app(seen))
    proxy = await start_proxy(upstream.url, routes=str(routes_file))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
    writer.write(b"GET /up/source HTTP/1.1\r\nHost: x\r\nX-User-Id: bob\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2 * CHUNK)  # the download is under way
    assert head.startswith(b"HTTP/1.1 200 ")
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    async with asyncio.timeout(WAIT):
        await seen.finished.wait()
    assert len(seen.outcome) == 1
    assert seen.outcome[0] != "complete", seen.outcome


# --- startup errors -------------------------------------------------------------------------


def test_missing_member_file_is_a_startup_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "members.yaml"
    with pytest.raises(StartupError) as info:
        build_runtime(base_settings("http://127.0.0.1:9", store=f"file:{missing}"))
    message = str(info.value)
    assert str(missing) in message
    assert "cannot read" in message


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (
            ROUTES.replace("default: deny\n", "default: deny\nbogus: 1\n").replace(
                "PERMISSION", "demo:use"
            ),
            3,
            "unknown key 'bogus'",
        ),
        ("version: 1\nroutes: [\n  - {path: /x\n", 3, "invalid YAML"),
        (routes_text().replace("{code}", "{code"), 17, "{code"),
    ],
)
def test_broken_routes_file_is_a_startup_error_with_file_and_line(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    with pytest.raises(StartupError) as info:
        build_runtime(base_settings("http://127.0.0.1:9", routes=str(path)))
    message = str(info.value)
    assert f"{path}:{line}:" in message
    assert words in message


@pytest.mark.parametrize(
    "upstream", ["http://[::1", "ftp://127.0.0.1:21", "http://127.0.0.1:9/api", "", "127.0.0.1"]
)
def test_unusable_upstream_url_is_a_startup_error(upstream: str) -> None:
    with pytest.raises(StartupError) as info:
        build_runtime(base_settings(upstream))
    assert "--upstream" in str(info.value)


@pytest.mark.parametrize("which", ["listen", "admin_listen"])
async def test_busy_port_is_a_startup_error(which: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = base_settings("http://127.0.0.1:9", **{which: f"127.0.0.1:{port}"})
        with pytest.raises(StartupError) as info:
            await start(settings, build_runtime(settings))
    assert "cannot listen" in str(info.value)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RBAC_PROXY_")}


async def test_cli_serve_with_missing_member_file_exits_nonzero(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--upstream",
        "http://127.0.0.1:9",
        "--routes",
        SHIPPED_ROUTES,
        "--store",
        f"file:{missing}",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        cwd=ROOT,
        env=_clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        _out, err = await proc.communicate()
    assert proc.returncode not in (0, None)
    stderr = err.decode()
    assert str(missing) in stderr
    assert "cannot read" in stderr
    assert "Traceback" not in stderr


# --- graceful shutdown in process -----------------------------------------------------------


def _saw(backend: Backend, path: str) -> bool:
    return any(str(r["raw_path"]).startswith(path) for r in backend.received)


async def test_drain_lets_an_inflight_request_finish_and_readyz_turns_503(
    backend: Backend, routes_file: Path
) -> None:
    settings = base_settings(backend.url, routes=str(routes_file), shutdown_timeout=WAIT)
    server: Server = await start(settings, build_runtime(settings))
    drain: asyncio.Task[None] | None = None
    try:
        async with ClientSession() as session:
            admin = f"http://127.0.0.1:{server.admin_port}"
            async with session.get(admin + "/readyz") as ready:
                assert ready.status == 200
            inflight = asyncio.create_task(
                session.get(f"http://127.0.0.1:{server.proxy_port}/_demo/slow?delay=1", headers=BOB)
            )
            await wait_for(
                "the slow request to reach the backend", lambda: _saw(backend, "/_demo/slow")
            )
            drain = asyncio.create_task(server.drain_and_stop())
            await wait_for("draining", lambda: server.runtime.draining)
            async with session.get(admin + "/readyz") as ready:
                assert ready.status == 503
                assert "draining" in (await ready.json())["problems"]
            async with asyncio.timeout(WAIT):
                resp = await inflight
            async with resp:
                assert resp.status == 200
                assert (await resp.json())["slept"] == 1.0
        async with asyncio.timeout(WAIT):
            await drain
    finally:
        if drain is None:
            await server.drain_and_stop()


@pytest.mark.parametrize("stuck_on", ["a slow upstream", "a client that reads nothing"])
async def test_drain_cuts_what_still_runs_when_the_shutdown_timeout_ends(
    stuck_on: str, backend: Backend, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """--shutdown-timeout bounds the drain. aiohttp alone waits that long, then cancels only
    a pending body read and waits as long again, so a request stuck on its upstream or on a
    client that reads nothing held the drain for twice the bound (past the supervisor's
    grace of timeout + 5 s, which kills the worker and loses its audit lines). The request
    is cut at the bound and still audited."""
    timeout = 2.0
    routes_file = tmp_path / "routes.yaml"
    routes_file.write_text(
        routes_text() + "  - path: /_demo/bytes\n    methods: [GET]\n    permission: demo:use\n"
    )
    proxy = await start_proxy(backend.url, routes=str(routes_file), shutdown_timeout=timeout)
    slow = stuck_on == "a slow upstream"
    target = "/_demo/slow?delay=6" if slow else "/_demo/bytes?n=64000000"
    writer = await open_non_reader(proxy.server.proxy_port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nX-User-Id: bob\r\n\r\n".encode())
        path = target.partition("?")[0]
        await wait_for("the request to reach the backend", lambda: _saw(backend, path))
        await asyncio.sleep(0.5)  # the answer, if any, fills the client's socket
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(WAIT):
            await proxy.server.drain_and_stop()
        took = loop.time() - started
    finally:
        writer.close()
    assert took < 2 * timeout - 0.5, f"the drain took {took:.1f}s for --shutdown-timeout {timeout}"
    lines = [json.loads(line) for line in proxy.audit_lines()]
    assert [line["status"] for line in lines] == [499]


# --- a real `python -m proxy serve` process -------------------------------------------------


@dataclass
class ServeProcess:
    proc: asyncio.subprocess.Process
    port: int
    admin_port: int
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text()


async def start_serve(
    backend: Backend,
    routes_file: Path,
    tmp_path: Path,
    *,
    extra: Sequence[str] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> ServeProcess:
    """`python -m proxy serve` in front of `backend`, ready (its /readyz answered 200)."""
    port, admin_port = free_port(), free_port()
    stderr_path = tmp_path / "stderr.log"
    with open(tmp_path / "stdout.log", "wb") as out, open(stderr_path, "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--upstream",
            backend.url,
            "--routes",
            str(routes_file),
            "--store",
            f"file:{SHIPPED_MEMBERS}",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin_port}",
            "--reload-interval",
            "0",  # only SIGHUP reloads
            "--shutdown-timeout",
            str(WAIT),
            *extra,
            cwd=ROOT,
            env=_clean_env(),
            stdout=out,
            stderr=err,
            preexec_fn=preexec_fn,
        )
    running = ServeProcess(proc, port, admin_port, stderr_path)
    try:
        await _wait_ready(running)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return running


@pytest.fixture
async def serve_process(
    backend: Backend, routes_file: Path, tmp_path: Path
) -> AsyncIterator[ServeProcess]:
    running = await start_serve(backend, routes_file, tmp_path)
    try:
        yield running
    finally:
        if running.proc.returncode is None:
            running.proc.kill()
            await running.proc.wait()


async def _wait_ready(running: ServeProcess) -> None:
    async with ClientSession() as session:
        for _ in range(600):  # bounded: 30 s of 50 ms polls (interpreter start-up)
            assert running.proc.returncode is None, running.stderr()
            with contextlib.suppress(OSError):
                async with session.get(f"http://127.0.0.1:{running.admin_port}/readyz") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise AssertionError(f"proxy never became ready: {running.stderr()}")


async def test_sigterm_drains_and_exits_zero(serve_process: ServeProcess, backend: Backend) -> None:
    async with ClientSession() as session:
        inflight = asyncio.create_task(
            session.get(serve_process.url + "/_demo/slow?delay=1", headers=BOB)
        )
        await wait_for(
            "the slow request to reach the backend", lambda: _saw(backend, "/_demo/slow")
        )
        serve_process.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            resp = await inflight
        async with resp:
            assert resp.status == 200
            assert (await resp.json())["slept"] == 1.0
    async with asyncio.timeout(WAIT * 2):
        code = await serve_process.proc.wait()
    assert code == 0, serve_process.stderr()


async def test_sighup_reloads_an_edited_routes_file(
    serve_process: ServeProcess, routes_file: Path
) -> None:
    url = serve_process.url + "/_demo/status/200"
    async with ClientSession() as session:
        async with session.get(url, headers=BOB) as resp:
            assert resp.status == 200  # bob (developer) holds demo:use
        # Now only "*" (admin) grants the permission this route needs.
        routes_file.write_text(routes_text("demo:admin_only"))
        async with session.get(url, headers=BOB) as resp:
            assert resp.status == 200  # no reload without the signal (polling is off)
        serve_process.proc.send_signal(signal.SIGHUP)
        status = 200
        for _ in range(200):  # bounded: the signal is handled asynchronously
            async with session.get(url, headers=BOB) as resp:
                status = resp.status
                body = await resp.json()
            if status != 200:
                break
            await asyncio.sleep(0.05)
        assert status == 403
        assert body["reason"] == "missing_permission"
        assert body["permission"] == "demo:admin_only"
        async with session.get(url, headers={"X-User-Id": "alice"}) as resp:
            assert resp.status == 200  # admin still passes: the new table, not a broken one
    assert serve_process.proc.returncode is None  # still serving after the reload


async def test_malformed_request_logs_no_header_text(
    backend: Backend, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Review finding: aiohttp logged the whole bad header line, bearer token included."""
    proxy = await start_proxy(backend.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
    writer.write(
        b"GET /api/org HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer SECRET-TOKEN\x01\r\n\r\n"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.read(200), 5)
    writer.close()
    assert b" 400 " in head.split(b"\r\n", 1)[0]  # aiohttp's parser refuses it
    assert "SECRET-TOKEN" not in caplog.text


async def test_serve_lifts_the_open_files_limit_to_the_hard_limit(
    backend: Backend, routes_file: Path, tmp_path: Path
) -> None:
    """A container's soft limit of 1,024 descriptors would cap the proxy near 500 concurrent
    clients (each needs an upstream descriptor too): serve raises it to the hard limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard > 512, f"hard limit {hard} too low to test"

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    running = await start_serve(
        backend, routes_file, tmp_path, extra=("--log-level", "info"), preexec_fn=low_soft_limit
    )
    try:
        limits = Path(f"/proc/{running.proc.pid}/limits").read_text()
        row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        soft_now = row.split()[3]
        expected = "1048576" if hard == resource.RLIM_INFINITY else str(hard)
        assert soft_now == expected, row
        assert f"open files limit raised from 256 to {expected}" in running.stderr()
    finally:
        running.proc.kill()
        await running.proc.wait()
