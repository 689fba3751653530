"""Audit lines are one valid JSON object each, whatever the strings hold."""

from __future__ import annotations

import io
import json

import pytest

from proxy.audit import AuditLog, AuditRecord

HOSTILE = ['b"ob', "line\nbreak", "tab\t", "é ü 漢", "\udcff", "back\\slash", "</script>", ""]


def _record(value: str | None, shadow: str | None = None) -> AuditRecord:
    return AuditRecord(
        request_id="r1",
        remote=value,
        user=value,
        org=None,
        project=value,
        method="GET",
        path="/p",
        route=value,
        permission=None,
        decision="deny",
        reason="missing_permission",
        status=403,
        duration_ms=1.23456,
        stale=True,
        shadow_reason=shadow,
    )


@pytest.mark.parametrize("value", [*HOSTILE, None])
def test_every_line_parses_back_to_the_record(value: str | None) -> None:
    out = io.StringIO()
    log = AuditLog("all", out)
    log.write(_record(value, shadow="missing_permission"))
    log.write(_record(value))
    log.flush()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # no newline inside a line, whatever the values
    first, second = (json.loads(line) for line in lines)
    assert first["user"] == value and first["project"] == value and first["org"] is None
    assert first["status"] == 403 and first["duration_ms"] == 1.235 and first["stale"] is True
    assert first["shadow_reason"] == "missing_permission"
    assert "shadow_reason" not in second
    assert first["ts"].endswith("Z") and len(first["ts"]) == len("2026-12-03T18:00:30.008Z")
    assert set(second) == {
        "ts", "request_id", "remote", "user", "org", "project", "method", "path", "route",
        "permission", "decision", "reason", "status", "duration_ms", "stale",
    }  # fmt: skip


def test_wants_follows_the_mode() -> None:
    assert AuditLog("all").wants(False) and AuditLog("all").wants(True)
    assert not AuditLog("deny").wants(False) and AuditLog("deny").wants(True)
    assert not AuditLog("off").wants(True)


@pytest.mark.parametrize("value", [*HOSTILE, None])
def test_a_repeated_record_gives_the_same_line(value: str | None) -> None:
    # The encoded middle of a line is reused for repeated field values; never stale text.
    out = io.StringIO()
    log = AuditLog("all", out)
    for record in (_record(value), _record(value), _record("other"), _record(value)):
        log.write(record)
    log.flush()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    for line in lines:
        del line["ts"]
    assert lines[0] == lines[1] == lines[3] != lines[2]
    assert lines[2]["user"] == "other" and lines[3]["user"] == value
