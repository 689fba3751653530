"""The bypass corpus (tests/security/corpus/*.json) against a real proxy and a recording backend.

Every case is one raw HTTP/1.1 request an attacker would write, with what the proxy must do
about it. The core claim of issue 7, asserted for every case: either the proxy answered by
itself (a 4xx, or it closed the connection) and the backend received NOTHING, or the backend
received exactly one request whose target is the canonical, permitted one (byte for byte),
with the proxy's own identity headers and none of the client's identity or override headers.

Case format (one JSON file per family, {"description": ..., "cases": [...]}):

    {"id": "dot-raw-01",                    unique over the corpus; the pytest id
     "class": "dot-segments",               one of CLASSES
     "imitates": "CVE-2019-9901 (Envoy)",   the advisory or technique the case copies
     "note": "...",                         optional remark
     "request": {
        "method": "GET",                    default GET; sent exactly as given
        "target": "/api/...",               sent as UTF-8 bytes ("target_latin1": one byte
                                            per code point, for bytes that are not UTF-8)
        "user": "alice",                    X-User-Id line; omitted or null: no such line
        "host": "dash.example",             Host line; null: no Host line
        "headers": ["X-Org-Id: acme"],      extra header lines, verbatim (latin-1); a line
                                            starting with a space is an obs-fold continuation
        "raw": "GET / HTTP/1.1\r\n...",     instead of all the above: the whole request
                                            (latin-1), for what the builder cannot express
        "peer": "127.0.0.2",                local address to connect from (default 127.0.0.1)
        "proxy": {"trusted_proxies": "127.0.0.1/32"}   Settings overrides for this case
     },
     "expect": {
        "status": [400, "closed"],          acceptable outcomes; "closed" = no response at all
        "reason": "bad_request",            the JSON body's reason (proxy answers only)
        "backend_target": "/api/org",       2xx only: the exact target the backend received
        "backend_method": "GET",            2xx only: default = the request's method
        "backend_headers": {"X-Auth-User": "alice", "X-Forwarded-Uri": null}
                                            2xx only: exact value, or null = absent
     }}

Values a client forges carry the marker "evil"; no header line the backend receives may
contain it.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from proxy.audit import AuditLog
from proxy.settings import Settings
from proxy.web.serve import Server, build_runtime, start
from tests.security.harness import RawReply, Recorder, send_raw
from tests.web.conftest import SHIPPED_MEMBERS, SHIPPED_ROUTES

CORPUS = Path(__file__).parent / "corpus"
MINIMUM_CASES = 200
QUIET = 5.0

# Every class issue 7 (item 2) names must have at least one case.
CLASSES = frozenset(
    {
        "dot-segments",
        "encoded-separators",
        "semicolon",
        "repeated-slashes",
        "case-folding",
        "trailing-characters",
        "overlong-utf8",
        "fullwidth-unicode",
        "target-form",
        "network-path",
        "fragment",
        "control-characters",
        "method-tricks",
        "method-override",
        "path-override-headers",
        "identity-spoofing",
        "forwarded-spoofing",
        "tenant-confusion",
        "query-confusion",
    }
)
# The proxy's own answers (SPEC §2 and §4); anything else from the proxy is a finding.
PROXY_STATUSES = frozenset({400, 401, 403, 404, 405})
# Client headers that must never reach the backend, in any spelling (SPEC §4, §5).
NEVER_FORWARDED = frozenset(
    {
        "x-user-id",
        "x-org-id",
        "x-original-url",
        "x-original-uri",
        "x-rewrite-url",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    }
)
INJECTED = ("x-auth-user", "x-auth-org", "x-auth-role", "x-auth-permission", "x-request-id")
MARKER = b"evil"
REQUEST_KEYS = frozenset(
    {"method", "target", "target_latin1", "user", "host", "headers", "raw", "peer", "proxy"}
)
EXPECT_KEYS = frozenset({"status", "reason", "backend_target", "backend_method", "backend_headers"})
CASE_KEYS = frozenset({"id", "class", "imitates", "request", "expect", "note"})


@dataclass(frozen=True)
class Case:
    id: str
    cls: str
    imitates: str
    method: bytes
    data: bytes
    peer: str | None
    proxy: dict[str, Any]
    statuses: frozenset[int | str]
    reason: str | None
    backend_target: bytes | None
    backend_method: bytes | None
    backend_headers: dict[str, str | None] = field(default_factory=dict)

    @property
    def forwards(self) -> bool:
        return any(isinstance(s, int) and 200 <= s < 300 for s in self.statuses)


def build_request(spec: dict[str, Any]) -> tuple[bytes, bytes]:
    """The exact bytes of one request and its method, from a case's `request` object."""
    if "raw" in spec:
        data = str(spec["raw"]).encode("latin-1")
        return data, data.split(b" ", 1)[0]
    method = str(spec.get("method", "GET")).encode("latin-1")
    if "target_latin1" in spec:
        target = str(spec["target_latin1"]).encode("latin-1")
    else:
        target = str(spec["target"]).encode("utf-8")
    lines = [method + b" " + target + b" HTTP/1.1"]
    host = spec.get("host", "dash.example")
    if host is not None:
        lines.append(b"Host: " + str(host).encode("latin-1"))
    if spec.get("user") is not None:
        lines.append(b"X-User-Id: " + str(spec["user"]).encode("latin-1"))
    lines.extend(str(line).encode("latin-1") for line in spec.get("headers", []))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n", method


