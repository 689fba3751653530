"""One JSON line per decision (SPEC §9), written without secrets."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import Literal, TextIO

AuditMode = Literal["all", "deny", "off"]

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(frozen=True, slots=True)
class AuditRecord:
    request_id: str
    remote: str | None
    user: str | None
    org: str | None
    project: str | None
    method: str
    path: str  # the canonical path (never the raw target, never the query: it may hold tokens)
    route: str | None
    permission: str | None
    decision: str  # "allow" | "deny"
    reason: str
    status: int
    duration_ms: float
    stale: bool
    shadow_reason: str | None = None


class AuditLog:
    """Writes audit lines to a stream (stdout by default).

    Lines are queued and written in one batch per event-loop iteration: a write and a flush
    per request would cost a syscall each on the hot path. Nothing waits long: the batch is
    written as soon as the loop is idle, and `flush()` empties it (shutdown calls it).
    """

    def __init__(self, mode: AuditMode = "all", stream: TextIO | None = None) -> None:
        self.mode = mode
        self._stream = stream if stream is not None else sys.stdout
        self._pending: list[str] = []
        self._second = -1
        self._stamp = ""

    def wants(self, denied: bool) -> bool:
        return self.mode == "all" or (self.mode == "deny" and denied)

    def write(self, record: AuditRecord) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:  # strftime once per second, not per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        line = {
            "ts": f"{self._stamp}.{int((now - second) * 1000):03d}Z",
            "request_id": record.request_id,
            "remote": record.remote,
            "user": record.user,
            "org": record.org,
            "project": record.project,
            "method": record.method,
            "path": record.path,
            "route": record.route,
            "permission": record.permission,
            "decision": record.decision,
            "reason": record.reason,
            "status": record.status,
            "duration_ms": round(record.duration_ms, 3),
            "stale": record.stale,
        }
        if record.shadow_reason is not None:
            line["shadow_reason"] = record.shadow_reason
        self._pending.append(_encode(line))
        if len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (a command-line use): write at once
                self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            # A closed or broken stdout must never fail a request; the metric still counts it.
            pass
