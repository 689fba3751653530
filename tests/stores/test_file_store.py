"""Tests for proxy.stores.file: loading, answers, content-based reload, keeping the old file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.policy.model import Membership, PolicyError
from proxy.stores.base import RoleStore
from proxy.stores.file import FileStore
from tests.fakes import TWO_ORGS_MEMBERS

SHIPPED_LIKE = TWO_ORGS_MEMBERS + '      alice: developer\n'


@pytest.fixture
def members_file(tmp_path: Path) -> Path:
    path = tmp_path / "members.yaml"
    path.write_text(SHIPPED_LIKE, encoding="utf-8")
    return path


async def test_answers_memberships_from_the_file(members_file: Path) -> None:
    store = FileStore(str(members_file))
    assert store.backend == "file"
    assert await store.memberships("bob") == (Membership("acme", "enterprise", "developer"),)
    carol = await store.memberships("carol")
    assert len(carol) == 1
    assert carol[0].org == "acme" and carol[0].role is None
    assert dict(carol[0].projects) == {"proj-staging": "developer"}
    alice = await store.memberships("alice")
    assert [(m.org, m.plan, m.role) for m in alice] == [
        ("acme", "enterprise", "admin"),
        ("smallco", "pro", "developer"),
    ]
    assert await store.memberships("mallory") == ()


async def test_answers_project_org(members_file: Path) -> None:
    store = FileStore(str(members_file))
    assert await store.project_org("proj-staging") == "acme"
    assert await store.project_org("sc-main") == "smallco"
    assert await store.project_org("nope") is None


async def test_satisfies_the_protocol_and_ping_close(members_file: Path) -> None:
    store: RoleStore = FileStore(str(members_file))
    await store.ping()
    await store.close()


def test_directory_property(members_file: Path) -> None:
    store = FileStore(str(members_file))
    assert store.path == str(members_file)
    assert "fay" in store.directory.users()


def test_reload_unchanged_is_false(members_file: Path) -> None:
    store = FileStore(str(members_file))
    before = store.directory
    assert store.reload() is False
    assert store.directory is before


def test_reload_changed_is_true_and_applies(members_file: Path) -> None:
    store = FileStore(str(members_file))
    members_file.write_text(SHIPPED_LIKE.replace("bob: developer", "bob: admin"), "utf-8")
    assert store.reload() is True
    assert store.directory.memberships("bob")[0].role == "admin"
    assert store.reload() is False


def test_reload_sees_a_content_change_that_keeps_mtime(members_file: Path) -> None:
    store = FileStore(str(members_file))
    stat = members_file.stat()
    # Same length and same mtime: only the content tells the files apart.
    members_file.write_text(SHIPPED_LIKE.replace("sue: support", "sue: admin__"), "utf-8")
    os.utime(members_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert members_file.stat().st_size == stat.st_size
    assert store.reload() is True
    assert store.directory.memberships("sue")[0].role == "admin__"


def test_reload_follows_a_configmap_style_symlink_swap(tmp_path: Path) -> None:
    first = tmp_path / "v1.yaml"
    second = tmp_path / "v2.yaml"
    first.write_text(SHIPPED_LIKE, "utf-8")
    second.write_text(SHIPPED_LIKE.replace("ed: admin", "ed: developer"), "utf-8")
    link = tmp_path / "members.yaml"
    link.symlink_to(first)
    store = FileStore(str(link))
    assert store.directory.memberships("ed")[0].role == "admin"
    tmp_link = tmp_path / "members.yaml.tmp"
    tmp_link.symlink_to(second)
    tmp_link.replace(link)  # atomic rename, as kubelet does
    assert store.reload() is True
    assert store.directory.memberships("ed")[0].role == "developer"


async def test_broken_reload_raises_with_location_and_keeps_old(members_file: Path) -> None:
    store = FileStore(str(members_file))
    before = store.directory
    # Line 9 (carol) gets an unknown key inside a member binding.
    broken = SHIPPED_LIKE.replace(
        "      carol: {projects: {proj-staging: developer}}",
        "      carol: {projectz: {proj-staging: developer}}",
    )
    members_file.write_text(broken, "utf-8")
    with pytest.raises(PolicyError) as caught:
        store.reload()
    assert caught.value.problems
    assert all(p.file == str(members_file) for p in caught.value.problems)
    assert str(caught.value).startswith(f"{members_file}:9: ")
    assert store.directory is before
    assert await store.memberships("carol") != ()
    # Still broken: the next reload reports it again rather than claiming "unchanged".
    with pytest.raises(PolicyError):
        store.reload()
    members_file.write_text(SHIPPED_LIKE, "utf-8")
    assert store.reload() is False  # back to the content that is already in use


def test_reload_of_invalid_yaml_keeps_old(members_file: Path) -> None:
    store = FileStore(str(members_file))
    before = store.directory
    members_file.write_text("orgs:\n  acme: [unclosed\n", "utf-8")
    with pytest.raises(PolicyError) as caught:
        store.reload()
    assert str(caught.value).startswith(f"{members_file}:")
    assert store.directory is before


def test_reload_of_a_vanished_file_raises_oserror_and_keeps_old(members_file: Path) -> None:
    store = FileStore(str(members_file))
    before = store.directory
    members_file.unlink()
    with pytest.raises(FileNotFoundError):
        store.reload()
    assert store.directory is before


def test_missing_file_fails_at_init(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(OSError) as caught:
        FileStore(str(missing))
    assert str(missing) in str(caught.value)


def test_invalid_file_fails_at_init(tmp_path: Path) -> None:
    path = tmp_path / "members.yaml"
    path.write_text("orgs:\n  acme:\n    members: {}\n", "utf-8")
    with pytest.raises(PolicyError) as caught:
        FileStore(str(path))
    assert str(caught.value).startswith(f"{path}:2: ")


def test_non_utf8_file_is_a_policy_error_with_line(tmp_path: Path) -> None:
    path = tmp_path / "members.yaml"
    path.write_bytes(b"orgs:\n  acme:\n    plan: \xff\n")
    with pytest.raises(PolicyError) as caught:
        FileStore(str(path))
    assert str(caught.value) == f"{path}:3: the file is not valid UTF-8"
