"""YAML text → line-annotated `Node` tree for the pure core, built from PyYAML's event stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import yaml
from yaml.composer import ComposerError

from proxy.policy.model import PolicyError, Problem
from proxy.policy.source import Node, Scalar

_SCALAR_LOADER = yaml.SafeLoader("")
# libyaml's parser (when PyYAML was built with it) is ~3x faster; it yields the same events and
# marks as the pure-Python one.
_PARSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Bound once; PyYAML leaves it unannotated.
_RESOLVE: Callable[[type[yaml.Node], str, tuple[bool, bool]], str] = _SCALAR_LOADER.resolve
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_NOT_TEXT = "mapping keys must be plain strings"

# What an anchor names: a scalar (kept as a PyYAML node so that every alias to it is typed and
# blamed like the anchored text), a finished collection, or the line of a collection still being
# built (an alias inside it would make the value contain itself).
_Anchored = yaml.ScalarNode | Node | int


def parse_yaml(text: str, source: str) -> Node:
    """Parse one YAML document; every syntax error or duplicate key becomes a PolicyError.

    The tree is built straight from parser events: composing PyYAML's node graph first (one
    node and two marks per value, all dropped at once) left a 100,000-member file's process
    ~50 MiB larger (allocator fragmentation) than parsing from events does.
    """
    loader = _PARSER(text)
    try:
        return _Builder(loader.get_event, source).stream()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise PolicyError([Problem(source, line, f"invalid YAML: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([Problem(source, 1, f"invalid YAML: {exc}")]) from None
    finally:
        loader.dispose()


class _Builder:
    """Turns one stream's events into Nodes, checking anchors as PyYAML's composer does."""

    def __init__(self, next_event: Callable[[], yaml.Event], source: str) -> None:
        self._next = next_event
        self._source = source
        self._anchors: dict[str, _Anchored] = {}

    def stream(self) -> Node:
        """The stream's only document; errors come in the order `yaml.compose` + convert gave.

        Syntax and composer errors (undefined alias, duplicate anchor, a second document) win
        over our own checks, because compose used to read the whole document before any of
        them ran: a later syntax error must still be the one reported.
        """
        self._next()  # StreamStart
        start = self._next()
        if isinstance(start, yaml.StreamEndEvent):
            raise PolicyError([Problem(self._source, 1, "the file is empty")])
        root: Node | None = None
        failure: Exception | None = None
        try:
            root = self._value(self._next(), 0)
            self._next()  # DocumentEnd
        except yaml.YAMLError:
            raise
        except Exception as exc:  # our check (or a constructor) failed: report it after parsing
            failure = exc
            self._skip_document()
        following = self._next()
        if not isinstance(following, yaml.StreamEndEvent):
            raise ComposerError(
                "expected a single document in the stream",
                _mark(start),
                "but found another document",
                _mark(following),
            )
        if failure is not None:
            raise failure
        assert root is not None  # set whenever no failure was caught
        return root

    def _value(self, event: yaml.Event, key_line: int) -> Node:
        line = _line(event)
        if isinstance(event, yaml.ScalarEvent):
            tag = self._scalar_tag(event)
            if tag == _STR_TAG:
                return Node(event.value, line, key_line)
            node = _scalar_node(event, tag)
            return Node(_scalar(node, self._source), line, key_line)
        if isinstance(event, yaml.AliasEvent):
            target = self._target(event)
            if isinstance(target, Node):
                return Node(target.value, target.line, key_line)
            if isinstance(target, yaml.ScalarNode):
                value = _scalar(target, self._source)
                return Node(value, target.start_mark.line + 1, key_line)
            # PyYAML composes such a value; converting it never ended (RecursionError).
            message = f"YAML alias *{event.anchor} is inside the value it names"
            raise PolicyError([Problem(self._source, line, message)])
        if isinstance(event, yaml.SequenceStartEvent):
            self._anchor(event, line)
            items: list[Node] = []
            while not isinstance(item := self._next(), yaml.SequenceEndEvent):
                items.append(self._value(item, 0))
            return self._finished(event, Node(tuple(items), line, key_line))
        if isinstance(event, yaml.MappingStartEvent):
            self._anchor(event, line)
            out: dict[str, Node] = {}
            while not isinstance(item := self._next(), yaml.MappingEndEvent):
                key, kline = self._key(item)
                if key in out:
                    # PyYAML silently keeps the last duplicate; a config must not.
                    raise PolicyError([Problem(self._source, kline, f"duplicate key {key!r}")])
                out[key] = self._value(self._next(), kline)
            return self._finished(event, Node(out, line, key_line))
        message = "unsupported YAML node"
        raise PolicyError([Problem(self._source, line, message)])  # pragma: no cover

    def _key(self, event: yaml.Event) -> tuple[str, int]:
        """A mapping key's text and line; keys stay raw text (`1:` is the key '1')."""
        if isinstance(event, yaml.ScalarEvent):
            tag, value, line = self._scalar_tag(event), event.value, _line(event)
        elif isinstance(event, yaml.AliasEvent):
            target = self._target(event)
            if not isinstance(target, yaml.ScalarNode):
                where = target.line if isinstance(target, Node) else target
                raise PolicyError([Problem(self._source, where, _NOT_TEXT)])
            # The anchored scalar is the key, so its line is the one blamed (as before).
            tag, value, line = target.tag, target.value, target.start_mark.line + 1
        else:
            line = _line(event)
            if isinstance(event, yaml.CollectionStartEvent):
                self._anchor(event, line)
            raise PolicyError([Problem(self._source, line, _NOT_TEXT)])
        if tag == _MERGE_TAG:
            message = "YAML merge keys (<<) are not supported"
            raise PolicyError([Problem(self._source, line, message)])
        return str(value), line

    def _scalar_tag(self, event: yaml.ScalarEvent) -> str:
        """The scalar's tag as PyYAML's composer resolves it; records the scalar's anchor."""
        tag = event.tag
        if tag is None or tag == "!":
            tag = _RESOLVE(yaml.ScalarNode, event.value, event.implicit)
        if event.anchor is not None:
            node = _scalar_node(event, tag)
            self._anchor(event, node)
        return tag

    def _anchor(self, event: yaml.NodeEvent, anchored: _Anchored) -> None:
        if event.anchor is None:
            return
        if event.anchor in self._anchors:
            raise ComposerError(
                "found duplicate anchor; first occurrence",
                None,
                "second occurrence",
                _mark(event),
            )
        self._anchors[event.anchor] = anchored

    def _finished(self, event: yaml.CollectionStartEvent, node: Node) -> Node:
        if event.anchor is not None:
            self._anchors[event.anchor] = node
        return node

    def _target(self, event: yaml.AliasEvent) -> _Anchored:
        target = self._anchors.get(event.anchor) if event.anchor is not None else None
        if target is None:
            raise ComposerError(None, None, "found undefined alias", _mark(event))
        return target

    def _skip_document(self) -> None:
        """Read to the document's end, still raising the composer's anchor errors."""
        while not isinstance(event := self._next(), yaml.DocumentEndEvent):
            if isinstance(event, yaml.AliasEvent):
                self._target(event)
            elif isinstance(event, yaml.ScalarEvent | yaml.CollectionStartEvent):
                self._anchor(event, 0)


