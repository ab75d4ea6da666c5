"""YAML -> Python values plus the source position of every key and value.

PyYAML's constructors lose positions, keep the last of duplicate keys silently and expand
aliases without limit. So we let PyYAML parse and compose the node graph (with a depth and node
cap while composing) and convert nodes to values ourselves: that gives us line and column for
every key and value, duplicate-key errors, YAML 1.1 trap detection for keys, and a bound on
alias expansion ("billion laughs").

Two parsers compose the graph: LibYAML's (C, through PyYAML's `_yaml`), ~20x faster, for
well-formed files within the caps; PyYAML's pure-Python one, the reference, for everything
else: any error (so every message and position is PyYAML's), any cap reached, the inputs where
LibYAML is more lenient, and when PyYAML has no LibYAML. tests/test_config_yaml_paths.py holds
the two to the same values, positions, issues and error lines.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any, cast

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import Event
from yaml.nodes import CollectionNode, MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

try:  # LibYAML's parser, when PyYAML was built with it (`yaml.__with_libyaml__`)
    from yaml._yaml import CParser as _CParser
except ImportError:  # PyYAML without LibYAML: the pure-Python parser does everything
    _CParser = None  # type: ignore[assignment,misc]

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
    locs: Mapping[Path, Loc]

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


# Parse with LibYAML when PyYAML has it (about 20x faster than the pure-Python scanner: a
# 10,000-job spec is ~200,000 nodes). Tests set this to False to check the two paths agree.
LIBYAML = _CParser is not None


def load_yaml(
    raw: bytes, file: str, key_label: KeyLabel = lambda path: "key"
) -> tuple[Document, list[Issue]]:
    """Parse one YAML document. Fatal problems raise LoadError; others are returned as issues
    (duplicate keys, keys YAML 1.1 turned into non-strings, unsupported tags) and the document is
    still usable. An empty document has data None.

    The parse load_top() kept is used when it was of the same bytes (`run` reads the pool
    settings, config/hints.py, before the validation reads the whole file; both on the way to
    READY=1)."""
    kept = _take_kept()
    text = _decode(raw, file)
    # The node graph and the values are hundreds of thousands of objects without cycles: the
    # cyclic collector would walk them again and again while they are built (it cost more than
    # LibYAML's whole parse). Collected as usual once we are done.
    collecting = gc.isenabled()
    gc.disable()
    try:
        composed = None
        if kept is not None and kept[0] == file and kept[1] == raw:
            composed = kept[2]
        elif LIBYAML:
            composed = _compose_libyaml(text)
        if composed is not None:
            try:
                return _convert(*composed, file, key_label)
            except _PureDecides:
                pass
        return _convert(*_compose_pure(text, file), True, file, key_label)
    finally:
        if collecting:
            gc.enable()


# (file, its bytes, the composed graph) kept by load_top(); taken by the next load_yaml.
_kept: tuple[str, bytes, _Composed] | None = None


def _take_kept() -> tuple[str, bytes, _Composed] | None:
    global _kept
    kept, _kept = _kept, None
    if kept is not None and gc.get_freeze_count():
        gc.unfreeze()  # load_top froze the process's objects along with the graph: give back
    return kept


def load_top(raw: bytes, file: str, keys: tuple[str, ...]) -> dict[str, Any] | None:
    """The values of `keys` in the top-level mapping, converting nothing else (the pool hints:
    a few settings out of a file of 10,000 jobs). None when in doubt: the top level is not a
    mapping of distinct plain string keys, or LibYAML's reading would need the pure parser's
    word. Raises LoadError as load_yaml does. The parse is kept for the next load_yaml of the
    same bytes."""
    global _kept
    _take_kept()
    text = _decode(raw, file)
    collecting = gc.isenabled()
    gc.disable()  # as in load_yaml
    try:
        composed = _compose_libyaml(text) if LIBYAML else None
        if composed is None:
            composed = (*_compose_pure(text, file), True)
        _kept = (file, raw, composed)
        if collecting:
            # The kept graph is ~1,000,000 young objects: once the collector is back on, its
            # next collections would walk them all, costing as much as the parse it spares.
            # Frozen (gc.freeze: moved out of the collector's sight) until _take_kept().
            gc.freeze()
        root, written, aliased, merges = composed
        if not isinstance(root, MappingNode):
            return None
        if written is None:
            converter = _Converter(file, lambda path: "key", MAX_NODES, merges, as_written=True)
        else:
            limit = max(EXPANSION_FLOOR, EXPANSION_FACTOR * written)
            if aliased:
                _refuse_alias_bombs(root, file, limit)
            converter = _Converter(file, lambda path: "key", limit, merges)
        found: dict[str, Any] = {}
        seen: set[str] = set()
        for key_node, value_node in root.value:
            if key_node.__class__ is not ScalarNode or key_node.tag != _STR:
                return None  # a merge key, a key YAML 1.1 made a boolean, a tag...
            key = key_node.value
            if key in seen:
                return None
            seen.add(key)
            if key in keys:
                found[key] = converter.value(value_node, (key,), key_node, 1)
        return found
    except _PureDecides:
        return None
    finally:
        if collecting:
            gc.enable()


def _convert(
    root: Node | None,
    written: int | None,
    aliased: bool,
    merges: bool,
    file: str,
    key_label: KeyLabel,
) -> tuple[Document, list[Issue]]:
    if root is None:
        return Document(file, None, {(): Loc(None, Pos(file, 1, 1))}), []
    if written is None:  # LibYAML, no anchors: the converter checks the caps as it goes
        converter = _Converter(file, key_label, MAX_NODES, merges, as_written=True)
    else:
        limit = max(EXPANSION_FLOOR, EXPANSION_FACTOR * written)
        if aliased:  # without aliases, the document expands to just what is written
            _refuse_alias_bombs(root, file, limit)
        converter = _Converter(file, key_label, limit, merges)
    data = converter.value(root, (), None, 0)
    return Document(file, data, _Locs(file, converter.locs)), converter.issues


class _PureDecides(Exception):
    """The LibYAML path met what the pure path words differently: let it decide."""


def _compose_pure(text: str, file: str) -> tuple[Node | None, int, bool]:
    """The node graph, the number of nodes and alias uses as written, and whether aliases may
    share nodes, composed by PyYAML's pure-Python parser under our caps. The reference: every
    error message comes from here."""
    loader = None
    try:
        loader = _LimitedLoader(text, file)  # the reader checks for control characters here
        return loader.get_single_node(), loader.written, True
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


# A composed document: (root, nodes and alias uses as written (None: not counted, no aliases),
# whether aliases share nodes, whether the text may hold merge keys).
_Composed = tuple["Node | None", "int | None", bool, bool]


def _compose_libyaml(text: str) -> _Composed | None:
    """The same as _compose_pure, by LibYAML, for documents that are well-formed and within the
    caps; None for anything else, which the pure path then composes (or refuses) with its
    exact messages and positions. LibYAML's own messages differ from PyYAML's, and its composer
    cannot stop early, so:
    - a text long enough to hold more than MAX_NODES nodes (each takes a character or more)
      has its events counted first, in C, without building anything: a file of millions of
      nodes, or one LibYAML refuses, goes to the pure path before any node exists;
    - LibYAML refuses nesting deeper than 1,000 levels itself, so its recursive composer is
      bounded; our cap of MAX_DEPTH levels is checked on the result: by _as_written when the
      file has anchors, else by the converter as it goes (written None).
    """
    assert _CParser is not None
    if _libyaml_may_differ(text):
        return None
    try:
        if len(text) > MAX_NODES // 2:
            counter = _CParser(text)
            try:
                if counter.raw_parse() > MAX_NODES:  # events >= nodes: the pure path decides
                    return None
            finally:
                counter.dispose()
        composer = _CComposer(text)
        try:
            root = composer.get_single_node()
        finally:
            composer.dispose()
    except yaml.YAMLError:
        return None
    if root is None:
        return None, 0, False, False
    # A merge key is written '<<', or tagged (a tag may spell it with %-escapes)
    merges = "<<" in text or "merge" in text or "%" in text
    if "&" not in text:  # no anchor, so no alias (LibYAML refuses an undefined one)
        return root, None, False, merges
    written, deepest, aliased = _as_written(root)
    if deepest > MAX_DEPTH or written < 0:
        return None
    return root, written, aliased, merges


def _as_written(root: Node) -> tuple[int, int, bool]:
    """(nodes and alias uses, deepest level, whether a collection is used twice) as the file
    writes them, which the pure composer counts while composing. An alias use is the second and
    later visit of a node in document order (an anchor is defined before it is used): a leaf
    there. (An alias of a scalar is a leaf either way and expands to one value.)"""
    seen: set[int] = set()
    count = deepest = 0
    aliased = False
    stack: list[tuple[Node, int]] = [(root, 1)]
    pop, push, scalar = stack.pop, stack.append, ScalarNode
    while stack:
        node, depth = pop()
        count += 1
        if depth > deepest:
            deepest = depth
        if node.__class__ is scalar:
            continue
        if id(node) in seen:
            aliased = True
            continue
        seen.add(id(node))
        depth += 1
        children = (
            node.value
            if node.__class__ is SequenceNode
            else [child for pair in node.value for child in pair]
        )
        if cast(CollectionNode, node).flow_style and any(map(_implicit_empty, children)):
            return -1, deepest, aliased
        for child in reversed(children):
            push((child, depth))
    return count, deepest, aliased


def _implicit_empty(node: Node) -> bool:
    # an empty value in a flow collection ('{a: }', '{a}'): LibYAML places it at the next
    # token, PyYAML right after the ':'
    return node.__class__ is ScalarNode and node.value == "" and not node.style


def _libyaml_may_differ(text: str) -> bool:
    """Whether LibYAML might read `text` differently from PyYAML's scanner, the reference
    (found by comparing the two on mutated specs): PyYAML refuses a tab wherever it could start
    a token (LibYAML takes it as a space), a '?' in a plain scalar inside [] or {}
    ('[http://x?y=1]'), '#' right after a block scalar's '|' or '>', and odd characters in a
    tag handle ('!*!x'); the two also differ on which characters break lines (NEL, LS, PS) and
    on a byte order mark inside the text. Such files are left to the pure path. (Each test
    looks for one character first: `in` is ~50x faster than a regular expression.)"""
    return (
        "\t" in text
        or "?" in text
        or not text.isascii()
        and any(c in text for c in "\ufeff\x85\u2028\u2029")
        or ("|" in text or ">" in text)
        and _HEADER_COMMENT.search(text) is not None
        or "!" in text
        and _TAG_HANDLE.search(text) is not None
    )


_HEADER_COMMENT = re.compile(r"[|>][-+0-9]*#")
_TAG_HANDLE = re.compile(r"![^\s!]*!")

# types-PyYAML leaves Resolver.resolve unannotated: kind, value, implicit -> the tag
_resolve: Callable[[type[Node], Any, tuple[bool, bool]], str] = Resolver().resolve
_STR, _SEQ, _MAP = (
    Resolver.DEFAULT_SCALAR_TAG,
    Resolver.DEFAULT_SEQUENCE_TAG,
    Resolver.DEFAULT_MAPPING_TAG,
)

if _CParser is not None:

    class _CComposer(_CParser):
        """LibYAML's composer (C) with SafeLoader's tag resolution, remembered per plain text:
        a spec repeats the same words ('1h', 'os:getcwd', 'target') thousands of times."""

        def __init__(self, text: str):
            super().__init__(text)
            self._tags: dict[str, str] = {}

        # SafeLoader has no path resolvers: these are no-ops there too
        def descend_resolver(self, parent: Node | None, index: Any) -> None:
            pass

        def ascend_resolver(self) -> None:
            pass

        def resolve(self, kind: type[Node], value: Any, implicit: tuple[bool, bool]) -> str:
            if kind is ScalarNode:
                if implicit[1] and not implicit[0]:  # quoted, untagged: a string
                    return _STR
                # Plain, or tagged '!'. (On an empty '!' scalar LibYAML says (False, False) where
                # PyYAML says (True, False): resolved by its text, to null, either way.)
                tag = self._tags.get(value)
                if tag is None:
                    tag = self._tags[value] = _resolve(kind, value, (True, False))
                return tag
            return _SEQ if kind is SequenceNode else _MAP


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


def _refuse_alias_bombs(root: Node, file: str, limit: int) -> None:
    """Count what the node graph expands to, in time linear in the number of distinct nodes
    (aliases share node objects), so a billion laughs is refused before any expansion.
    `limit`: the expansion allowed, from the nodes and alias uses as written in the file."""
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

    if size(root) <= limit:
        return
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
# Tags whose text stays text: timestamps too (`at:` parses ISO-8601 itself, and a date object in
# args would surprise more than help); '=' and '<<' as values are just strings.
_AS_TEXT = frozenset({_STR, _TAG + "timestamp", _TAG + "value", _MERGE})
_CONVERT: dict[str, Callable[[ScalarNode], Any]] = {
    _TAG + "null": lambda node: None,
    _TAG + "bool": _SCALARS.construct_yaml_bool,
    _TAG + "int": _SCALARS.construct_yaml_int,
    _TAG + "float": _SCALARS.construct_yaml_float,
}

# A position as recorded while converting: (the key's node or None, the value's node). Turned
# into a Loc only when asked for (a message, a merged default): a 10,000-job spec records
# ~200,000 of them and asks for a handful.
_RawLoc = tuple["Node | None", Node]


def _pos_of(node: Node, file: str) -> Pos:
    return Pos(file, node.start_mark.line + 1, node.start_mark.column + 1)


def _scalar_of(node: ScalarNode) -> Scalar:
    """How the scalar was written; an unsupported tag reads as a quoted string (its issue is
    reported at the node)."""
    tag = node.tag
    if tag in _AS_TEXT or tag in _CONVERT:
        return Scalar(node.value, not node.style, tag)  # plain: None (PyYAML) or '' (LibYAML)
    return Scalar(node.value, False, _STR)


class _Locs(Mapping[Path, Loc]):
    """Document.locs: path -> Loc, built on access from the nodes recorded while converting."""

    def __init__(self, file: str, raw: dict[Path, _RawLoc]):
        self._file = file
        self._raw = raw

    def __getitem__(self, path: Path) -> Loc:
        key, node = self._raw[path]
        return Loc(
            None if key is None else _pos_of(key, self._file),
            _pos_of(node, self._file),
            _scalar_of(node) if isinstance(node, ScalarNode) else None,
        )

    def __iter__(self) -> Iterator[Path]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


class _Converter:
    """Node graph -> values, recording positions. Counts every node visit, so aliases that
    expand exponentially hit the expansion limit after a bounded amount of work.

    `as_written`: the graph has no aliases and comes from LibYAML, whose composer checked none
    of our caps; the depth here is then the depth as written, and wherever the pure composer
    would refuse or place something differently, _PureDecides is raised."""

    def __init__(
        self, file: str, key_label: KeyLabel, limit: int, merges: bool, as_written: bool = False
    ):
        self.file = file
        self._merges = merges  # False: the text cannot hold a merge key
        self._limit = limit
        self.key_label = key_label
        self.locs: dict[Path, _RawLoc] = {}
        self.issues: list[Issue] = []
        self._visits = 0
        self._active: set[int] = set()  # collections being converted: detects recursive aliases
        self._as_written = as_written
        # The pure composer counts the root as level 1, this converter as level 0.
        self._deepest = MAX_DEPTH - 1 if as_written else MAX_DEPTH

    def pos(self, node: Node) -> Pos:
        return _pos_of(node, self.file)

    def value(self, node: Node, path: Path, key: Node | None, depth: int) -> Any:
        self._visits += 1
        if self._visits > self._limit:
            raise LoadError(
                Issue.at(
                    self.pos(node),
                    f"too many aliases/nodes: more than {self._limit} after expanding aliases; refusing to load it",
                )
            )
        if depth > self._deepest:
            if self._as_written:
                raise _PureDecides
            raise LoadError(
                Issue.at(
                    self.pos(node),
                    f"too deep: nesting deeper than {MAX_DEPTH} levels after expanding aliases",
                )
            )
        self.locs[path] = (key, node)
        if node.__class__ is ScalarNode:
            assert isinstance(node, ScalarNode)
            tag = node.tag
            return node.value if tag in _AS_TEXT else self.scalar(node)
        if id(node) in self._active:
            raise LoadError(
                Issue.at(
                    self.pos(node), "an alias refers to a node that contains it (recursive alias)"
                )
            )
        assert isinstance(node, CollectionNode)  # the composer builds only these three kinds
        if self._as_written and node.flow_style:
            self._check_flow(node)
        self._active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                if node.tag != _SEQ:
                    self.issues.append(
                        Issue.at(self.pos(node), f"unsupported YAML tag '{node.tag}'")
                    )
                depth += 1
                return [
                    self.value(item, (*path, i), None, depth) for i, item in enumerate(node.value)
                ]
            assert isinstance(node, MappingNode)
            if node.tag != _MAP:
                self.issues.append(Issue.at(self.pos(node), f"unsupported YAML tag '{node.tag}'"))
            return self.mapping(node, path, depth)
        finally:
            self._active.discard(id(node))

    def _check_flow(self, node: CollectionNode) -> None:
        # An empty value in a flow collection ('{a: }', '{a}'): LibYAML places it at the next
        # token, PyYAML right after the ':'.
        children = node.value if isinstance(node, SequenceNode) else chain(*node.value)
        if any(map(_implicit_empty, children)):
            raise _PureDecides

    def scalar(self, node: ScalarNode) -> Any:
        tag = node.tag
        if tag in _AS_TEXT:
            return node.value
        convert = _CONVERT.get(tag)
        if convert is None:
            self.issues.append(Issue.at(self.pos(node), f"unsupported YAML tag '{tag}'"))
            return node.value
        try:
            return convert(node)
        except (ValueError, KeyError, TypeError):
            self.issues.append(
                Issue.at(self.pos(node), f"'{node.value}' is not a valid {tag.replace(_TAG, '!!')}")
            )
            return node.value

    def mapping(self, node: MappingNode, path: Path, depth: int) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        pairs = node.value
        # Merge keys (`<<: *base`) first, so explicit keys override what they bring in.
        merges = self._merges and any(key_node.tag == _MERGE for key_node, _ in pairs)
        if merges:
            for key_node, value_node in pairs:
                if key_node.tag == _MERGE:
                    self.merge(value_node, path, depth, result)
        first: dict[Any, Node] = {}
        label = self.key_label(path)
        depth += 1
        value, scalar_class, locs = self.value, ScalarNode, self.locs
        inline = depth <= self._deepest
        for key_node, value_node in pairs:
            if key_node.__class__ is scalar_class and key_node.tag == _STR:
                key = key_node.value  # the usual case, inline
            elif merges and key_node.tag == _MERGE:
                continue
            else:
                key = self.key(key_node, label)
                if key is _BAD_KEY:
                    continue
            if key in first:
                line = first[key].start_mark.line + 1
                self.issues.append(
                    Issue.at(
                        self.pos(key_node),
                        f"duplicate key '{key}' (first defined at line {line}); YAML would silently keep only the last one",
                    )
                )
                continue
            first[key] = key_node
            if (
                inline
                and value_node.__class__ is scalar_class
                and value_node.tag == _STR
                and self._visits < self._limit
            ):  # what value() does for the usual value, a string, inline
                self._visits += 1
                locs[(*path, key)] = (key_node, value_node)
                result[key] = value_node.value
            else:
                result[key] = value(value_node, (*path, key), key_node, depth)
        return result

    def merge(self, value_node: Node, path: Path, depth: int, into: dict[Any, Any]) -> None:
        if self._as_written and isinstance(value_node, SequenceNode):
            raise _PureDecides  # its items are a level deeper than this converter counts
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
            into.update(self.value(source, path, own[0], depth + 1))
        self.locs[path] = own

    def key(self, node: Node, label: str | None) -> Any:
        if not isinstance(node, ScalarNode):
            if self._as_written:
                raise _PureDecides  # the pure composer checks the depth inside it
            self.issues.append(
                Issue.at(
                    self.pos(node), "a mapping key must be a plain value, not a list or mapping"
                )
            )
            return _BAD_KEY
        value = self.scalar(node)
        if label is None or isinstance(value, str):
            return value
        # Outside free data every key is a name: report what YAML 1.1 made of it, go on with
        # the text as typed so the rest of the file is still checked.
        scalar = _scalar_of(node)
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
