"""The docs cannot drift from the code: every flag, env var and metric is documented."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from prometheus_client import CollectorRegistry

from proxy.metrics import Metrics
from proxy.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[1]
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()


def test_every_flag_and_env_var_is_documented() -> None:
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        assert f"`{flag}`" in OPERATIONS, flag
        assert env_name(f.name) in OPERATIONS, env_name(f.name)


def test_every_metric_is_documented() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    families = {(m.name, m.type) for m in registry.collect()}
    assert len(families) == 15
    for name, kind in families:
        exposed = name + "_total" if kind == "counter" else name
        assert f"`{exposed}`" in OPERATIONS, exposed


def test_readme_quick_start_commands_exist_in_the_makefile() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    quick = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    targets = re.findall(r"^make (\w+)", quick, flags=re.M)
    assert targets == ["demo", "test"]
    for target in targets:
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci  # CI runs exactly the README's test command
