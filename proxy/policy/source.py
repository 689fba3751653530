"""A parsed configuration document as plain values that remember their line numbers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

Scalar = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class Node:
    """One value of a YAML document: a scalar, a sequence of nodes or a mapping of nodes.

    The loader (proxy.config) builds these from PyYAML's node graph so that the pure core
    can report `file:line: message` without importing yaml.
    """

    value: Scalar | tuple[Node, ...] | Mapping[str, Node]
    line: int  # 1-based line where the value starts
    key_line: int = 0  # 1-based line of the mapping key this value belongs to (0: none)

    @property
    def where(self) -> int:
        """The line to blame: the key's line when there is one, else the value's."""
        return self.key_line or self.line


def text_problem(node: Node, what: str) -> str | None:
    """Why `node` is not a non-empty string (a message naming `what`), or None when it is."""
    if not isinstance(node.value, str):
        return f"{what} must be a string"
    if not node.value.strip():
        return f"{what} must not be empty"
    return None
