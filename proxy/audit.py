"""One JSON line per decision (SPEC §9), written without secrets."""

from __future__ import annotations

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
    """Writes audit lines to a stream (stdout by default), one line per write call."""

    def __init__(self, mode: AuditMode = "all", stream: TextIO | None = None) -> None:
        self.mode = mode
        self._stream = stream if stream is not None else sys.stdout

    def wants(self, denied: bool) -> bool:
        return self.mode == "all" or (self.mode == "deny" and denied)

    def write(self, record: AuditRecord) -> None:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
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
        try:
            self._stream.write(_encode(line) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            # A closed or broken stdout must never fail a request; the metric still counts it.
            pass
