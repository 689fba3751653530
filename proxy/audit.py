"""One JSON line per decision (SPEC §9), written without secrets."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Literal, TextIO

AuditMode = Literal["all", "deny", "off"]

# One line is _HEAD + _MIDDLE + _TAIL. The middle holds the fields that repeat from request
# to request (same caller, same path, same verdict), so its encoded text is kept per value.
_HEAD = '{"ts":"%s.%03dZ","request_id":%s,'
_MIDDLE = (
    '"remote":%s,"user":%s,"org":%s,"project":%s,"method":%s,"path":%s,"route":%s,'
    '"permission":%s,"decision":%s,"reason":%s,'
)
_TAIL = '"status":%d,"duration_ms":%.3f,"stale":%s}'
_MIDDLES_LIMIT = 4096
_MIDDLE_MAX_PATH = 512  # longer paths are encoded every time: bounded memory (~10 MB at most)


def _str(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


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
        self._middles: dict[tuple[str | None, ...], str] = {}

    def wants(self, denied: bool) -> bool:
        return self.mode == "all" or (self.mode == "deny" and denied)

    def write(self, record: AuditRecord) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:  # strftime once per second, not per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        # %-formats with C-escaped strings: about 4x cheaper than json.dumps of a dict on the
        # hot path; the output is the same JSON object (tests parse every line).
        r = record
        key = (
            r.remote,
            r.user,
            r.org,
            r.project,
            r.method,
            r.path,
            r.route,
            r.permission,
            r.decision,
            r.reason,
        )
        middle = self._middles.get(key)
        if middle is None:
            middle = _MIDDLE % tuple(map(_str, key))
            if len(r.path) <= _MIDDLE_MAX_PATH:
                if len(self._middles) >= _MIDDLES_LIMIT:
                    self._middles.clear()  # bounded: distinct paths and callers refill it
                self._middles[key] = middle
        line = (
            _HEAD % (self._stamp, int((now - second) * 1000), _str(r.request_id))
            + middle
            + _TAIL % (r.status, r.duration_ms, "true" if r.stale else "false")
        )
        if r.shadow_reason is not None:
            line = line[:-1] + ',"shadow_reason":' + _str(r.shadow_reason) + "}"
        self._pending.append(line)
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
