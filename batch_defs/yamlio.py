"""Batch YAML, parsed once into a node tree (whose marks give each value's line) and built from it.

A batch file starts real work, so this is stricter than PyYAML's safe loader:

- a key twice in one mapping is an error naming both lines (PyYAML silently keeps the last,
  which can replace a whole phase list);
- only true and false are booleans (YAML 1.2): on, off, yes, no, y and n stay text, so
  `notify: {on: [failure]}` is the key "on", and `country: NO` is Norway;
- no base-60 numbers: `1:30` stays text instead of becoming 90;
- aliases may not make the document larger than MAX_VALUES values, nor contain themselves.

The C loader (libyaml) is used when PyYAML has it: several times faster on large inline
sources than the pure-Python one, and it refuses nesting deeper than 1,000 levels instead of
exhausting the stack.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Loc = tuple[str | int, ...]

# Enough for inline sources of tens of thousands of items; a "billion laughs" alias bomb is
# refused before it is built and validated value by value.
MAX_VALUES = 2_000_000

_TAG = "tag:yaml.org,2002:"
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
# PyYAML's YAML 1.1 patterns without the base-60 forms (`1:30`, `190:20:30.15`).
_INT = re.compile(r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""", re.X)
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


@dataclass(frozen=True)
class YamlProblem:
    line: int | None  # 1-based
    loc: Loc  # keys and indexes from the document root; empty for the whole document
    message: str


class YamlError(ValueError):
    """The text is not a YAML document this project accepts; each problem has its line."""

    def __init__(self, problems: Sequence[YamlProblem]):
        self.problems = list(problems)
        super().__init__("\n".join(f"line {p.line}: {p.message}" for p in self.problems))


@functools.cache
def loader_class() -> type:
    """The safe loader (C when available) with the resolvers and checks described above."""
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    replaced = {_TAG + "bool", _TAG + "int", _TAG + "float"}
    resolvers = {first: [(tag, rx) for tag, rx in entries if tag not in replaced]
                 for first, entries in base.yaml_implicit_resolvers.items()}
    loader: Any = type("BatchLoader", (base,), {"yaml_implicit_resolvers": resolvers,
                                                "construct_object": _construct_object})
    loader.add_implicit_resolver(_TAG + "bool", _BOOL, list("tTfF"))
    loader.add_implicit_resolver(_TAG + "int", _INT, list("-+0123456789"))
    loader.add_implicit_resolver(_TAG + "float", _FLOAT, list("-+0123456789."))
    return loader


def _construct_object(self: Any, node: yaml.Node, deep: bool = False) -> Any:
    # A scalar that matches a type but is out of its range (2026-13-45, a 5,000-digit integer)
    # raises a bare ValueError in PyYAML: give it the node's line like every other error.
    try:
        return yaml.constructor.SafeConstructor.construct_object(self, node, deep)
    except (ValueError, OverflowError) as exc:
        what = node.tag.removeprefix(_TAG)
        reason = "more than 4300 digits" if "digits" in str(exc) else str(exc)
        value = repr(node.value[:40]) if isinstance(node.value, str) else "this value"
        raise yaml.constructor.ConstructorError(
            None, None, f"{value} is not a valid {what}: {reason}", node.start_mark) from exc


def load(text: str) -> tuple[Any, yaml.Node | None]:
    """The document's data and its node tree (None and None for an empty document)."""
    try:
        loader = loader_class()(text)  # the pure-Python reader checks characters already here
        try:
            root = loader.get_single_node()
            if root is None:
                return None, None
            check_tree(root)
            return loader.construct_document(root), root
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise YamlError([_problem(exc, text)]) from exc
    except RecursionError as exc:  # only the pure-Python loader recurses per level
        raise YamlError([YamlProblem(None, (), "invalid YAML: nested too deeply")]) from exc


@dataclass(frozen=True)
class Assignment:
    """One `--set KEY=VALUE`: KEY is a dotted path (`phases[0].retry.max_attempts`), VALUE YAML
    read by the same rules as a batch file."""

    text: str
    loc: Loc
    value: Any