def _line(event: yaml.Event) -> int:
    mark = event.start_mark
    return mark.line + 1 if mark is not None else 1


def _mark(event: yaml.Event) -> yaml.Mark | None:
    # libyaml's marks carry the same fields as yaml.Mark; the stubs keep the two types apart.
    return cast("yaml.Mark | None", event.start_mark)


def _scalar_node(event: yaml.ScalarEvent, tag: str) -> yaml.ScalarNode:
    """The node PyYAML would have composed: what its constructors and error marks expect."""
    end = cast("yaml.Mark | None", event.end_mark)
    return yaml.ScalarNode(tag, event.value, _mark(event), end, event.style)


def _scalar(node: yaml.ScalarNode, source: str) -> Scalar:
    try:
        value = _SCALAR_LOADER.construct_scalar(node)
        if node.tag == _STR_TAG:
            return str(value)
        constructed = _SCALAR_LOADER.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, KeyError) as exc:
        # An explicit tag with a value it cannot hold (`!!int abc`) is a file error too.
        raise PolicyError(
            [Problem(source, node.start_mark.line + 1, f"invalid value: {exc}")]
        ) from None
    finally:
        # construct_object memoizes every node it sees; without this the shared loader would
        # keep each typed scalar ever parsed alive.
        _SCALAR_LOADER.constructed_objects.clear()
        _SCALAR_LOADER.recursive_objects.clear()
    if constructed is None or isinstance(constructed, str | int | float | bool):
        return constructed
    # Timestamps, binary and other implicit types are never meaningful in our files.
    return str(value)
