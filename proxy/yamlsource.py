"""YAML text → line-annotated `Node` tree for the pure core (keeps PyYAML node marks)."""

from __future__ import annotations

import yaml

from proxy.policy.model import PolicyError, Problem
from proxy.policy.source import Node, Scalar

_SCALAR_LOADER = yaml.SafeLoader("")
# libyaml's composer (when PyYAML was built with it) is ~3x faster and lighter on a large
# members file; it yields the same nodes and marks as the pure-Python one.
_COMPOSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str, source: str) -> Node:
    """Parse one YAML document; every syntax error or duplicate key becomes a PolicyError."""
    try:
        root = yaml.compose(text, Loader=_COMPOSER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise PolicyError([Problem(source, line, f"invalid YAML: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([Problem(source, 1, f"invalid YAML: {exc}")]) from None
    if root is None:
        raise PolicyError([Problem(source, 1, "the file is empty")])
    return _convert(root, source, 0)


def _convert(node: yaml.Node, source: str, key_line: int) -> Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.ScalarNode):
        return Node(_scalar(node, source), line, key_line)
    if isinstance(node, yaml.SequenceNode):
        return Node(tuple(_convert(item, source, 0) for item in node.value), line, key_line)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Node] = {}
        for key_node, value_node in node.value:
            kline = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise PolicyError([Problem(source, kline, "mapping keys must be plain strings")])
            if key_node.tag == "tag:yaml.org,2002:merge":
                message = "YAML merge keys (<<) are not supported"
                raise PolicyError([Problem(source, kline, message)])
            key = str(key_node.value)
            if key in out:
                # PyYAML silently keeps the last duplicate; a config must not.
                raise PolicyError([Problem(source, kline, f"duplicate key {key!r}")])
            out[key] = _convert(value_node, source, kline)
        return Node(out, line, key_line)
    raise PolicyError([Problem(source, line, "unsupported YAML node")])  # pragma: no cover


def _scalar(node: yaml.ScalarNode, source: str) -> Scalar:
    try:
        value = _SCALAR_LOADER.construct_scalar(node)
        if node.tag == "tag:yaml.org,2002:str":
            return str(value)
        constructed = _SCALAR_LOADER.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        raise PolicyError(
            [Problem(source, node.start_mark.line + 1, f"invalid value: {exc}")]
        ) from None
    if constructed is None or isinstance(constructed, str | int | float | bool):
        return constructed
    # Timestamps, binary and other implicit types are never meaningful in our files.
    return str(value)
