"""parse_yaml (built from parser events) agrees with the former compose-based converter."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.policy.model import PolicyError, Problem
from proxy.policy.source import Node, Scalar
from proxy.yamlsource import parse_yaml

ROOT = Path(__file__).resolve().parent.parent

# ---- The former implementation (yaml.compose, then convert the node graph), kept verbatim as the
# ---- reference the event-based parser must match.
_SCALAR_LOADER = yaml.SafeLoader("")
_COMPOSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def reference_parse(text: str, source: str) -> Node:
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
    return str(value)


# ---- Comparison


Outcome = Node | tuple[Problem, ...] | tuple[str, str]


def outcome(parse: object, text: str) -> Outcome:
    """What a parser makes of `text`: the tree, the problems, or the exception's type and text."""
    assert callable(parse)
    try:
        node = parse(text, "f.yaml")
    except PolicyError as exc:
        return exc.problems
    except Exception as exc:
        return (type(exc).__name__, str(exc))
    assert isinstance(node, Node)
    return node


def assert_same(text: str) -> Outcome:
    new = outcome(parse_yaml, text)
    assert new == outcome(reference_parse, text)
    return new


@pytest.mark.parametrize("name", ["routes.yaml", "members.yaml"])
def test_shipped_files_parse_as_before(name: str) -> None:
    result = assert_same((ROOT / name).read_text("utf-8"))
    assert isinstance(result, Node) and isinstance(result.value, dict)


def test_generated_members_file_parses_as_before() -> None:
    members = "\n".join(f"      u{i}: {('developer', 'admin', '{projects: {p: support}}')[i % 3]}"
                        for i in range(3000))
    text = ("orgs:\n  acme:\n    plan: enterprise\n    projects: [proj-prod]\n    members:\n"
            + members + "\n")
    result = assert_same(text)
    assert isinstance(result, Node) and isinstance(result.value, dict)
    orgs = result.value["orgs"].value
    assert isinstance(orgs, dict)
    acme = orgs["acme"].value
    assert isinstance(acme, dict)
    members = acme["members"].value
    assert isinstance(members, dict) and len(members) == 3000
    assert members["u2997"] == Node("developer", 3003, 3003)


VALID = {
    "block mapping": "a: 1\nb:\n  c: x\n  d: [1, 2]\n",
    "flow nested": "a: {b: [1, {c: d}, [e, f]], g: {}}\nh: []\n",
    "block sequences": "- a\n- - b\n  - c\n- d: 1\n  e: 2\n-\n",
    "flow multi-line": "a: {b: 1,\n  c: [2,\n   3]}\n",
    "typed scalars": "s: '2'\nd: \"2\"\ni: 2\nt: true\nn: null\nt2: ~\nf: 1.5\no: 0o17\nx: 0x1f\n"
    "e: 1e3\ninf: .inf\nno: no\nyes: Yes\n",
    "nan": "a: .nan\n",
    "timestamps stay text": "a: 2001-12-14\nb: 2001-12-14t21:59:43.10-05:00\n",
    "binary stays text": "a: !!binary aGVsbG8=\n",
    "explicit tags": "a: !!str 2\nb: !!int '3'\nc: !!float '1'\nd: !!bool 'true'\ne: !!null ''\n",
    "non-specific tag": "a: ! 2\n",
    "empty values": "a:\nb: ''\nc:\n  -\n  - ''\nd: {e: }\n",
    "literal block": "a: |\n  one\n  two\nb: >-\n  folded\n  text\n\nc: 1\n",
    "plain multi-line": "a: one\n  two\n  three\nb: 2\n",
    "quoted multi-line": "a: \"one\n  two\"\nb: 'x\n\n  y'\n",
    "keys stay raw text": "1: a\ntrue: b\nnull: c\n1.5: d\n'q': e\n",
    "empty key": "? \n: v\n",
    "explicit key": "? a\n: 1\n",
    "anchors and aliases": "a: &x {b: 1, c: [2]}\nd: *x\ne: [*x, *x]\nf: &s 5\ng: *s\n",
    "alias to anchored sequence": "a: &l\n  - 1\n  - 2\nb:\n  c: *l\n",
    "alias to timestamp": "a: &t 2001-12-14\nb: *t\n",
    "alias as key": "x: &k key\n*k : 3\n",
    "anchored key reused as value": "&k a: 1\nb: *k\n",
    "document markers": "---\na: 1\n...\n",
    "empty document": "---\n",
    "root scalar": "hello\n",
    "root sequence": "- 1\n- 2\n",
    "comments only around": "# c\na: 1 # d\n# e\n",
    "unicode": "名前: 値\n\"\\u00e9\": x\n",
    "directive": "%YAML 1.1\n---\na: 1\n",
}


@pytest.mark.parametrize("text", VALID.values(), ids=VALID.keys())
def test_valid_documents_parse_as_before(text: str) -> None:
    assert isinstance(assert_same(text), Node)


