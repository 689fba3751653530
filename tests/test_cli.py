"""Tests for the CLI (proxy.__main__): check, explain and matrix on shipped and broken files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.__main__ import main
from tests.policy.test_shipped_policy import ROLES, spec_cells

ROOT = Path(__file__).resolve().parents[1]
ROUTES = ROOT / "routes.yaml"
MEMBERS = ROOT / "members.yaml"
DEPLOY = "/api/projects/proj-prod/workflows/wf-1/deploy"
# bob's POST /api/org/invites case in the shipped routes.yaml (a ✗ cell of SPEC §10)
BOB_INVITES = "bob,     method: POST,   path: /api/org/invites, expect: "


def line_of(text: str, needle: str) -> int:
    """1-based line of the only occurrence of `needle` in `text`."""
    assert text.count(needle) == 1, needle
    return text[: text.index(needle)].count("\n") + 1


def broken_copy(tmp_path: Path, old: str, new: str) -> tuple[Path, str]:
    """A copy of the shipped routes.yaml with `old` (which must occur once) replaced by `new`."""
    text = ROUTES.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    path = tmp_path / "routes.yaml"
    mutated = text.replace(old, new)
    path.write_text(mutated, encoding="utf-8")
    return path, mutated


# ---- check -----------------------------------------------------------------------------------


def test_check_passes_on_shipped_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--routes", str(ROUTES)]) == 0
    out, err = capsys.readouterr()
    assert "OK, 47 routes, 247 policy tests passed" in out
    assert err == ""


def test_check_reads_routes_from_env(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path, _ = broken_copy(tmp_path, "permission: workflows:deploy", "permission: workflow:deploy")
    monkeypatch.setenv("RBAC_PROXY_ROUTES", str(path))
    assert main(["check"]) == 1
    assert str(path) in capsys.readouterr().err


def test_python_dash_m_proxy_check_is_the_real_entry_point() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBAC_PROXY_")}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "routes.yaml: OK" in result.stdout


def test_python_dash_m_proxy_check_fails_on_a_broken_file(tmp_path: Path) -> None:
    path, text = broken_copy(
        tmp_path, "permission: workflows:deploy", "permission: workflow:deploy"
    )
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--routes", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"{path}:{line_of(text, 'workflow:deploy')}: ")


@pytest.mark.parametrize(
    ("old", "new", "blame", "words"),
    [
        pytest.param(
            "permission: workflows:deploy",
            "permission: workflow:deploy",
            "workflow:deploy",
            ["unknown permission 'workflow:deploy'", "did you mean 'workflows:deploy'"],
            id="typo-permission",
        ),
        pytest.param(
            "  - path: /api/org/billing\n    methods: [PUT]\n",
            "  - path: /api/org/billing\n    methods: [PUT]\n    permission: billing:write\n"
            "  - path: /api/org/billing\n    methods: [PUT]\n",
            "  - path: /api/org/billing\n    methods: [PUT]\n    permission: billing:write\n",
            ["route conflicts with the route at line"],
            id="duplicate-route",
        ),
        pytest.param(
            "    websocket: true\n",
            "    websocket: true\n    websockets: true\n",
            "websockets: true",
            ["unknown key 'websockets' in a route", "did you mean 'websocket'"],
            id="unknown-key",
        ),
        pytest.param(
            BOB_INVITES + "deny, reason: missing_permission}",
            BOB_INVITES + "allow, reason: allowed}",
            "{user: bob,     method: POST,   path: /api/org/invites",
            ["POST /api/org/invites as bob: expected allow (allowed), got deny "],
            id="failing-test-case",
        ),
    ],
)
def test_check_rejects_broken_copy_naming_the_line(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    old: str,
    new: str,
    blame: str,
    words: list[str],
) -> None:
    path, text = broken_copy(tmp_path, old, new)
    if blame.startswith("  - path:"):
        # the duplicate is the second occurrence: blame its `- path:` line
        first = text.index(blame)
        line = text[: text.index(blame, first + 1)].count("\n") + 1
        original = text[:first].count("\n") + 1
        words = [*words, f"line {original}"]
    else:
        line = line_of(text, blame)
    assert main(["check", "--routes", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    first_line = err.splitlines()[0]
    assert first_line.startswith(f"{path}:{line}: "), err
    for word in words:
        assert word in first_line, err


def test_check_failing_case_reports_the_count(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path, _ = broken_copy(
        tmp_path,
        BOB_INVITES + "deny, reason: missing_permission}",
        BOB_INVITES + "allow}",
    )
    assert main(["check", "--routes", str(path)]) == 1
    assert f"{path}: 1 of 247 policy tests failed" in capsys.readouterr().err


def test_check_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["check", "--routes", str(missing)]) == 1
    assert capsys.readouterr().err.startswith(f"{missing}:0: cannot read")


# ---- explain ---------------------------------------------------------------------------------


def explain(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, str]]:
    code = main(["explain", "--routes", str(ROUTES), "--store", f"file:{MEMBERS}", *args])
    out = capsys.readouterr().out
    fields: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return code, fields


def test_explain_allow(capsys: pytest.CaptureFixture[str]) -> None:
    code, f = explain(
        capsys, "--user", "bob", "POST", DEPLOY.replace("/workflows", "//workflows") + "?x=1"
    )
    assert code == 0
    assert f["canonical"] == DEPLOY
    assert f["route"].startswith("/api/projects/{project_id}/workflows/{workflow_id}/deploy")
    assert "(line " in f["route"]
    assert f["params"] == "project_id=proj-prod, workflow_id=wf-1"
    assert f["permission"] == "workflows:deploy"
    assert f["membership"] == "acme (plan enterprise): developer"
    assert f["project org"] == "acme"
    assert f["role"] == "developer"
    assert f["decision"] == "allow"
    assert f["reason"] == "allowed"


def test_explain_deny(capsys: pytest.CaptureFixture[str]) -> None:
    code, f = explain(capsys, "--user", "sue", "GET", "/api/org/billing")
    assert code == 1
    assert f["route"].startswith("/api/org/billing")
    assert f["params"] == "-"
    assert f["permission"] == "billing:read"
    assert f["membership"] == "acme (plan enterprise): support"
    assert f["role"] == "support"
    assert (f["decision"], f["reason"]) == ("deny", "missing_permission")
    assert "billing:read" in f["message"]


def test_explain_project_binding_and_org_hint(capsys: pytest.CaptureFixture[str]) -> None:
    code, f = explain(capsys, "--user", "carol", "GET", "/api/projects/proj-staging/workflows")
    assert code == 0
    assert f["membership"] == "acme (plan enterprise): per-project proj-staging=developer"
    assert f["role"] == "developer"
    code, f = explain(capsys, "--user", "carol", "GET", "/api/org")
    assert (code, f["role"], f["reason"]) == (0, "-", "allowed")
    assert f["permission"].startswith("authenticated")
    code, f = explain(capsys, "--user", "alice", "--org", "smallco", "GET", "/api/org")
    assert code == 1
    assert "org hint: smallco" in f["user"]
    assert f["reason"] == "not_a_member"


def test_explain_plan_restricted_and_unknown_user(capsys: pytest.CaptureFixture[str]) -> None:
    code, f = explain(capsys, "--user", "fay", "GET", "/api/org")
    assert (code, f["reason"]) == (1, "plan_restricted")
    code, f = explain(capsys, "--user", "mallory", "GET", "/api/org")
    assert (code, f["membership"], f["reason"]) == (1, "(none)", "not_a_member")


def test_explain_anonymous_public_and_protected(capsys: pytest.CaptureFixture[str]) -> None:
    code, f = explain(capsys, "GET", "/healthz")
    assert (code, f["permission"], f["reason"]) == (0, "public", "public")
    assert f["user"] == "(anonymous)"
    code, f = explain(capsys, "GET", "/api/org")
    assert (code, f["reason"]) == (1, "missing_credentials")


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/a/%2e%2e/b"), ("GET", "/api/org%2Fbilling"), ("TRACE", "/api/org")],
)
def test_explain_bad_input_exits_2(
    capsys: pytest.CaptureFixture[str], method: str, path: str
) -> None:
    code, f = explain(capsys, "--user", "alice", method, path)
    assert code == 2
    assert (f["decision"], f["reason"]) == ("deny", "bad_request")


def test_explain_dot_segments_are_rejected_before_matching(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, f = explain(capsys, "--user", "alice", "GET", "/a/%2e%2e/b")
    assert code == 2
    assert f["canonical"] == "(rejected)"
    assert f["route"] == "(none)"


def test_explain_no_route(capsys: pytest.CaptureFixture[str]) -> None:
    code, f = explain(capsys, "--user", "alice", "GET", "/api/unknown")
    assert (code, f["route"], f["reason"]) == (1, "(none)", "no_route")


def test_explain_unsupported_store(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["explain", "--store", "ftp://127.0.0.1/x", "--user", "a", "GET", "/api/org"])
    assert code == 2
    assert "file:PATH" in capsys.readouterr().err


# ---- matrix ----------------------------------------------------------------------------------


def markdown_route_rows(text: str) -> list[list[str]]:
    """Body rows of the "Role × route" table in `matrix --format md` output."""
    section = text.split("## Role × route", 1)[1]
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("|")
    ]
    assert rows[0][:3] == ["method", "path", "permission"]
    assert rows[0][3:] == list(ROLES)
    return rows[2:]  # skip the header and the |---| line


def test_matrix_markdown_reproduces_spec_10(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["matrix", "--routes", str(ROUTES), "--format", "md"]) == 0
    out = capsys.readouterr().out
    cells = spec_cells()
    seen: set[tuple[str, str]] = set()
    for methods, path, requirement, *marks in markdown_route_rows(out):
        for method in methods.split(", "):
            key = (method, path)
            assert key in cells, f"matrix row {key} is not in SPEC §10"
            permission, want = cells[key]
            assert requirement == permission, key
            assert marks == ["✓" if want[role] else "✗" for role in ROLES], key
            seen.add(key)
    assert seen == set(cells)


def test_matrix_markdown_permission_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["matrix", "--routes", str(ROUTES)]) == 0
    out = capsys.readouterr().out
    section = out.split("## Role × permission", 1)[1].split("## Role × route", 1)[0]
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("|")
    ]
    assert rows[0] == ["permission", "Organization Admin", "Developer", "Support"]
    by_permission = {row[0]: row[1:] for row in rows[2:]}
    for permission, marks in cells_by_permission().items():
        assert by_permission[permission] == marks, permission
    assert set(by_permission) == set(cells_by_permission())


def cells_by_permission() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for permission, marks in spec_cells().values():
        if permission not in ("public", "authenticated"):
            found[permission] = ["✓" if marks[r] else "✗" for r in ROLES]
    return found


def test_matrix_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["matrix", "--routes", str(ROUTES), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in data["roles"]] == list(ROLES)
    assert len(data["routes"]) == 47
    by_key = {(r["methods"], r["path"]): r for r in data["routes"]}
    billing = by_key["GET", "/api/org/billing"]
    assert (billing["permission"], billing["roles"]) == ("billing:read", ["admin"])
    perms = {p["permission"]: p["roles"] for p in data["permissions"]}
    assert perms["secrets:create"] == ["admin", "developer"]
    assert perms["task_history:read"] == list(ROLES)


def test_matrix_html(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["matrix", "--routes", str(ROUTES), "--format", "html"]) == 0
    out = capsys.readouterr().out
    assert out.count("<table>") == 2
    assert out.count("</table>") == 2
    assert "<td>/api/projects/{project_id}/secrets/{secret_name}</td>" in out
    assert "<th>Organization Admin</th>" in out


def test_matrix_on_a_broken_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path, _ = broken_copy(tmp_path, "permission: workflows:deploy", "permission: workflow:deploy")
    assert main(["matrix", "--routes", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"{path}:")
