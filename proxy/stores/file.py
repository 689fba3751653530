"""Role store backed by a members.yaml file, reloaded only when its content changes."""

from __future__ import annotations

import hashlib

from proxy.policy.members import Directory, parse_members
from proxy.policy.model import Membership, PolicyError, Problem
from proxy.yamlsource import parse_yaml


class FileStore:
    """Answers from an in-memory Directory parsed from `path` (SPEC §6, `--store file:PATH`)."""

    backend: str = "file"

    def __init__(self, path: str) -> None:
        """Load the file now: a missing (OSError) or invalid (PolicyError) file fails startup."""
        self._path = path
        data = self._read()
        self._directory = self._parse(data)
        self._digest = hashlib.sha256(data).hexdigest()

    @property
    def path(self) -> str:
        return self._path

    @property
    def digest(self) -> str:
        """sha256 of the content the active directory was loaded from."""
        return self._digest

    @property
    def directory(self) -> Directory:
        return self._directory

    def reload(self) -> bool:
        """Re-read the file; True when its content changed and the new directory is in use.

        Raises OSError or PolicyError and keeps serving the previous directory when the new
        file cannot be read or parsed. Content, not mtime, decides: a Kubernetes ConfigMap
        update swaps a symlink, which need not change the mtime seen through it.
        """
        data = self._read()
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            return False
        directory = self._parse(data)
        # One reference swap: a lookup sees the old directory or the new one, never a mix.
        self._directory, self._digest = directory, digest
        return True

    async def memberships(self, user: str) -> tuple[Membership, ...]:
        return self._directory.memberships(user)

    async def project_org(self, project: str) -> str | None:
        return self._directory.project_org(project)

    async def open(self) -> None:
        """Nothing to open: the file was read at construction."""

    async def ping(self) -> None:
        """Always usable: a FileStore only exists with a parsed directory."""

    async def close(self) -> None:
        """Nothing to release: the file is read whole and closed at each load."""

    def _read(self) -> bytes:
        with open(self._path, "rb") as handle:
            return handle.read()

    def _parse(self, data: bytes) -> Directory:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise PolicyError([Problem(self._path, line, "the file is not valid UTF-8")]) from None
        return parse_members(parse_yaml(text, self._path), self._path)
