"""Tests for proxy.policy.match: template parsing, precedence, methods, ambiguity."""

from __future__ import annotations

import re

import pytest

from proxy.policy.match import AmbiguousRoutes, Matcher, parse_template
from proxy.policy.model import Route, Segment, SegmentKind

L, P, R = SegmentKind.LITERAL, SegmentKind.PARAM, SegmentKind.REST


def route(template: str, methods: str | list[str] = "GET", *, line: int = 0) -> Route:
    return Route(
        template=template,
        segments=parse_template(template),
        methods=None
        if methods == "*"
        else frozenset([methods] if isinstance(methods, str) else methods),
        permission="p:x",
        line=line,
    )


def split(path: str) -> tuple[str, ...]:
    return tuple(s for s in path.split("/") if s)


# ---- parse_template --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("/", ()),
        ("/healthz", ((L, "healthz"),)),
        ("/api/projects/{project_id}", ((L, "api"), (L, "projects"), (P, "project_id"))),
        ("/static/{path*}", ((L, "static"), (R, "path"))),
        ("/{all*}", ((R, "all"),)),
        ("/a/{_x1}/b", ((L, "a"), (P, "_x1"), (L, "b"))),
        ("/v1.2/x-y_z~", ((L, "v1.2"), (L, "x-y_z~"))),
    ],
)
def test_parse_template_valid(template: str, expected: tuple[tuple[SegmentKind, str], ...]) -> None:
    assert parse_template(template) == tuple(Segment(k, v) for k, v in expected)


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("", "must start with '/'"),
        ("api/x", "must start with '/'"),
        ("/api/", "remove the trailing slash"),
        ("/api//x", "empty segment"),
        ("//", "remove the trailing slash"),
        ("/a/{x}/{x}", "parameter {x} appears twice"),
        ("/a/{x}/{x*}", "parameter {x} appears twice"),
        ("/a/v{x}", "mixes text and a parameter"),
        ("/a/{x}y", "mixes text and a parameter"),
        ("/a/{x", "mixes text and a parameter"),
        ("/a/{}", "bad parameter"),
        ("/a/{*}", "bad parameter"),
        ("/a/{1x}", "bad parameter"),
        ("/a/{x-y}", "bad parameter"),
        ("/a/{x**}", "bad parameter"),
        ("/a/{päth}", "bad parameter"),
        ("/a/{rest*}/b", "must be the last segment"),
        ("/a/%2F", "forbidden character"),
        ("/a/*", "forbidden character"),
        ("/a/b?x=1", "forbidden character"),
        ("/a/b#frag", "forbidden character"),
        ("/a/b;c", "forbidden character"),
        ("/a/b\\c", "forbidden character"),
        ("/a/./b", "dot segment"),
        ("/a/../b", "dot segment"),
        ("/a/b\x00", "control character"),
        ("/a/b\tc", "control character"),
    ],
)
def test_parse_template_errors(template: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_template(template)


# ---- matching --------------------------------------------------------------------------------

PRECEDENCE_ROUTES = [
    route("/"),
    route("/a/b"),
    route("/a/{x}"),
    route("/a/{rest*}"),
    route("/a/{x}/c"),
    route("/a/b/{y}", "POST"),
    route("/p/{x}/c"),
    route("/p/b/{y}"),
    route("/static/{path*}"),
    route("/static"),
    route("/files/{path*}"),
    route("/Upper/{id}"),
]


@pytest.mark.parametrize(
    ("method", "path", "template", "params"),
    [
        ("GET", "/", "/", {}),
        ("GET", "/a/b", "/a/b", {}),  # literal beats param and rest
        ("GET", "/a/z", "/a/{x}", {"x": "z"}),  # param beats rest
        ("GET", "/a/z/q", "/a/{rest*}", {"rest": "z/q"}),
        ("GET", "/a", "/a/{rest*}", {"rest": ""}),  # rest matches zero segments
        ("GET", "/a/z/c", "/a/{x}/c", {"x": "z"}),
        # /a/b/{y} exists only for POST: GET backtracks from the literal "b" to {x}.
        ("GET", "/a/b/c", "/a/{x}/c", {"x": "b"}),
        ("POST", "/a/b/c", "/a/b/{y}", {"y": "c"}),
        ("GET", "/a/b/d", "/a/{rest*}", {"rest": "b/d"}),
        ("POST", "/a/b/d", "/a/b/{y}", {"y": "d"}),
        # Deeper backtracking: the literal branch /p/b/{y} wins whenever it matches ...
        ("GET", "/p/b/c", "/p/b/{y}", {"y": "c"}),
        ("GET", "/p/b/d", "/p/b/{y}", {"y": "d"}),
        # ... and /p/{x}/c is found when the literal branch dead-ends.
        ("GET", "/p/q/c", "/p/{x}/c", {"x": "q"}),
        ("GET", "/static", "/static", {}),  # exact route beats the empty rest
        ("GET", "/static/css/a.css", "/static/{path*}", {"path": "css/a.css"}),
        ("GET", "/files", "/files/{path*}", {"path": ""}),
        ("GET", "/files/x", "/files/{path*}", {"path": "x"}),
        ("GET", "/Upper/1", "/Upper/{id}", {"id": "1"}),
        # Decoded segments are passed through untouched.
        ("GET", "/a/h%C3%A9", "/a/{x}", {"x": "h%C3%A9"}),
    ],
)
def test_precedence(method: str, path: str, template: str, params: dict[str, str]) -> None:
    found = Matcher(PRECEDENCE_ROUTES).match(method, split(path))
    assert found is not None
    assert found.route.template == template
    assert dict(found.params) == params


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/upper/1"),  # literal matching is case-sensitive
        ("get", "/a/b"),  # method tokens are case-sensitive
        ("POST", "/a/b"),
        ("GET", "/p/q/d"),
        ("GET", "/p"),
        ("GET", "/nothing"),
        ("GET", "/Upper"),  # {id} needs exactly one segment
        ("GET", "/Upper/1/2"),
    ],
)
def test_no_match(method: str, path: str) -> None:
    assert Matcher(PRECEDENCE_ROUTES).match(method, split(path)) is None


