"""CLI entry point: parse flags and env vars, then run serve, check, explain, matrix or demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from proxy import __version__

if TYPE_CHECKING:
    from proxy.policy.evaluate import Snapshot
    from proxy.policy.model import Policy

EXIT_OK, EXIT_DENY, EXIT_USAGE = 0, 1, 2


def _default_file(name: str) -> str:
    """./NAME when present, else the copy shipped next to the package (a source checkout)."""
    if Path(name).exists():
        return name
    shipped = Path(__file__).resolve().parent.parent / name
    return str(shipped) if shipped.exists() else name


def build_parser() -> argparse.ArgumentParser:
    from proxy.settings import add_serve_flags

    parser = argparse.ArgumentParser(
        prog="rbac-proxy",
        description="Role-based access control sidecar proxy. Every flag has an env var "
        "RBAC_PROXY_<FLAG> (e.g. --cache-ttl: RBAC_PROXY_CACHE_TTL).",
    )
    parser.add_argument("--version", action="version", version=f"rbac-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy")
    add_serve_flags(serve)

    check = sub.add_parser("check", help="validate routes.yaml and run its policy tests")
    check.add_argument("--routes", default=None, help="routes file [env RBAC_PROXY_ROUTES]")

    explain = sub.add_parser("explain", help="explain the decision for one request")
    explain.add_argument("--routes", default=None)
    explain.add_argument(
        "--store",
        default=None,
        help="file:PATH | postgresql://… | http(s)://… (default file:members.yaml)",
    )
    explain.add_argument("--user", default=None, help="user id (omit for an anonymous request)")
    explain.add_argument("--org", default=None, help="organization hint (X-Org-Id)")
    explain.add_argument("method")
    explain.add_argument("path")

    matrix = sub.add_parser("matrix", help="print the role × permission and role × route tables")
    matrix.add_argument("--routes", default=None)
    matrix.add_argument("--format", choices=("md", "html", "json"), default="md")

    from proxy.stores.cli import add_parser as add_store_parser

    add_store_parser(sub)

    demo = sub.add_parser("demo", help="run the demo backend behind the proxy")
    demo.add_argument("--listen", default="127.0.0.1:8080")
    demo.add_argument("--admin-listen", default="127.0.0.1:9090")
    demo.add_argument("--backend-port", type=int, default=8081)
    return parser


def _routes_path(value: str | None) -> str:
    return value or os.environ.get("RBAC_PROXY_ROUTES") or _default_file("routes.yaml")


def cmd_check(args: argparse.Namespace) -> int:
    from proxy.config import load_policy_file
    from proxy.policy.evaluate import run_policy_tests
    from proxy.policy.model import PolicyError

    path = _routes_path(args.routes)
    try:
        policy, _ = load_policy_file(path, run_tests=False)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return EXIT_DENY
    failures = run_policy_tests(policy)
    for failure in failures:
        print(failure, file=sys.stderr)
    total = len(policy.test_cases)
    if failures:
        print(f"{path}: {len(failures)} of {total} policy tests failed", file=sys.stderr)
        return EXIT_DENY
    print(f"{path}: OK, {len(policy.routes)} routes, {total} policy tests passed")
    return EXIT_OK


async def _snapshot(store_spec: str, policy: Policy, args: argparse.Namespace) -> Snapshot:
    """Ask a PostgreSQL or HTTP store what explain needs, once, through the serve code path."""
    from proxy.policy.evaluate import Snapshot, project_of
    from proxy.settings import Settings
    from proxy.web.serve import build_store

    store = build_store(Settings(store=store_spec))
    await store.open()
    try:
        found = await store.memberships(args.user) if args.user else ()
        project = project_of(policy, args.method, args.path)
        owners = {project: await store.project_org(project)} if project is not None else {}
    finally:
        await store.close()
    return Snapshot(args.user, found, owners)


def cmd_explain(args: argparse.Namespace) -> int:
    from proxy.config import load_policy_file
    from proxy.policy.evaluate import MemberLookup, evaluate
    from proxy.policy.model import Identity, PolicyError
    from proxy.stores.base import StoreError
    from proxy.stores.file import FileStore
    from proxy.web.serve import StartupError

    store = (
        args.store or os.environ.get("RBAC_PROXY_STORE") or "file:" + _default_file("members.yaml")
    )
    try:
        policy, _ = load_policy_file(_routes_path(args.routes), run_tests=False)
        directory: MemberLookup
        if store.startswith("file:"):
            directory = FileStore(store[len("file:") :]).directory
        else:
            directory = asyncio.run(_snapshot(store, policy, args))
    except (PolicyError, OSError, StartupError, StoreError) as exc:
        print(f"explain: {exc}", file=sys.stderr)
        return EXIT_USAGE
    identity = Identity(args.user, args.org) if args.user else None
    ev = evaluate(policy, args.method, args.path, identity, directory)
    d = ev.decision
    print(f"request:      {args.method} {args.path}")
    print(f"canonical:    {ev.target.path if ev.target else '(rejected)'}")
    if ev.match is not None:
        route = ev.match.route
        params = ", ".join(f"{k}={v}" for k, v in ev.match.params.items()) or "-"
        print(f"route:        {route.template}  (line {route.line})")
        print(f"params:       {params}")
    else:
        print(f"route:        {d.route.template if d.route else '(none)'}")
    requirement = "-"
    if d.route is not None and d.route.public:
        requirement = "public"
    elif d.route is not None and d.route.authenticated:
        requirement = "authenticated (any honoured membership of the org)"
    print(f"permission:   {d.permission or requirement}")
    print(
        f"user:         {args.user or '(anonymous)'}"
        + (f"  org hint: {args.org}" if args.org else "")
    )
    if ev.memberships:
        for m in ev.memberships:
            binding = m.role or "per-project " + ", ".join(
                f"{p}={r}" for p, r in m.projects.items()
            )
            print(f"membership:   {m.org} (plan {m.plan}): {binding}")
    elif identity is not None:
        print("membership:   (none)")
    if ev.project_org is not None:
        print(f"project org:  {ev.project_org}")
    print(f"role:         {d.role or '-'}")
    print(f"decision:     {'allow' if d.forward else 'deny'}")
    print(
        f"reason:       {d.reason.value}"
        + (f" (would be {d.shadow_reason.value})" if d.shadow_reason else "")
    )
    if d.message:
        print(f"message:      {d.message}")
    if d.reason.value == "bad_request":
        return EXIT_USAGE
    return EXIT_OK if d.forward else EXIT_DENY


def cmd_matrix(args: argparse.Namespace) -> int:
    from proxy.config import load_policy_file
    from proxy.policy.matrix import render_html, render_json, render_markdown
    from proxy.policy.model import PolicyError

    try:
        policy, _ = load_policy_file(_routes_path(args.routes), run_tests=False)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return EXIT_DENY
    render = {"md": render_markdown, "html": render_html, "json": render_json}[args.format]
    sys.stdout.write(render(policy))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.settings import SettingsError, settings_from
    from proxy.web.serve import StartupError, serve

    try:
        settings = settings_from(args)
    except SettingsError as exc:
        print(f"rbac-proxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(settings.log_level)
    raise_open_files_limit()
    token = os.environ.get("RBAC_PROXY_ADMIN_TOKEN")
    if settings.workers > 1 and "RBAC_PROXY_WORKER_ID" not in os.environ:
        from proxy.web.workers import run_supervisor

        return run_supervisor(settings, token)
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.loop)) as runner:
            runner.run(serve(settings, token))
    except StartupError as exc:
        print(f"rbac-proxy: {exc}", file=sys.stderr)
        return EXIT_DENY
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.web.demo import run_demo
    from proxy.web.serve import StartupError

    _setup_logging("warning")
    try:
        asyncio.run(
            run_demo(
                routes=_default_file("routes.yaml"),
                members=_default_file("members.yaml"),
                listen=args.listen,
                admin_listen=args.admin_listen,
                backend_port=args.backend_port,
            )
        )
    except StartupError as exc:
        print(f"rbac-proxy demo: {exc}", file=sys.stderr)
        return EXIT_DENY
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (auto) or asked for; None means asyncio's default loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("rbac-proxy: --loop uvloop but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


# Linux's default ceiling for one process (fs.nr_open): the soft limit may not exceed it, so an
# unlimited hard limit is met with this instead.
_NR_OPEN = 1_048_576


def raise_open_files_limit() -> None:
    """Lift the soft open-files limit to the hard one, as nginx (worker_rlimit_nofile) and Go
    programs do. Each client connection costs a descriptor and so does its upstream one: a
    container's usual soft limit of 1,024 would cap the proxy near 500 concurrent clients,
    far below what it serves. Workers inherit the raised limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _NR_OPEN if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        logging.getLogger("rbac_proxy").warning(
            "open files limit stays at %d (could not raise it to %d: %s)", soft, target, exc
        )
        return
    logging.getLogger("rbac_proxy").info("open files limit raised from %d to %d", soft, target)


def _setup_logging(level: str) -> None:
    # Logs go to stderr; stdout carries only the JSON audit lines.
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from proxy.stores.cli import run as cmd_store

    commands = {
        "store": cmd_store,
        "serve": cmd_serve,
        "check": cmd_check,
        "explain": cmd_explain,
        "matrix": cmd_matrix,
        "demo": cmd_demo,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
