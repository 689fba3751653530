"""Route matching: path templates compiled once into a segment trie, (method, path) → route."""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import MappingProxyType

from proxy.policy.model import Route, RouteMatch, Segment, SegmentKind

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
# Characters that never belong in a literal template segment: braces and "*" are template
# syntax; "%" would mean the author wrote an encoded path (we match decoded segments, SPEC §4);
# "?" and "#" start the query / fragment; ";" and "\" are path-confusion vectors that
# canonicalization rejects (CVE-2021-43797-style normalisation differences).
_FORBIDDEN_LITERAL = frozenset("{}%*?#;\\")

_TRAILING_SLASH = "remove the trailing slash: a single trailing slash never changes matching"


def parse_template(template: str) -> tuple[Segment, ...]:
    """Split a route template into segments; raise ValueError with a readable message."""
    if not template.startswith("/"):
        raise ValueError("a path template must start with '/'")
    if template == "/":
        return ()
    if template.endswith("/"):
        raise ValueError(_TRAILING_SLASH)
    parts = template[1:].split("/")
    segments: list[Segment] = []
    seen: set[str] = set()
    for index, part in enumerate(parts):
        segment = _parse_segment(part)
        if segment.kind is not SegmentKind.LITERAL:
            if segment.value in seen:
                raise ValueError(f"parameter {{{segment.value}}} appears twice")
            seen.add(segment.value)
        if segment.kind is SegmentKind.REST and index != len(parts) - 1:
            raise ValueError(f"{{{segment.value}*}} must be the last segment")
        segments.append(segment)
    return tuple(segments)


def _parse_segment(part: str) -> Segment:
    if not part:
        raise ValueError("empty segment ('//'): write each segment once")
    if part.startswith("{") and part.endswith("}"):
        inner = part[1:-1]
        kind = SegmentKind.PARAM
        if inner.endswith("*"):
            inner = inner[:-1]
            kind = SegmentKind.REST
        if not _IDENTIFIER.fullmatch(inner):
            raise ValueError(f"bad parameter {part!r}: the name must match [A-Za-z_][A-Za-z0-9_]*")
        return Segment(kind, inner)
    if "{" in part or "}" in part:
        raise ValueError(
            f"segment {part!r} mixes text and a parameter: a parameter must be a whole segment"
        )
    if part in (".", ".."):
        # Dot segments never reach the matcher (SPEC §4 rejects them), so such a route is dead.
        raise ValueError(f"dot segment {part!r} is not allowed")
    bad = sorted(set(part) & _FORBIDDEN_LITERAL)
    if bad:
        raise ValueError(f"segment {part!r} contains forbidden character(s) {''.join(bad)!r}")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in part):
        raise ValueError(f"segment {part!r} contains a control character")
    return Segment(SegmentKind.LITERAL, part)


class AmbiguousRoutes(Exception):
    """Two routes of the same shape whose methods overlap; never resolved by file order."""

    def __init__(self, pairs: Sequence[tuple[Route, Route]]) -> None:
        self.pairs = tuple(pairs)  # every conflict found: (earlier route, later route)
        self.first, self.second = self.pairs[0]
        super().__init__(
            f"route {self.second.template!r} (line {self.second.line}) conflicts with "
            f"{self.first.template!r} (line {self.first.line})"
        )


# A route at a trie node, with the route's own names for the node path's parameters.
_Entry = tuple[Route, tuple[str, ...]]


class _Node:
    __slots__ = ("any_method", "by_method", "literals", "param", "rest", "routes")

    def __init__(self) -> None:
        self.literals: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.rest: _Node | None = None
        self.by_method: dict[str, _Entry] = {}
        self.any_method: _Entry | None = None
        self.routes: list[Route] = []  # build time only: conflict reports

    def resolve(self, method: str) -> _Entry | None:
        entry = self.by_method.get(method)
        if entry is not None:
            return entry
        if self.any_method is not None:
            return self.any_method
        if method == "HEAD":
            # RFC 9110 §9.3.2: HEAD is GET without a body, so it follows the GET route.
            return self.by_method.get("GET")
        return None


class Matcher:
    """Built once per policy; `match` costs dict lookups per path segment, not per route."""

    __slots__ = ("_root",)

    def __init__(self, routes: Sequence[Route]) -> None:
        self._root = _Node()
        conflicts: list[tuple[Route, Route]] = []
        for route in routes:
            node = self._root
            names: list[str] = []
            for segment in route.segments:
                if segment.kind is SegmentKind.LITERAL:
                    node = node.literals.setdefault(segment.value, _Node())
                    continue
                names.append(segment.value)
                if segment.kind is SegmentKind.PARAM:
                    if node.param is None:
                        node.param = _Node()
                    node = node.param
                else:
                    if node.rest is None:
                        node.rest = _Node()
                    node = node.rest
            other = _overlap(node, route)
            if other is not None:
                conflicts.append((other, route))
                continue
            entry = (route, tuple(names))
            if route.methods is None:
                node.any_method = entry
            else:
                for method in route.methods:
                    node.by_method[method] = entry
            node.routes.append(route)
        if conflicts:
            raise AmbiguousRoutes(conflicts)
        _drop_build_lists(self._root)

    def match(self, method: str, segments: tuple[str, ...]) -> RouteMatch | None:
        """Most specific route for decoded, non-empty `segments`; None when nothing matches."""
        values: list[str] = []
        entry = _find(self._root, segments, 0, method, values)
        if entry is None:
            return None
        route, names = entry
        return RouteMatch(route, MappingProxyType(dict(zip(names, values, strict=True))))


def _overlap(node: _Node, route: Route) -> Route | None:
    for other in node.routes:
        if route.methods is None or other.methods is None or route.methods & other.methods:
            return other
    return None


def _drop_build_lists(node: _Node) -> None:
    stack = [node]
    while stack:
        current = stack.pop()
        current.routes = []
        stack.extend(current.literals.values())
        if current.param is not None:
            stack.append(current.param)
        if current.rest is not None:
            stack.append(current.rest)


def _find(
    node: _Node, segments: tuple[str, ...], index: int, method: str, values: list[str]
) -> _Entry | None:
    # Each trie node sits at a fixed depth, so a match visits every node at most once.
    if index == len(segments):
        entry = node.resolve(method)
        if entry is not None:
            return entry
        if node.rest is not None:
            entry = node.rest.resolve(method)
            if entry is not None:
                values.append("")
                return entry
        return None
    segment = segments[index]
    child = node.literals.get(segment)
    if child is not None:
        entry = _find(child, segments, index + 1, method, values)
        if entry is not None:
            return entry
    if node.param is not None and segment:
        values.append(segment)
        entry = _find(node.param, segments, index + 1, method, values)
        if entry is not None:
            return entry
        values.pop()
    if node.rest is not None:
        entry = node.rest.resolve(method)
        if entry is not None:
            values.append("/".join(segments[index:]))
            return entry
    return None