def test_param_values_are_a_read_only_mapping() -> None:
    found = Matcher([route("/a/{x}")]).match("GET", ("a", "1"))
    assert found is not None
    with pytest.raises(TypeError):
        found.params["x"] = "2"  # type: ignore[index]


METHOD_ROUTES = [
    route("/g", "GET"),
    route("/gh", "GET"),
    route("/gh", "HEAD"),
    route("/any", "*"),
    route("/mixed/{x}", "*"),
    route("/mixed/lit", ["GET", "POST"]),
    route("/onlypost", "POST"),
    route("/lower", "GET"),
    route("/opt", "OPTIONS"),
    route("/fallback/{x}", "HEAD"),
    route("/fallback/lit", "GET"),
]


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("HEAD", "/g", frozenset({"GET"})),  # HEAD falls back to the GET route
        ("HEAD", "/gh", frozenset({"HEAD"})),  # an explicit HEAD route wins
        ("GET", "/gh", frozenset({"GET"})),
        ("DELETE", "/any", None),
        ("HEAD", "/any", None),
        ("BREW", "/any", None),  # "*" means any token, even unknown ones
        # A "*" route and an exact route can never share a node (that is ambiguous, see
        # test_ambiguous); across nodes the more specific node wins whatever its methods.
        ("GET", "/mixed/lit", frozenset({"GET", "POST"})),
        ("HEAD", "/mixed/lit", frozenset({"GET", "POST"})),
        ("PUT", "/mixed/lit", None),
        ("HEAD", "/mixed/other", None),
        ("OPTIONS", "/opt", frozenset({"OPTIONS"})),
        # HEAD→GET at the most specific node beats an explicit HEAD on a less specific one.
        ("HEAD", "/fallback/lit", frozenset({"GET"})),
        ("HEAD", "/fallback/other", frozenset({"HEAD"})),
    ],
)
def test_methods(method: str, path: str, expected: frozenset[str] | None) -> None:
    found = Matcher(METHOD_ROUTES).match(method, split(path))
    assert found is not None
    assert found.route.methods == expected


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("HEAD", "/onlypost"),  # HEAD falls back to GET only, never to other methods
        ("head", "/g"),
        ("Get", "/lower"),
        ("GET", "/fallback/x"),
    ],
)
def test_methods_no_match(method: str, path: str) -> None:
    assert Matcher(METHOD_ROUTES).match(method, split(path)) is None


