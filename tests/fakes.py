"""Small test doubles and YAML fragments shared by several test modules."""

from __future__ import annotations


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# The shipped members.yaml in inline form, without its last smallco member so that a test can
# add the cross-org member it needs (e.g. "      bob: admin\n").
TWO_ORGS_MEMBERS = """\
orgs:
  acme:
    plan: enterprise
    projects: [proj-prod, proj-staging]
    members:
      alice: admin
      bob: developer
      sue: support
      carol: {projects: {proj-staging: developer}}
      dan: {projects: {proj-prod: support}}
  smallco:
    plan: pro
    projects: [sc-main]
    members:
      ed: admin
      gus: developer
      fay: support
"""

# Roles and plans for small routes files written by tests (admin everything, developer
# team:read, support task history; support and bindings on enterprise only).
ROLES_AND_PLANS = """\
roles:
  admin:
    permissions: ["*"]
  developer:
    permissions: [team:read]
  support:
    permissions: [task_history:read]
plans:
  enterprise:
    roles: [admin, developer, support]
    project_bindings: true
  "*":
    roles: [admin, developer]
    project_bindings: false
"""
