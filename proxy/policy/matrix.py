"""Role × permission and role × route tables of a Policy, as data, Markdown, HTML or JSON."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass

from proxy.policy.model import Policy, Route

YES, NO = "✓", "✗"


@dataclass(frozen=True, slots=True)
class Matrix:
    roles: tuple[str, ...]
    permissions: tuple[tuple[str, tuple[bool, ...]], ...]  # permission, granted per role
    routes: tuple[tuple[str, str, str, tuple[bool, ...]], ...]  # methods, path, requirement, cells


def route_requirement(route: Route) -> str:
    if route.public:
        return "public"
    if route.authenticated:
        return "authenticated"
    return route.permission or ""


def role_allows(policy: Policy, role: str, route: Route) -> bool:
    """Whether an org-wide `role` (on a plan that includes it) may use `route`."""
    if route.public or route.authenticated:
        return True
    return route.permission is not None and route.permission in policy.roles[role].granted


def build_matrix(policy: Policy) -> Matrix:
    roles = tuple(policy.roles)
    permissions = tuple(
        (perm, tuple(perm in policy.roles[r].granted for r in roles))
        for perm in sorted(policy.permissions)
    )
    routes = tuple(
        (
            ", ".join(sorted(r.methods)) if r.methods is not None else "*",
            r.template,
            route_requirement(r),
            tuple(role_allows(policy, role, r) for role in roles),
        )
        for r in policy.routes
    )
    return Matrix(roles, permissions, routes)


def _mark(ok: bool) -> str:
    return YES if ok else NO


def render_markdown(policy: Policy) -> str:
    m = build_matrix(policy)
    names = [policy.roles[r].description or r for r in m.roles]
    lines = ["## Role × permission", ""]
    lines.append("| permission | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for perm, cells in m.permissions:
        lines.append(f"| {perm} | " + " | ".join(_mark(c) for c in cells) + " |")
    lines += ["", "## Role × route", ""]
    lines.append("| method | path | permission | " + " | ".join(m.roles) + " |")
    lines.append("|---|---|---|" + "---|" * len(m.roles))
    for methods, path, requirement, cells in m.routes:
        row = f"| {methods} | {path} | {requirement} | "
        lines.append(row + " | ".join(_mark(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def render_json(policy: Policy) -> str:
    m = build_matrix(policy)
    data = {
        "roles": [{"name": r, "description": policy.roles[r].description} for r in m.roles],
        "permissions": [
            {"permission": p, "roles": [r for r, ok in zip(m.roles, cells, strict=True) if ok]}
            for p, cells in m.permissions
        ],
        "routes": [
            {
                "methods": methods,
                "path": path,
                "permission": requirement,
                "roles": [r for r, ok in zip(m.roles, cells, strict=True) if ok],
            }
            for methods, path, requirement, cells in m.routes
        ],
    }
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def render_html(policy: Policy) -> str:
    m = build_matrix(policy)
    esc = html.escape

    def table(head: list[str], rows: list[list[str]]) -> str:
        out = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
        out += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        return "\n".join([*out, "</table>"])

    names = [policy.roles[r].description or r for r in m.roles]
    perm_rows = [[p, *(_mark(c) for c in cells)] for p, cells in m.permissions]
    route_rows = [[a, b, c, *(_mark(x) for x in cells)] for a, b, c, cells in m.routes]
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>rbac-proxy matrix</title>'
        "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px}"
        "</style></head><body>\n<h2>Role × permission</h2>\n"
        + table(["permission", *names], perm_rows)
        + "\n<h2>Role × route</h2>\n"
        + table(["method", "path", "permission", *m.roles], route_rows)
        + "\n</body></html>\n"
    )
