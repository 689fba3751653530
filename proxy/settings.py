"""Frozen Settings for `serve` from command-line flags and RBAC_PROXY_* environment variables."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

from yarl import URL


class SettingsError(ValueError):
    """A flag or environment variable with an unusable value."""


@dataclass(frozen=True, slots=True)
class Settings:
    upstream: str = ""
    routes: str = "routes.yaml"
    store: str = "file:members.yaml"
    listen: str = "0.0.0.0:8080"
    admin_listen: str = "0.0.0.0:9090"
    workers: int = 1
    auth: Literal["header", "jwt"] = "header"
    user_header: str = "X-User-Id"
    org_header: str = "X-Org-Id"
    trusted_proxies: str = "127.0.0.1/32,::1/128"
    jwt_cookie: str | None = None
    jwt_secret_env: str | None = None
    jwt_key: str | None = None
    jwks: str | None = None
    jwt_leeway: float = 30.0
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_user_claim: str = "sub"
    jwt_org_claim: str = "org_id"
    store_timeout: float = 2.0
    store_query_file: str | None = None
    store_token_env: str | None = None
    cache_ttl: float = 30.0
    cache_negative_ttl: float = 5.0
    cache_size: int = 100_000
    cache_stale_ttl: float = 300.0
    connect_timeout: float = 5.0
    upstream_timeout: float = 60.0
    shutdown_timeout: float = 15.0
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    send_timeout: float = 60.0
    audit: Literal["all", "deny", "off"] = "all"
    inject_user_header: str = "X-Auth-User"
    inject_org_header: str = "X-Auth-Org"
    inject_role_header: str = "X-Auth-Role"
    inject_permission_header: str = "X-Auth-Permission"
    request_id_header: str = "X-Request-Id"
    reload_interval: float = 2.0
    loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    log_level: str = "info"

    @property
    def upstream_url(self) -> URL:
        return parse_upstream(self.upstream)


_HELP: Mapping[str, str] = {
    "upstream": "backend base URL, e.g. http://127.0.0.1:3000 (required)",
    "routes": "routes.yaml path",
    "store": "role store: file:PATH | postgresql://... | http(s)://...",
    "listen": "proxy listen address HOST:PORT",
    "admin_listen": "admin listen address HOST:PORT (metrics, probes, admin API)",
    "workers": "worker processes sharing the proxy port",
    "auth": "identity source: header | jwt",
    "user_header": "trusted user header (header mode)",
    "org_header": "trusted organization header",
    "trusted_proxies": "comma-separated CIDRs whose identity and X-Forwarded-* headers are trusted",
    "jwt_cookie": "cookie holding the JWT when there is no Authorization header",
    "jwt_secret_env": "environment variable holding the HS256/384/512 secret",
    "jwt_key": "PEM public key file (RS*/PS*/ES*/EdDSA)",
    "jwks": "JWKS URL or file",
    "jwt_leeway": "seconds of clock skew allowed for exp/nbf",
    "jwt_issuer": "required iss claim",
    "jwt_audience": "required aud claim",
    "jwt_user_claim": "claim holding the user id",
    "jwt_org_claim": "claim holding the organization id",
    "store_timeout": "seconds before a role store call fails",
    "store_query_file": "SQL file replacing the membership queries (postgresql store)",
    "store_token_env": "environment variable holding a bearer token for the http store",
    "cache_ttl": "seconds a role answer stays fresh",
    "cache_negative_ttl": "seconds a 'not a member' answer stays fresh",
    "cache_size": "maximum cached entries",
    "cache_stale_ttl": "seconds an old answer may be served while the store fails",
    "connect_timeout": "seconds to connect to the upstream",
    "upstream_timeout": "seconds until the upstream's response headers (after the request body)",
    "shutdown_timeout": "seconds in-flight requests get to finish on SIGTERM",
    "send_timeout": "seconds writes may stay blocked on a client that stopped reading (0: off)",
    "body_timeout": "seconds a request body may stay idle between two reads (0: off)",
    "header_timeout": "seconds a client gets to send a whole request head once it started (0: off)",
    "audit": "audit log lines on stdout: all | deny | off",
    "inject_user_header": "header carrying the user to the upstream",
    "inject_org_header": "header carrying the organization to the upstream",
    "inject_role_header": "header carrying the effective role to the upstream",
    "inject_permission_header": "header carrying the checked permission to the upstream",
    "request_id_header": "request id header (read from clients, sent upstream and back)",
    "reload_interval": "seconds between checks of routes.yaml and the member file (0: off)",
    "loop": "event loop: auto (uvloop when installed) | asyncio | uvloop",
    "log_level": "debug | info | warning | error",
}

_CHOICES: Mapping[str, Sequence[str]] = {
    "auth": ("header", "jwt"),
    "audit": ("all", "deny", "off"),
    "loop": ("auto", "asyncio", "uvloop"),
    "log_level": ("debug", "info", "warning", "error"),
}


def env_name(field: str) -> str:
    return "RBAC_PROXY_" + field.upper()


def add_serve_flags(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """Add a flag per Settings field (or the `only` subset); defaults come from env vars."""
    for f in fields(Settings):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(
            flag,
            dest=f.name,
            default=None,
            choices=_CHOICES.get(f.name),
            metavar=None if f.name in _CHOICES else f.name.upper().split("_")[-1],
            help=f"{_HELP.get(f.name, '')} [env {env_name(f.name)}; default {f.default!r}]",
        )


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags win over RBAC_PROXY_* variables, which win over defaults. Values are validated."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = getattr(args, f.name, None)
        source = "--" + f.name.replace("_", "-")
        if raw is None and env_name(f.name) in env:
            raw = env[env_name(f.name)]
            source = env_name(f.name)
        if raw is None:
            continue
        values[f.name] = _convert(f.name, f.default, raw, source)
    settings = Settings(**values)
    _validate(settings)
    return settings


def _convert(name: str, default: object, raw: str, source: str) -> object:
    if name in _CHOICES and raw not in _CHOICES[name]:
        raise SettingsError(f"{source}: {raw!r} is not one of {', '.join(_CHOICES[name])}")
    try:
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            value = float(raw)
            if value < 0:
                raise ValueError("negative")
            return value
    except ValueError:
        raise SettingsError(f"{source}: {raw!r} is not a valid number") from None
    return raw


def _validate(s: Settings) -> None:
    if s.workers < 1:
        raise SettingsError("--workers must be at least 1")
    if s.cache_size < 1:
        raise SettingsError("--cache-size must be at least 1")
    for name in ("listen", "admin_listen"):
        parse_hostport(getattr(s, name), "--" + name.replace("_", "-"))
    if s.auth == "jwt":
        sources = [x for x in (s.jwt_secret_env, s.jwt_key, s.jwks) if x]
        if len(sources) != 1:
            raise SettingsError(
                "--auth jwt needs exactly one of --jwt-secret-env, --jwt-key, --jwks"
            )


def parse_upstream(text: str) -> URL:
    if not text:
        raise SettingsError("--upstream is required (e.g. --upstream http://127.0.0.1:3000)")
    try:
        url = URL(text)
    except ValueError as exc:
        raise SettingsError(f"--upstream: cannot parse {text!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise SettingsError(f"--upstream: {text!r} must be an http:// or https:// URL with a host")
    if url.query_string or url.fragment or (url.path not in ("", "/")):
        raise SettingsError(f"--upstream: {text!r} must not have a path, query or fragment")
    return url.with_path("").with_query(None)


def parse_hostport(text: str, flag: str) -> tuple[str, int]:
    """'0.0.0.0:8080', '[::1]:8080', ':8080' → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise SettingsError(f"{flag}: {text!r} must be HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    try:
        number = int(port)
    except ValueError:
        raise SettingsError(f"{flag}: {text!r} has no valid port") from None
    if not 0 <= number <= 65535:
        raise SettingsError(f"{flag}: port {number} out of range")
    return host, number