INVALID = {
    "empty": ("", 1, "the file is empty"),
    "comments only": ("# nothing\n\n", 1, "the file is empty"),
    "duplicate key": ("a: 1\nb: 2\na: 3\n", 3, "duplicate key 'a'"),
    "nested duplicate": ("a:\n  b: 1\n  b: 2\n", 3, "duplicate key 'b'"),
    "duplicate via alias key": ("x: &k a\na: 1\n*k : 2\n", 1, "duplicate key 'a'"),
    "sequence key": ("? [a]\n: 1\n", 1, "mapping keys must be plain strings"),
    "mapping key": ("{a: 1}: 2\n", 1, "mapping keys must be plain strings"),
    "alias to mapping as key": ("x: &k {a: 1}\n? *k\n: 3\n", 1,
                                "mapping keys must be plain strings"),
    "merge key": ("x: &k {a: 1}\ny:\n  <<: *k\n", 3, "YAML merge keys (<<) are not supported"),
    "explicit merge tag": ("a: 1\n!!merge m: 2\n", 2, "YAML merge keys (<<) are not supported"),
    "quoted << is a key": None,
    "unclosed flow": ("a: [1, 2\nb: 3\n", 2, None),
    "bad indentation": ("a:\n  b: 1\n c: 2\n", 3, None),
    "tab": ("a:\n\tb: 1\n", 2, None),
    "unclosed quote": ("a: 'x\n", 2, None),
    "undefined alias": ("a: *nope\n", 1, "invalid YAML: found undefined alias"),
    "duplicate anchor": ("a: &x 1\nb: &x 2\n", 2, "invalid YAML: second occurrence"),
    "duplicate anchor inside itself": ("a: &x [&x 1]\n", 1, "invalid YAML: second occurrence"),
    "second document": ("a: 1\n---\nb: 2\n", 2, "invalid YAML: but found another document"),
    "broken second document": ("a: 1\n--- x\nb: [\n", 2,
                               "invalid YAML: but found another document"),
    "control character": ("a: \x07\n", 1, None),
    "unknown tag": ("a: !foo x\n", 1, None),
    "bad timestamp": ("a: !!timestamp x\n", None, None),
    # Our own checks run after the whole stream parsed, so a later syntax or composer error wins.
    "duplicate then syntax error": ("a: 1\na: 2\nb: [\n", 4, None),
    "duplicate then undefined alias": ("a: 1\na: 2\nb: *q\n", 3, None),
    "duplicate then duplicate anchor": ("a: &x 1\na: 2\nb: &x 3\n", 3, None),
    "duplicate then second document": ("a: 1\na: 2\n--- x\n", 3, None),
    "bad key then undefined alias": ("? [&k a]\n: 1\nb: *k\nc: *q\n", 4, None),
    "unknown tag then syntax error": ("a: !foo x\nb: [\n", 3, None),
    "first of two problems": ("a: 1\na: 2\nb: 1\nb: 2\n", 2, "duplicate key 'a'"),
}


@pytest.mark.parametrize("case", INVALID.values(), ids=INVALID.keys())
def test_invalid_documents_fail_as_before(case: tuple[str, int | None, str | None] | None) -> None:
    if case is None:  # "quoted << is a key": only a plain << is a merge key
        assert assert_same("'<<': 1\n") == Node({"<<": Node(1, 1, 1)}, 1)
        return
    text, line, message = case
    result = assert_same(text)
    assert not isinstance(result, Node)
    if line is None:  # a constructor's own exception, raised as it was before
        assert isinstance(result[0], str)
        return
    assert isinstance(result[0], Problem)
    assert result[0].line == line
    assert message is None or result[0].message == message


def test_recursive_alias_is_a_policy_error_not_a_crash() -> None:
    text = "a: 1\nb: &x\n  - 1\n  - *x\n"
    # The old converter never returned on a value that contains itself.
    old = outcome(reference_parse, text)
    assert isinstance(old, tuple) and old[0] == "RecursionError"
    with pytest.raises(PolicyError) as caught:
        parse_yaml(text, "f.yaml")
    assert caught.value.problems == (
        Problem("f.yaml", 4, "YAML alias *x is inside the value it names"),
    )


def test_aliases_share_the_anchored_tree() -> None:
    # Each alias reuses the anchored value rather than copying it, so nested aliases
    # ("billion laughs") stay linear in the text's size.
    levels = ["l0: &l0 [a, a, a, a, a, a, a, a, a, a]"]
    levels += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    root = parse_yaml("\n".join(levels) + "\n", "f.yaml")
    assert isinstance(root.value, dict)
    top = root.value["l8"].value
    assert isinstance(top, tuple) and len(top) == 10
    assert top[0].value is top[9].value is root.value["l7"].value


def test_no_pyyaml_node_graph_is_composed(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("composed a PyYAML node graph")

    monkeypatch.setattr(yaml, "compose", refuse)
    for loader in {yaml.SafeLoader, getattr(yaml, "CSafeLoader", yaml.SafeLoader)}:
        for method in ("get_single_node", "compose_node", "compose_document"):
            if hasattr(loader, method):
                monkeypatch.setattr(loader, method, refuse)
    root = parse_yaml((ROOT / "members.yaml").read_text("utf-8"), "members.yaml")
    assert isinstance(root.value, dict) and "orgs" in root.value


@pytest.mark.parametrize("text", ["a: !!int abc\n", "b: !!float x\n", "c: !!bool maybe\n"])
def test_explicit_tag_with_an_impossible_value_is_a_file_error(text: str) -> None:
    with pytest.raises(PolicyError, match=r"^f\.yaml:1: invalid value"):
        parse_yaml(text, "f.yaml")