def test_params_use_each_routes_own_names() -> None:
    matcher = Matcher([route("/a/{x}/{rest*}", "GET"), route("/a/{y}/{tail*}", "POST")])
    get = matcher.match("GET", ("a", "1", "2", "3"))
    post = matcher.match("POST", ("a", "1"))
    assert get is not None and dict(get.params) == {"x": "1", "rest": "2/3"}
    assert post is not None and dict(post.params) == {"y": "1", "tail": ""}


# ---- ambiguity -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (route("/a", "GET", line=1), route("/a", "GET", line=2)),
        (route("/a/{x}", "GET", line=1), route("/a/{y}", ["POST", "GET"], line=2)),
        (route("/a/{x*}", "GET", line=1), route("/a/{y*}", "GET", line=2)),
        (route("/a", "*", line=1), route("/a", "GET", line=2)),
        (route("/a", "DELETE", line=1), route("/a", "*", line=2)),
        (route("/", "*", line=1), route("/", "*", line=2)),
    ],
)
def test_ambiguous(first: Route, second: Route) -> None:
    with pytest.raises(AmbiguousRoutes) as info:
        Matcher([first, route("/other"), second])
    assert info.value.first is first
    assert info.value.second is second


def test_ambiguous_reports_every_conflict() -> None:
    routes = [route("/a", "GET"), route("/a", "GET"), route("/b/{x}"), route("/b/{y}")]
    with pytest.raises(AmbiguousRoutes) as info:
        Matcher(routes)
    assert info.value.pairs == ((routes[0], routes[1]), (routes[2], routes[3]))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (route("/a", "GET"), route("/a", "POST")),
        (route("/a", "GET"), route("/a", "HEAD")),
        (route("/a/{x}"), route("/a/{x*}")),
        (route("/a/{x}"), route("/a/b")),
        (route("/a"), route("/a/{x*}")),
        (route("/a/{x}/b"), route("/a/b/{x}")),
    ],
)
def test_not_ambiguous(first: Route, second: Route) -> None:
    Matcher([first, second])  # must not raise
    Matcher([second, first])


# ---- scale -----------------------------------------------------------------------------------


def test_ten_thousand_routes() -> None:
    routes: list[Route] = []
    for i in range(2_500):
        routes.append(route(f"/svc{i}/items", "GET"))
        routes.append(route(f"/svc{i}/items/{{item_id}}", ["GET", "PUT"]))
        routes.append(route(f"/svc{i}/items/{{item_id}}/{{rest*}}", "*"))
        routes.append(route(f"/svc{i}/items/special", "DELETE"))
    assert len(routes) == 10_000
    matcher = Matcher(routes)
    for i in range(0, 2_500, 7):
        listing = matcher.match("GET", (f"svc{i}", "items"))
        assert listing is not None and listing.route.template == f"/svc{i}/items"
        item = matcher.match("PUT", (f"svc{i}", "items", "special"))
        assert item is not None and item.route.template == f"/svc{i}/items/{{item_id}}"
        assert dict(item.params) == {"item_id": "special"}
        special = matcher.match("DELETE", (f"svc{i}", "items", "special"))
        assert special is not None and special.route.template == f"/svc{i}/items/special"
        deep = matcher.match("PATCH", (f"svc{i}", "items", "7", "a", "b"))
        assert deep is not None and dict(deep.params) == {"item_id": "7", "rest": "a/b"}
        assert matcher.match("POST", (f"svc{i}", "items")) is None
    assert matcher.match("GET", ("svc2500", "items")) is None
