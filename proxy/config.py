"""Reads routes.yaml from disk into a Policy and swaps it atomically on reload."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from proxy.policy.compile import compile_policy
from proxy.policy.evaluate import run_policy_tests
from proxy.policy.model import Policy, PolicyError, Problem
from proxy.yamlsource import parse_yaml

log = logging.getLogger("rbac_proxy.config")


def load_policy_text(text: str, source: str, *, run_tests: bool = True) -> Policy:
    """Parse, compile and (by default) run the file's own policy tests; PolicyError on failure."""
    policy = compile_policy(parse_yaml(text, source), source)
    if run_tests:
        failures = run_policy_tests(policy)
        if failures:
            raise PolicyError(
                [Problem(source, f.case.line, str(f).split(": ", 1)[1]) for f in failures]
            )
    return policy


def load_policy_file(path: str, *, run_tests: bool = True) -> tuple[Policy, str]:
    """Load a routes file; returns the policy and the sha256 of its content."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyError([Problem(path, 0, f"cannot read: {exc.strerror or exc}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError([Problem(path, 1, f"not UTF-8: {exc}")]) from None
    return load_policy_text(text, path, run_tests=run_tests), hashlib.sha256(data).hexdigest()


class PolicyHolder:
    """Holds the active Policy. A request reads `.policy` once; reload swaps one reference."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.policy, self._digest = load_policy_file(path)

    @property
    def digest(self) -> str:
        """sha256 of the content the active table was loaded from."""
        return self._digest

    def reload(self) -> bool:
        """Load the file again; True if a new table was swapped in, False if unchanged.

        Raises PolicyError (keeping the current table) when the new file is bad.
        """
        policy, digest = load_policy_file(self.path)
        if digest == self._digest:
            return False
        self.policy, self._digest = policy, digest
        log.info("routes reloaded from %s: %d routes", self.path, len(policy.routes))
        return True
