"""Settings: every flag has an RBAC_PROXY_* variable; flags win; bad values are clear errors."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from proxy.settings import (
    Settings,
    SettingsError,
    add_serve_flags,
    env_name,
    parse_hostport,
    parse_upstream,
    settings_from,
)


def _parse(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    return settings_from(parser.parse_args(argv), env or {})


def test_every_field_has_a_flag_and_an_env_var() -> None:
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    flags = {a.dest for a in parser._actions}
    for f in fields(Settings):
        assert f.name in flags
        assert env_name(f.name) == "RBAC_PROXY_" + f.name.upper()


def test_flag_beats_env_beats_default() -> None:
    assert _parse([]).cache_ttl == 30.0
    assert _parse([], {"RBAC_PROXY_CACHE_TTL": "7"}).cache_ttl == 7.0
    assert _parse(["--cache-ttl", "3"], {"RBAC_PROXY_CACHE_TTL": "7"}).cache_ttl == 3.0
    assert _parse([], {"RBAC_PROXY_WORKERS": "2"}).workers == 2
    assert _parse([], {"RBAC_PROXY_AUTH": "jwt", "RBAC_PROXY_JWKS": "k.json"}).auth == "jwt"


@pytest.mark.parametrize(
    ("argv", "env", "fragment"),
    [
        (["--cache-ttl", "soon"], {}, "--cache-ttl"),
        ([], {"RBAC_PROXY_CACHE_TTL": "-1"}, "RBAC_PROXY_CACHE_TTL"),
        (["--workers", "0"], {}, "--workers"),
        ([], {"RBAC_PROXY_AUDIT": "some"}, "RBAC_PROXY_AUDIT"),
        (["--listen", "8080"], {}, "--listen"),
        (["--listen", "h:99999"], {}, "out of range"),
        (["--auth", "jwt"], {}, "exactly one"),
        (["--auth", "jwt", "--jwks", "a", "--jwt-key", "b"], {}, "exactly one"),
    ],
)
def test_bad_values_name_their_source(argv: list[str], env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment):
        _parse(argv, env)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("http://127.0.0.1:3000", True),
        ("https://backend.internal", True),
        ("http://127.0.0.1:3000/", True),
        ("", False),
        ("ftp://x", False),
        ("http://127.0.0.1:3000/api", False),
        ("http://127.0.0.1:3000?x=1", False),
        ("127.0.0.1:3000", False),
    ],
)
def test_upstream_url(text: str, ok: bool) -> None:
    if ok:
        assert parse_upstream(text).path in ("", "/")
    else:
        with pytest.raises(SettingsError):
            parse_upstream(text)


def test_hostport_forms() -> None:
    assert parse_hostport("0.0.0.0:8080", "--listen") == ("0.0.0.0", 8080)
    assert parse_hostport("[::1]:9090", "--listen") == ("::1", 9090)
    assert parse_hostport(":8080", "--listen") == ("0.0.0.0", 8080)