def parse_case(raw: dict[str, Any], source: str) -> Case:
    where = f"{source}: {raw.get('id', '?')}"
    unknown = set(raw) - CASE_KEYS
    assert not unknown, f"{where}: unknown keys {sorted(unknown)}"
    request, expect = raw["request"], raw["expect"]
    assert not set(request) - REQUEST_KEYS, f"{where}: unknown request keys"
    assert not set(expect) - EXPECT_KEYS, f"{where}: unknown expect keys"
    assert raw["class"] in CLASSES, f"{where}: unknown class {raw['class']!r}"
    assert str(raw["imitates"]).strip(), f"{where}: say what the case imitates"
    statuses = frozenset(expect["status"])
    assert statuses, f"{where}: no expected status"
    for status in statuses:
        assert status == "closed" or (isinstance(status, int) and 100 <= status < 600), where
    data, method = build_request(request)
    case = Case(
        id=str(raw["id"]),
        cls=str(raw["class"]),
        imitates=str(raw["imitates"]),
        method=method,
        data=data,
        peer=request.get("peer"),
        proxy=dict(request.get("proxy", {})),
        statuses=statuses,
        reason=expect.get("reason"),
        backend_target=(
            str(expect["backend_target"]).encode("utf-8") if "backend_target" in expect else None
        ),
        backend_method=(
            str(expect["backend_method"]).encode("latin-1") if "backend_method" in expect else None
        ),
        backend_headers=dict(expect.get("backend_headers", {})),
    )
    if case.forwards:
        # A case either forwards or is refused; never "whichever happens".
        assert all(isinstance(s, int) and 200 <= s < 300 for s in statuses), where
        assert case.backend_target is not None, f"{where}: a 2xx case names its backend_target"
        assert case.reason is None, f"{where}: a forwarded answer is the backend's, no reason"
    else:
        assert case.backend_target is None and not case.backend_headers, where
        assert statuses <= PROXY_STATUSES | {"closed"}, f"{where}: {sorted(map(str, statuses))}"
    return case


def load_corpus() -> list[Case]:
    cases: list[Case] = []
    for path in sorted(CORPUS.glob("*.json")):
        document = json.loads(path.read_text(encoding="utf-8"))
        assert str(document["description"]).strip(), f"{path.name}: no description"
        cases.extend(parse_case(raw, path.name) for raw in document["cases"])
    return cases


CASES = load_corpus()


def normalize(name: bytes) -> str:
    """A header name the way a CGI/WSGI backend reads it: case-insensitive, `_` as `-`."""
    return name.decode("latin-1").strip().lower().replace("_", "-")


def body_reason(reply: RawReply) -> str | None:
    _, _, body = reply.data.partition(b"\r\n\r\n")
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed.get("reason") if isinstance(parsed, dict) else None


@dataclass
class Bench:
    """One recorder for the module and one proxy per distinct settings override, started once:
    ~450 cases each starting their own proxy cost more than the cases themselves."""

    recorder: Recorder
    servers: dict[str, Server] = field(default_factory=dict)

    async def proxy_port(self, overrides: dict[str, Any]) -> int:
        key = json.dumps(overrides, sort_keys=True)
        if key not in self.servers:
            settings = Settings(
                upstream=self.recorder.url,
                routes=SHIPPED_ROUTES,
                store=f"file:{SHIPPED_MEMBERS}",
                listen="127.0.0.1:0",
                admin_listen="127.0.0.1:0",
                reload_interval=0,
            )
            settings = replace(settings, **overrides)
            runtime = build_runtime(settings)
            runtime.audit = AuditLog(settings.audit, io.StringIO())
            self.servers[key] = await start(settings, runtime)
        return self.servers[key].proxy_port


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bench() -> AsyncIterator[Bench]:
    recorder = Recorder()
    await recorder.start()
    shared = Bench(recorder)
    yield shared
    for server in shared.servers.values():
        await server.drain_and_stop()
    await recorder.stop()


def test_corpus_ids_are_unique() -> None:
    ids = Counter(case.id for case in CASES)
    assert [i for i, n in ids.items() if n > 1] == []


def test_corpus_covers_every_class_with_enough_cases() -> None:
    per_class = Counter(case.cls for case in CASES)
    assert sorted(CLASSES - set(per_class)) == []
    assert sum(per_class.values()) >= MINIMUM_CASES, dict(per_class)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
async def test_case(case: Case, bench: Bench) -> None:
    recorder = bench.recorder
    port = await bench.proxy_port(case.proxy)
    recorder.requests.clear()
    recorder.protocol_errors.clear()
    # Every case asks for Connection: close, so the read ends when the proxy closes; the long
    # quiet period only keeps a slow (loaded) machine from cutting a reply short.
    reply = await send_raw(port, case.data, local_host=case.peer, quiet=QUIET)
    outcome: int | str | None = reply.status
    if outcome is None and reply.closed:
        outcome = "closed"
    assert outcome in case.statuses, f"{case.imitates}: got {outcome}, {reply.data[:300]!r}"
    assert recorder.protocol_errors == []

    if not case.forwards:
        # The proxy answered by itself: the protected handler never ran.
        assert recorder.requests == []
        if case.reason is not None:
            assert body_reason(reply) == case.reason
        return

    assert len(recorder.requests) == 1, recorder.targets()
    received = recorder.requests[0]
    assert received.target == case.backend_target
    assert received.method == (case.backend_method or case.method)
    for line in received.header_lines:
        assert normalize(line.partition(b":")[0]) not in NEVER_FORWARDED, (
            f"client header reached backend: {line!r}"
        )
        assert MARKER not in line.lower(), f"a forged value reached the backend: {line!r}"
    for injected in INJECTED:
        received.header(injected)  # at most one copy of each
    for header, value in case.backend_headers.items():
        expected = None if value is None else value.encode("latin-1")
        assert received.header(header) == expected, header
