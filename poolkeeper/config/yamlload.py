"""YAML -> Python values plus the source position of every key and value.

PyYAML's constructors lose positions, keep the last of duplicate keys silently and expand
aliases without limit. So we let PyYAML parse and compose the node graph (with a depth and node
cap while composing) and convert nodes to values ourselves: that gives us line and column for
every key and value, duplicate-key errors, YAML 1.1 trap detection for keys, and a bound on
alias expansion ("billion laughs").
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import Event
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from poolkeeper.config.readfile import MAX_CONFIG_BYTES, TooLarge, read_regular
from poolkeeper.printable import printable

MAX_BYTES = MAX_CONFIG_BYTES
MAX_DEPTH = 50
# Plain size is bounded by MAX_BYTES; this cap only bounds the composer's memory (a 50,000-job
# spec is about 1,000,000 nodes).
MAX_NODES = 4_000_000
# Alias expansion: a document may expand to at most max(EXPANSION_FLOOR, EXPANSION_FACTOR x its
# distinct nodes) values. Honest specs (no aliases, or `<<: *defaults` merges) expand little
# beyond their own size; a bomb's expansion is exponential in its size, so it is refused by a
# count over the node graph (each anchor's size computed once) before anything is expanded.
EXPANSION_FLOOR = 100_000
EXPANSION_FACTOR = 4

_TAG = "tag:yaml.org,2002:"
_MERGE = _TAG + "merge"

Path = tuple[Hashable, ...]


@dataclass(frozen=True)
class Pos:
    """A 1-based position in a file; line 0 means 'the file as a whole'."""

    file: str
    line: int
    col: int


@dataclass(frozen=True)
class Issue:
    """One problem in a config file, printed as `FILE:LINE:COL: message`."""

    file: str
    line: int
    col: int
    message: str

    def __post_init__(self) -> None:
        # One issue, one line: keys and values quoted in messages may hold line breaks, and
        # terminal escapes ("\e[2J" is a valid YAML key): printed escaped.
        object.__setattr__(self, "message", printable(self.message))

    @classmethod
    def at(cls, pos: Pos, message: str) -> Issue:
        return cls(pos.file, pos.line, pos.col, message)

    def __str__(self) -> str:
        file = printable(self.file)  # a path from the command line or a directory listing
        if self.line <= 0:  # not about a place in the file (missing/unreadable file)
            return f"{file}: {self.message}"
        return f"{file}:{self.line}:{self.col}: {self.message}"


@dataclass(frozen=True)
class Scalar:
    """How a scalar was written: its text, whether it was unquoted, and its resolved tag."""

    text: str
    plain: bool
    tag: str


@dataclass(frozen=True)
class Loc:
    """Where a value sits: its key (None for list items and the root) and the value itself."""

    key: Pos | None
    value: Pos
    scalar: Scalar | None = None


@dataclass
class Document:
    """A converted YAML file: `data` plus `locs`, path (tuple of keys/indexes) -> Loc."""

    file: str
    data: Any
    locs: dict[Path, Loc]

    def loc(self, path: Path) -> Loc:
        """The Loc of `path`, or of its nearest ancestor that exists (for missing keys)."""
        for end in range(len(path), -1, -1):
            found = self.locs.get(tuple(path[:end]))
            if found is not None:
                return found
        return Loc(None, Pos(self.file, 1, 1))

    def key_pos(self, path: Path) -> Pos:
        loc = self.loc(path)
        return loc.key or loc.value

    def value_pos(self, path: Path) -> Pos:
        return self.loc(path).value


class LoadError(Exception):
    """The file could not be turned into values at all (syntax, encoding, limits)."""

    def __init__(self, issue: Issue):
        super().__init__(str(issue))
        self.issue = issue


# key_label(path of a mapping) -> what its keys are called in messages ('key', 'job name'), or
# None where keys are free data (inside args/kwargs) and may be any scalar.
KeyLabel = Callable[[Path], "str | None"]


def read_config(path: str) -> bytes:
    """The bytes of a config file or fragment, through the one bounded reader
    (poolkeeper.config.readfile). Raises OSError when it cannot be read (exit 66: 'no input') and
    LoadError when it is too large to be a config (exit 78)."""
    try:
        return read_regular(path, MAX_BYTES)
    except TooLarge:
        raise LoadError(Issue(path, 1, 1, _too_large())) from None


def _too_large() -> str:
    return f"the file is larger than {MAX_BYTES // 1024} KiB; refusing to parse it"


def load_yaml(
    raw: bytes, file: str, key_label: KeyLabel = lambda path: "key"
) -> tuple[Document, list[Issue]]:
    """Parse one YAML document. Fatal problems raise LoadError; others are returned as issues
    (duplicate keys, keys YAML 1.1 turned into non-strings, unsupported tags) and the document is
    still usable. An empty document has data None."""
    text = _decode(raw, file)
    loader = None
    written = 0
    try:
        loader = _LimitedLoader(text, file)  # the reader checks for control characters here
        root = loader.get_single_node()
        written = loader.written
    except LoadError:
        raise
    except yaml.MarkedYAMLError as exc:
        raise LoadError(_syntax_issue(exc, file)) from None
    except yaml.reader.ReaderError as exc:
        raise LoadError(
            Issue.at(_index_pos(text, exc.position, file), _reader_message(exc))
        ) from None
    except yaml.YAMLError as exc:  # no position known; still one line, never a traceback
        raise LoadError(Issue(file, 1, 1, f"YAML error: {exc}")) from None
    finally:
        if loader is not None:
            loader.dispose()
    if root is None:
        return Document(file, None, {(): Loc(None, Pos(file, 1, 1))}), []
    limit = _refuse_alias_bombs(root, file, written)
    converter = _Converter(file, key_label, limit)
    data = converter.value(root, (), None, 0)
    return Document(file, data, converter.locs), converter.issues


def _decode(raw: bytes, file: str) -> str:
    if len(raw) > MAX_BYTES:
        raise LoadError(Issue(file, 1, 1, _too_large()))
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start
        line_start = raw.rfind(b"\n", 0, start) + 1
        prefix = raw[line_start:start].decode("utf-8", errors="replace").lstrip("\ufeff")
        line = raw.count(b"\n", 0, start) + 1
        bad = raw[start : start + 1].hex()
        raise LoadError(
            Issue(file, line, len(prefix) + 1, f"the file is not UTF-8: invalid byte 0x{bad}")
        ) from None


def _index_pos(text: str, index: int, file: str) -> Pos:
    line = text.count("\n", 0, index) + 1
    return Pos(file, line, index - (text.rfind("\n", 0, index) + 1) + 1)


def _reader_message(exc: yaml.reader.ReaderError) -> str:
    char = exc.character
    code = ord(char) if isinstance(char, str) else char
    return f"the file contains the control character U+{code:04X}, which YAML does not allow"


def _syntax_issue(exc: yaml.MarkedYAMLError, file: str) -> Issue:
    mark = exc.problem_mark or exc.context_mark
    pos = Pos(file, mark.line + 1, mark.column + 1) if mark else Pos(file, 1, 1)
    if exc.problem and "'\\t'" in exc.problem:
        return Issue.at(pos, "YAML syntax error: a tab character; YAML indents with spaces only")
    message = f"YAML syntax error: {exc.problem or exc.context}"
    if exc.context and exc.problem and exc.context_mark and exc.context_mark is not mark:
        message += f" ({exc.context} at line {exc.context_mark.line + 1})"
    return Issue.at(pos, message)


class _LimitedLoader(yaml.SafeLoader):
    """Composes nodes with a depth cap (the composer recurses: 10k nested '[' would exhaust the
    stack) and a node cap (the parser is lazy, so a huge document stops early)."""

    @property
    def written(self) -> int:
        """Nodes and alias uses composed so far."""
        return self._nodes

    def __init__(self, text: str, file: str):
        super().__init__(text)
        self._file = file
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_DEPTH:
                raise LoadError(self._limit(f"nesting deeper than {MAX_DEPTH} levels"))
            if self._nodes > MAX_NODES:
                raise LoadError(self._limit(f"more than {MAX_NODES} nodes"))
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:  # noqa: N803 (PyYAML's name)
        # The scanner reads ahead over '[[[[...' looking for simple keys, quadratically in the
        # nesting; stop it before the composer's depth check would.
        if self.flow_level >= MAX_DEPTH:
            mark = self.get_mark()
            raise LoadError(
                Issue(
                    self._file,
                    mark.line + 1,
                    mark.column + 1,
                    f"too deep or too large: nesting deeper than {MAX_DEPTH} levels; refusing to load it",
                )
            )
        super().fetch_flow_collection_start(TokenClass)

    def _limit(self, what: str) -> Issue:
        # types-PyYAML leaves Parser.peek_event unannotated; it returns the next Event
        peek_event: Callable[[], Event] = self.peek_event
        mark = peek_event().start_mark
        assert mark is not None  # the parser gives every event the mark of its token
        return Issue(
            self._file,
            mark.line + 1,
            mark.column + 1,
            f"too deep or too large: {what}; refusing to load it",
        )


def _refuse_alias_bombs(root: Node, file: str, written: int) -> int:
    """Count what the node graph expands to, in time linear in the number of distinct nodes
    (aliases share node objects), so a billion laughs is refused before any expansion.
    `written`: the nodes and alias uses as written in the file (the composer's count). Returns
    the expansion limit of this document (for the converter's own count)."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        if isinstance(node, ScalarNode):
            return 1
        if id(node) in visiting:
            raise LoadError(
                Issue.at(
                    _pos(node, file), "an alias refers to a node that contains it (recursive alias)"
                )
            )
        visiting.add(id(node))
        children = (
            node.value
            if isinstance(node, SequenceNode)
            else [n for pair in node.value for n in pair]
        )
        total = 1 + sum(size(child) for child in children)
        visiting.discard(id(node))
        sizes[id(node)] = total
        return total

    expanded = size(root)
    limit = max(EXPANSION_FLOOR, EXPANSION_FACTOR * written)
    if expanded <= limit:
        return limit
    # Point at the innermost collection that is still too big by itself: an anchor's definition.
    node = root
    while True:
        children = (
            node.value
            if isinstance(node, SequenceNode)
            else [n for pair in node.value for n in pair]
        )
        big = next((c for c in children if sizes.get(id(c), 1) > limit), None)
        if big is None:
            break
        node = big
    raise LoadError(
        Issue.at(
            _pos(node, file),
            f"too many aliases/nodes: the document expands to more than {limit} values (an alias bomb?); refusing to load it",
        )
    )


def _pos(node: Node, file: str) -> Pos:
    return Pos(file, node.start_mark.line + 1, node.start_mark.column + 1)


_SCALARS = SafeConstructor()


class _Converter:
    """Node graph -> values, recording positions. Counts every node visit, so aliases that
    expand exponentially hit MAX_NODES after a bounded amount of work."""

    def __init__(self, file: str, key_label: KeyLabel, limit: int):
        self.file = file
        self._limit = limit
        self.key_label = key_label
        self.locs: dict[Path, Loc] = {}
        self.issues: list[Issue] = []
        self._visits = 0
        self._active: set[int] = set()  # collections being converted: detects recursive aliases

    def pos(self, node: Node) -> Pos:
        return Pos(self.file, node.start_mark.line + 1, node.start_mark.column + 1)

    def value(self, node: Node, path: Path, key: Pos | None, depth: int) -> Any:
        self._visits += 1
        if self._visits > self._limit:
            raise LoadError(
                Issue.at(
                    self.pos(node),
                    f"too many aliases/nodes: more than {self._limit} after expanding aliases; refusing to load it",
                )
            )
        if depth > MAX_DEPTH:
            raise LoadError(
                Issue.at(
                    self.pos(node),
                    f"too deep: nesting deeper than {MAX_DEPTH} levels after expanding aliases",
                )
            )
        if isinstance(node, ScalarNode):
            value, scalar = self.scalar(node)
            self.locs[path] = Loc(key, self.pos(node), scalar)
            return value
        if id(node) in self._active:
            raise LoadError(
                Issue.at(
                    self.pos(node), "an alias refers to a node that contains it (recursive alias)"
                )
            )
        self._active.add(id(node))
        try:
            self.locs[path] = Loc(key, self.pos(node))
            self._check_tag(node)
            if isinstance(node, SequenceNode):
                return [
                    self.value(item, (*path, i), None, depth + 1)
                    for i, item in enumerate(node.value)
                ]
            assert isinstance(node, MappingNode)  # the composer builds only these three kinds
            return self.mapping(node, path, depth)
        finally:
            self._active.discard(id(node))

    def scalar(self, node: ScalarNode) -> tuple[Any, Scalar]:
        tag = node.tag
        scalar = Scalar(node.value, node.style is None, tag)
        try:
            if tag in (_TAG + "str", _TAG + "timestamp", _TAG + "value", _MERGE):
                # Timestamps stay text: `at:` parses ISO-8601 itself, and a date object in args
                # would surprise more than help. '=' and '<<' as values are just strings.
                return node.value, scalar
            if tag == _TAG + "null":
                return None, scalar
            if tag == _TAG + "bool":
                return _SCALARS.construct_yaml_bool(node), scalar
            if tag == _TAG + "int":
                return _SCALARS.construct_yaml_int(node), scalar
            if tag == _TAG + "float":
                return _SCALARS.construct_yaml_float(node), scalar
        except (ValueError, KeyError, TypeError):
            self.issues.append(
                Issue.at(self.pos(node), f"'{node.value}' is not a valid {tag.replace(_TAG, '!!')}")
            )
            return node.value, scalar
        self.issues.append(Issue.at(self.pos(node), f"unsupported YAML tag '{tag}'"))
        return node.value, Scalar(node.value, False, _TAG + "str")

    def _check_tag(self, node: Node) -> None:
        expected = _TAG + ("seq" if isinstance(node, SequenceNode) else "map")
        if node.tag != expected:
            self.issues.append(Issue.at(self.pos(node), f"unsupported YAML tag '{node.tag}'"))

    def mapping(self, node: MappingNode, path: Path, depth: int) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        # Merge keys (`<<: *base`) first, so explicit keys override what they bring in.
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                self.merge(value_node, path, depth, result)
        first: dict[Any, Pos] = {}
        label = self.key_label(path)
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                continue
            key_pos = self.pos(key_node)
            key = self.key(key_node, label)
            if key is _BAD_KEY:
                continue
            if key in first:
                where = first[key]
                self.issues.append(
                    Issue.at(
                        key_pos,
                        f"duplicate key '{key}' (first defined at line {where.line}); YAML would silently keep only the last one",
                    )
                )
                continue
            first[key] = key_pos
            result[key] = self.value(value_node, (*path, key), key_pos, depth + 1)
        return result

    def merge(self, value_node: Node, path: Path, depth: int, into: dict[Any, Any]) -> None:
        sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
        if not all(isinstance(source, MappingNode) for source in sources):
            self.issues.append(
                Issue.at(
                    self.pos(value_node), "'<<' (merge key) needs a mapping or a list of mappings"
                )
            )
            return
        own = self.locs[path]  # converting a source records its position at `path`: restore
        # In a list of merges, earlier mappings win: apply them last.
        for source in reversed(sources):
            into.update(self.value(source, path, own.key, depth + 1))
        self.locs[path] = own

    def key(self, node: Node, label: str | None) -> Any:
        if not isinstance(node, ScalarNode):
            self.issues.append(
                Issue.at(
                    self.pos(node), "a mapping key must be a plain value, not a list or mapping"
                )
            )
            return _BAD_KEY
        value, scalar = self.scalar(node)
        if label is None or isinstance(value, str):
            return value
        # Outside free data every key is a name: report what YAML 1.1 made of it, go on with
        # the text as typed so the rest of the file is still checked.
        self.issues.append(Issue.at(self.pos(node), f"{label}: {trap_message(value, scalar)}"))
        return scalar.text


_BAD_KEY = object()


def describe(value: Any, scalar: Scalar | None = None) -> str:
    """'the boolean false from the unquoted YAML 1.1 word 'no'', 'the string 'x'', 'a list'..."""
    what = _describe_value(value)
    if scalar is None or not scalar.plain or isinstance(value, str):
        return what
    text = scalar.text
    if value is None:
        return "null from an empty value" if text == "" else f"null from the unquoted word '{text}'"
    if isinstance(value, bool):
        return f"{what} from the unquoted YAML 1.1 word '{text}'"
    if ":" in text:
        return f"{what} from the unquoted YAML 1.1 sexagesimal (base 60) number '{text}'"
    digits = text.lstrip("+-")
    if isinstance(value, int) and len(digits) > 1 and digits.startswith("0") and digits.isdigit():
        return f"{what} from the unquoted YAML 1.1 octal number '{text}'"
    if text != str(value):
        return f"{what} from the unquoted '{text}'"
    return what


def trap_message(value: Any, scalar: Scalar | None) -> str:
    """For a place that wants a string: 'got <what YAML made>; quote it ('x') if you meant the string'."""
    if scalar is None or isinstance(value, str) or not scalar.plain or scalar.text == "":
        return f"expected a string, got {describe(value, scalar)}"
    what = describe(value, scalar)
    if what == describe(value):  # a plain number: nothing surprising, just unquoted
        return f"expected a string, got {what}; quote it ('{scalar.text}')"
    return f"got {what}; quote it ('{scalar.text}') if you meant the string"


def _describe_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value:g}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string '{shown}'"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__