class Changes:
    """What each command-line change (--data, --set) replaced, to name the one a problem in
    the changed spec comes from."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, Loc]] = []  # (the change as typed, path it replaced)

    def add(self, who: str, loc: Loc) -> None:
        self.entries.append((who, loc))

    def touch(self, *tops: str) -> bool:
        """Whether a change replaced (part of) one of these top-level fields."""
        return any(loc[:1] in [(top,) for top in tops] for _, loc in self.entries)

    def blame(self, problems: Iterable[tuple[Sequence[str | int], str]], *,
              new_only: bool = False) -> list[tuple[str, Loc, str]]:
        """(change, field, message) for each (loc, message) problem of the changed spec; field
        is loc unless it is the changed path itself. A problem that no change overlaps concerns
        the whole spec (the last change is named), or, with new_only, was there when the file
        loaded (left out)."""
        blamed = []
        for loc, message in problems:
            at = tuple(loc)
            hits = [(who, own) for who, own in self.entries if at[:len(own)] == own[:len(at)]]
            if hits or (self.entries and not new_only):
                who, own = (hits or self.entries)[-1]
                blamed.append((who, () if at == own else at, message))
        return blamed


def parse_assignment(text: str) -> Assignment:
    """`phases[0].retry.max_attempts=5` -> Assignment; a YamlError if it is not KEY=VALUE or
    VALUE is not YAML this project accepts (its problems are located under KEY)."""
    key, sep, value = text.partition("=")
    parts = [p for p in re.split(r"\.|\[(\d+)\]", key.strip()) if p]
    if not sep or not parts:
        raise YamlError([YamlProblem(None, (), "expected KEY=VALUE")])
    loc = tuple(int(p) if p.isdigit() else p for p in parts)
    try:
        return Assignment(text, loc, load(value)[0])
    except YamlError as exc:
        raise YamlError([YamlProblem(p.line, (*loc, *p.loc), p.message)
                         for p in exc.problems]) from exc


def apply_assignment(data: dict[str, Any], assignment: Assignment) -> None:
    """Set the value in data (a spec as plain dicts and lists), creating missing mappings."""
    target: Any = data
    for depth, part in enumerate(assignment.loc):
        last = depth == len(assignment.loc) - 1
        if isinstance(target, list):
            if not isinstance(part, int) or not 0 <= part < len(target):
                raise YamlError([YamlProblem(None, assignment.loc[:depth],
                                             f"has no entry [{part}] (it has {len(target)})")])
            if last:
                target[part] = assignment.value
            target = target[part]
        elif isinstance(target, dict):
            if last:
                target[part] = assignment.value
            target = target.setdefault(part, {})
        else:
            raise YamlError([YamlProblem(None, assignment.loc[:depth],
                                         f"is {repr(target)[:60]}, which has no field "
                                         f"{part!r}")])


def read_text(path: Path) -> str:
    """A batch file's text; bytes that are not UTF-8 are a YamlError naming their line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise YamlError([YamlProblem(line, (), f"not valid UTF-8 (byte {exc.start + 1} of the "
                                               "file)")]) from exc


def _problem(exc: yaml.YAMLError, text: str) -> YamlProblem:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        message = exc.problem or exc.context or "cannot be read"
        return YamlProblem(mark.line + 1 if mark else None, (), f"invalid YAML: {message}")
    if isinstance(exc, yaml.reader.ReaderError):
        # libyaml counts UTF-8 bytes, the Python reader characters.
        c_loader = getattr(yaml, "CSafeLoader", None)
        before = (text.encode("utf-8", "surrogatepass")[:exc.position].decode("utf-8", "replace")
                  if c_loader and issubclass(loader_class(), c_loader) else text[:exc.position])
        code = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or "?")
        return YamlProblem(before.count("\n") + 1, (),
                           f"invalid YAML: character #x{code:04x}: {exc.reason}")
    return YamlProblem(None, (), f"invalid YAML: {exc}")


def check_tree(root: yaml.Node) -> None:
    """Duplicate keys, recursive aliases and alias bombs, found before anything is built."""
    problems: list[YamlProblem] = []
    sizes: dict[int, int] = {}  # expanded number of values under each node, by identity
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, Loc, bool]] = [(root, (), False)]
    while stack:
        node, loc, done = stack.pop()
        if done:
            open_nodes.discard(id(node))
            sizes[id(node)] = size = 1 + sum(sizes[id(child)] for child, _ in _children(node, loc))
            if size > MAX_VALUES:
                raise YamlError([YamlProblem(_line(node), loc, "aliases make this document "
                                             f"larger than {MAX_VALUES:,} values")])
            continue
        if id(node) in sizes:
            continue  # an alias of a node already checked
        open_nodes.add(id(node))
        stack.append((node, loc, True))
        if isinstance(node, yaml.MappingNode):
            problems += _duplicate_keys(node, loc)
        # Reversed, so that values are visited in document order and a shared value is
        # reported where it is first written, not where an alias repeats it.
        for child, child_loc in reversed(list(_children(node, loc))):
            if id(child) in open_nodes:
                raise YamlError([YamlProblem(_line(child), child_loc,
                                             "an alias refers to a value that contains it")])
            stack.append((child, child_loc, False))
    if problems:
        raise YamlError(sorted(problems, key=lambda p: p.line or 0))


def _children(node: yaml.Node, loc: Loc) -> Iterator[tuple[yaml.Node, Loc]]:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield key, loc
            yield value, (*loc, key.value if isinstance(key, yaml.ScalarNode) else "?")
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield item, (*loc, index)


def _duplicate_keys(node: yaml.MappingNode, loc: Loc) -> list[YamlProblem]:
    first: dict[Any, int] = {}
    problems = []
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _TAG + "merge":
            continue  # a merge (<<) may be overridden by the mapping's own keys, by design
        key = _key(key_node)
        line = _line(key_node)
        if key in first:
            problems.append(YamlProblem(line, (*loc, key_node.value),
                                        f"duplicate key {key_node.value!r} (lines {first[key]} "
                                        f"and {line})"))
        else:
            first[key] = line
    return problems


def _key(node: yaml.ScalarNode) -> Any:
    # What the key becomes in the dict: 1, 1.0 and true would land on the same entry.
    if node.tag == _TAG + "str":
        return node.value
    if node.tag in (_TAG + "int", _TAG + "float", _TAG + "bool", _TAG + "null"):
        return yaml.load(node.value, Loader=loader_class()) if node.value else None
    return node.tag, node.value  # a date and the text of that date are different keys


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1
