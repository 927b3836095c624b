"""YAML loading that keeps line numbers, so validation errors can say `file:LINE: key.path: message`.

ruamel.yaml's round-trip loader records where each key and value sits; pydantic reports where an
error is as a key path. This module joins the two: load, substitute environment variables, validate
with a pydantic model, and turn every pydantic error into one line naming the file, line and key path.

A file is refused, never half-read, when it is larger than MAX_BYTES, is not UTF-8, nests deeper than
MAX_DEPTH, expands (through aliases) to more than MAX_VALUES values, has a number longer than MAX_DIGITS,
carries a tag other than the core schema's (`!!str`, `!!int`, `!!float`, `!!bool`, `!!null`, `!!seq`,
`!!map`), or has a key or string holding a control or other unprintable character (tab and newline
aside). A value merged in with `<<:` is reported at the line where it is written.

Substitution, in every string value, as in the shell: `${VAR}` (an unset VAR is an error),
`${VAR:-default}` (the default when VAR is unset or empty), `${VAR-default}` (only when unset).
`$$` is a literal `$`; a `$` not followed by `{` or `$` stays as it is. Anything else starting
with `${` (no closing brace, a bad name, a nested substitution) is an error, never kept as text.
"""

from __future__ import annotations

import codecs
import difflib
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq, merge_attrib
from ruamel.yaml.compat import ordereddict
from ruamel.yaml.composer import Composer
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import AliasEvent
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.reader import ReaderError

from labbench.errors import LabConfigError

MAX_BYTES = 64 * 1024
MAX_DEPTH = 32
MAX_VALUES = 10_000
MAX_DIGITS = 100
_NUMBERS = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
_CORE_TAGS = {"!"} | {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}
#: `$$`, or `${` up to the next `}` (or the end of the string, when there is none)
_DOLLAR = re.compile(r"\$(\$|\{[^}]*\}?)")
#: what follows `$` in a well-formed substitution: name, operator (`:-` or `-`), default
_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^${}]*))?\}")
#: a key path part shown as it is; any other is shown quoted
_PLAIN_PART = re.compile(r"[A-Za-z0-9_-]+")
_SHOWN_MAX = 60

Loc = Sequence[str | int]
KeyPath = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


class _Refused(Exception):
    """Raised while composing: the document breaks a limit at `mark`, under key path `loc`."""

    def __init__(self, mark: Any, loc: Loc, message: str):
        super().__init__(message)
        self.line, self.loc, self.message = mark.line + 1, tuple(loc), message


class _Composer(Composer):
    """ruamel's composer, refusing nesting deeper than MAX_DEPTH, more than MAX_VALUES values (so a huge
    document is refused before it is all parsed) and tags outside the core schema."""

    def __init__(self, loader: Any = None):
        super().__init__(loader)
        self._path: list[Any] = []
        self._level = self._values = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        part = index.value if isinstance(index, ScalarNode) else index
        pushed = index is not None  # None: the node is a mapping's key
        if pushed:
            self._path.append(part if isinstance(part, (str, int)) else "?")
        self._level += 1
        try:
            if not isinstance(event, AliasEvent):
                mark, self._values = event.start_mark, self._values + 1
                if self._level > MAX_DEPTH:
                    raise _Refused(mark, self._path[:3], f"nested more than {MAX_DEPTH} levels deep")
                if self._values > MAX_VALUES:
                    raise _Refused(mark, self._path[:3], f"more than {MAX_VALUES} values")
                tag = event.ctag
                if tag is not None and str(tag) not in _CORE_TAGS:
                    shown = str(tag).replace("tag:yaml.org,2002:", "!!")
                    raise _Refused(
                        mark,
                        self._path,
                        f'unsupported YAML tag "{shown}" (only plain strings, '
                        "numbers, true/false, null, lists and mappings)",
                    )
            node = super().compose_node(parent, index)
            if isinstance(node, ScalarNode) and len(node.value) > MAX_DIGITS and str(node.tag) in _NUMBERS:
                raise _Refused(node.start_mark, self._path, f"a number with more than {MAX_DIGITS} digits")
            return node
        finally:
            self._level -= 1
            if pushed:
                self._path.pop()

    def compose_document(self) -> Any:
        """The document's node graph, refused (before anything is built from it) when its aliases expand
        it beyond MAX_VALUES; the error names the first node, outermost, that holds too many."""
        node = super().compose_document()
        sizes: dict[int, int] = {}
        if _expanded(node, sizes) > MAX_VALUES:
            loc: KeyPath = ()
            while big := next(((k, v) for k, v in _children(node) if _expanded(v, sizes) > MAX_VALUES), None):
                loc, node = loc + (big[0],), big[1]
            raise _Refused(node.start_mark, loc, f"more than {MAX_VALUES} values once aliases are expanded")
        return node


class Source:
    """A parsed YAML document and its file name, able to say on which line a key path sits."""

    def __init__(self, path: Path, data: Any, label: str | None = None, start: int = 1):
        self.path, self.data = path, data
        self.label = label or path.name
        self.start = start  # the line the document starts on

    @classmethod
    def load(cls, path: Path, error: type[LabConfigError] = LabConfigError) -> Source:
        path = Path(path)
        label = path.name
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_BYTES + 1)
        except OSError as exc:
            raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
        if len(raw) > MAX_BYTES:
            raise error(f"{label}:1: larger than {MAX_BYTES // 1024} KiB, the most a file here may be")
        text = _decode(raw, label, error)
        yaml = YAML(typ="rt")
        yaml.Composer = _Composer
        try:
            data = yaml.load(text)
        except _Refused as exc:
            raise error(_located(label, exc.line, exc.loc, exc.message)) from None
        except MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else 1
            raise error(f"{label}:{line}: not valid YAML: {_yaml_problem(exc)}") from None
        except ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            message = f"not valid YAML: character U+{exc.character:04X} is not allowed"
            raise error(f"{label}:{line}: {message}") from None
        except YAMLError as exc:
            raise error(f"{label}:1: not valid YAML: {(str(exc) or repr(exc)).splitlines()[0]}") from None
        start = next(
            (
                i
                for i, text_line in enumerate(text.splitlines(), 1)
                if text_line.strip() and not text_line.lstrip().startswith(("#", "%", "---"))
            ),
            1,
        )
        src = cls(path, data if data is not None else CommentedMap(), label, start)
        src._substitute(src.data, (), error, set())
        return src

    def _substitute(self, node: Any, loc: KeyPath, error: type[LabConfigError], done: set[int]) -> Any:
        """Substitute environment variables in every string scalar (see the module docstring) and refuse
        unprintable characters; each container is visited once, however many aliases share it."""
        if isinstance(node, (CommentedMap, CommentedSeq)):
            if id(node) in done:
                return node
            done.add(id(node))
        if isinstance(node, CommentedMap):
            for key, value in list(node.items()):
                if isinstance(key, str):
                    self._check_text(key, loc + (key,), error)
                new = self._substitute(value, loc + (key,), error, done)
                if new is not value:
                    if node._unmerged_contains(key):
                        node[key] = new
                    else:  # merged in with <<: keep it merged, so its line stays the one it is written on
                        ordereddict.__setitem__(node, key, new)
        elif isinstance(node, CommentedSeq):
            for i, item in enumerate(node):
                new = self._substitute(item, loc + (i,), error, done)
                if new is not item:
                    node[i] = new
        elif isinstance(node, str):
            self._check_text(node, loc, error)
            if "$" in node:

                def value(m: re.Match[str]) -> str:
                    token = m.group(1)
                    if token == "$":
                        return "$"
                    ref = _REF.fullmatch(token)
                    if ref is None:
                        problem = (
                            "no closing }"
                            if not token.endswith("}")
                            else "expected ${VAR}, ${VAR:-default} or ${VAR-default} ($$ for a literal $)"
                        )
                        raise error(self.where(loc, f'bad substitution "${token}": {problem}'))
                    name, op, default = ref.groups()
                    current = os.environ.get(name)
                    if op and (current is None or (op == ":-" and not current)):
                        return default
                    if current is None:
                        raise error(self.where(loc, f"environment variable {name} is not set"))
                    return current

                node = _DOLLAR.sub(value, node)
                self._check_text(node, loc, error)  # what the environment put in
        return node

    def _check_text(self, text: str, loc: KeyPath, error: type[LabConfigError]) -> None:
        bad = _unprintable(text)
        if bad is not None:
            name = unicodedata.name(bad, "a control character")
            raise error(self.where(loc, f"character U+{ord(bad):04X} ({name}) is not allowed"))

    def line(self, loc: Loc) -> int:
        """The line of the deepest part of `loc` that exists in the document (1-based); a key merged in
        with `<<:` is found where it is written."""
        node, line = self.data, 1 if isinstance(self.data, CommentedMap) else self.start
        for part in loc:
            try:
                if isinstance(node, CommentedMap) and part not in node:  # pydantic shows any key as a string
                    part = next((k for k in node if not isinstance(k, str) and str(k) == part), part)
                if isinstance(node, CommentedMap) and part in node:
                    owner = _owner(node, part)
                    line = (owner.lc.value(part) if _is_scalar(node[part]) else owner.lc.key(part))[0] + 1
                    node = node[part]
                elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
                    line = node.lc.item(part)[0] + 1
                    node = node[part]
                else:
                    break
            except (KeyError, IndexError, TypeError):  # an unhashable part, or a position ruamel did not keep
                break
        return line

    def where(self, loc: Loc, message: str) -> str:
        return _located(self.label, self.line(loc), loc, message)

    def check(self, model: type[M], data: Any = None, at: Loc = ()) -> tuple[M | None, list[str]]:
        """Validate the document (or `data` derived from the part of it at key path `at`, with the same
        key paths below it) against `model`: the model, or None and one message per problem."""
        data = plain(self.data) if data is None else data
        try:
            return model.model_validate(data), []
        except ValidationError as exc:
            found: dict[KeyPath, list[str]] = {}
            for err in _drop_misspelt_missing(exc.errors()):
                loc, message = describe(err, model)
                found.setdefault(_in_data(loc, data), []).append(message)
            return None, [self.where(tuple(at) + loc, _joined(messages)) for loc, messages in found.items()]

    def validate(
        self, model: type[M], data: Any = None, error: type[LabConfigError] = LabConfigError, at: Loc = ()
    ) -> M:
        """As `check`, raising `error` with every problem, one per line."""
        result, problems = self.check(model, data, at)
        if result is None:
            raise error("\n".join(problems))
        return result


def _in_data(loc: KeyPath, data: Any) -> KeyPath:
    """`loc` without the parts pydantic adds below a value of the data: a union's member types, the
    `max:` a bare-number budget becomes."""
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict):
            if not isinstance(part, (str, int)) or part not in node:
                return loc  # a missing key, or one a model validator added
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return loc[:i]
    return loc


def _joined(messages: list[str]) -> str:
    """The problems at one key path: `expected X, got V` and `expected Y, got V` read as `expected X or Y`."""
    messages = list(dict.fromkeys(messages))
    parts = [p for m in messages if (p := re.fullmatch(r"expected (.+), got (.+)", m))]
    if len(messages) > 1 and len(parts) == len(messages) and len({p.group(2) for p in parts}) == 1:
        return f"expected {' or '.join(p.group(1) for p in parts)}, got {parts[0].group(2)}"
    return "; ".join(messages)


def _decode(raw: bytes, label: str, error: type[LabConfigError]) -> str:
    """UTF-8 (with or without a byte order mark), or an error naming the line of the first bad byte."""
    try:
        return raw.removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except UnicodeDecodeError as exc:
        start = exc.start + (len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0)
        line = raw.count(b"\n", 0, start) + 1
        column = start - (raw.rfind(b"\n", 0, start) + 1) + 1
        hint = (
            "it looks like UTF-16."
            if raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
            else "Latin-1 or Windows-1252?"
        )
        raise error(
            f"{label}:{line}: not UTF-8: byte 0x{raw[start]:02x} at column {column} ({hint} "
            "Save the file as UTF-8)"
        ) from None


def _yaml_problem(exc: MarkedYAMLError) -> str:
    problem = exc.problem or exc.context or "malformed"
    if problem.startswith("but ") and exc.context:
        problem = f"{exc.context}, {problem}"
    return problem + ("; indent with spaces, not tabs" if "'\\t'" in problem else "")


def _unprintable(text: str) -> str | None:
    """The first character of `text` that is neither printable nor a tab or newline."""
    if text.isprintable():
        return None
    return next((c for c in text if not c.isprintable() and c not in "\t\n"), None)


def _located(label: str, line: int, loc: Loc, message: str) -> str:
    path = ".".join(_part(p) for p in loc)
    return f"{label}:{line}: {path + ': ' if path else ''}{message}"


def _part(part: Any) -> str:
    """A key path part: as it is when plain, else quoted and shortened (never a raw control character)."""
    text = str(part)
    if _PLAIN_PART.fullmatch(text):
        return text
    quoted = json.dumps(text[:_SHOWN_MAX], ensure_ascii=False)
    quoted = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in quoted)
    return quoted + ("..." if len(text) > _SHOWN_MAX else "")


def _children(node: Node) -> list[tuple[Any, Node]]:
    """The nodes under `node`, each with its key path part (a key that is no scalar shows as "?")."""
    if isinstance(node, MappingNode):
        return [(k.value if isinstance(k, ScalarNode) else "?", v) for k, v in node.value]
    if isinstance(node, SequenceNode):
        return list(enumerate(node.value))
    return []


def _expanded(node: Node, sizes: dict[int, int]) -> int:
    """How many values `node` holds with every alias expanded (computed once per shared node)."""
    if id(node) not in sizes:
        keys = [k for k, _ in node.value] if isinstance(node, MappingNode) else []
        sizes[id(node)] = 1 + sum(_expanded(n, sizes) for n in keys + [v for _, v in _children(node)])
    return sizes[id(node)]


def _owner(node: CommentedMap, key: Any) -> CommentedMap:
    """The mapping `key` is written in: `node` itself, or one merged into it with `<<:`."""
    if node._unmerged_contains(key):
        return node
    for merged in getattr(node, merge_attrib, ()):
        if key in merged:
            return _owner(merged, key)
    return node


def _drop_misspelt_missing(errors: list[ErrorDetails]) -> list[ErrorDetails]:
    """A misspelt required key shows as unknown *and* missing; keep only the unknown key (it says both)."""
    extras = {
        (tuple(e["loc"][:-1]), str(e["loc"][-1]))
        for e in errors
        if e["type"] == "extra_forbidden" and e["loc"]
    }

    def misspelt(e: ErrorDetails) -> bool:
        if e["type"] != "missing" or not e["loc"]:
            return False
        parent, key = tuple(e["loc"][:-1]), str(e["loc"][-1])
        return any(p == parent and difflib.get_close_matches(key, [x], cutoff=0.6) for p, x in extras)

    return [e for e in errors if not misspelt(e)]


def _is_scalar(node: Any) -> bool:
    return not isinstance(node, (CommentedMap, CommentedSeq))


def plain(node: Any) -> Any:
    """ruamel's containers -> plain dicts and lists (pydantic validates those most predictably)."""
    if isinstance(node, CommentedMap):
        return {k: plain(v) for k, v in node.items()}
    if isinstance(node, CommentedSeq):
        return [plain(v) for v in node]
    return node


def suggest(word: str | int, choices: Iterable[str]) -> str:
    """`; did you mean "x"?` when a close match exists, else the empty string."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f'; did you mean "{match[0]}"?' if match else ""


def unknown(kind: str, name: str, known: Iterable[str]) -> str:
    """The message for a name that is not among `known`: did-you-mean, then the known names."""
    known = sorted(known)
    return f"unknown {kind} {shown(name)}{suggest(name, known)} (known: {', '.join(known) or 'none'})"


def shown(value: Any) -> str:
    """A value as a message shows it: a string quoted (escaped, shortened), a container by its kind."""
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    if isinstance(value, str):
        return json.dumps(value[:_SHOWN_MAX]) + ("..." if len(value) > _SHOWN_MAX else "")
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
    "path_type": "a path",
}


def describe(err: ErrorDetails, model: type[BaseModel]) -> tuple[KeyPath, str]:
    """One pydantic error -> (key path, message in the bench's words)."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1])
        return loc, f"unknown key{suggest(loc[-1], allowed)}" + (
            f" (allowed: {', '.join(sorted(allowed))})" if allowed else ""
        )
    if kind == "missing":
        return loc, "required key is missing"
    if kind in _EXPECTED:
        return loc, f"expected {_EXPECTED[kind]}, got {shown(err['input'])}"
    if kind == "literal_error":
        return loc, f"expected {err['ctx']['expected']}, got {shown(err['input'])}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return loc, f"{err['msg'].lower()}, got {shown(err['input'])}"
    if kind in ("string_too_short", "too_short"):
        unit = "character" if kind == "string_too_short" else "item"
        return loc, f"needs at least {err['ctx']['min_length']} {unit}"
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return loc, msg


def _fields_at(model: type[BaseModel], loc: KeyPath) -> list[str]:
    """The field names allowed at `loc` inside `model`, following nested models and dict values."""
    current: Any = model
    for part in loc:
        current = _submodel(current, part)
        if current is None:
            return []
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        return []
    return [
        n
        for n, f in current.model_fields.items()
        if not (isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("from_key"))
    ]


def _submodel(model: Any, part: str | int) -> Any:
    if isinstance(model, _DictOf):
        return _unwrap(model.value)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    field = model.model_fields.get(str(part)) if isinstance(part, str) else None
    return None if field is None else _unwrap(field.annotation)


def _unwrap(ann: Any) -> Any:
    """Optional[X] -> X; dict[str, X] -> a _DictOf(X) that any key walks into."""
    for _ in range(3):
        origin = get_origin(ann)
        if origin is dict:
            return _DictOf(get_args(ann)[1])
        args = [a for a in get_args(ann) if a is not type(None)]
        if origin is None or not args:
            break
        ann = args[0]
    return ann


class _DictOf:
    """A dict field while walking a key path: any key leads to the value type."""

    def __init__(self, value: Any):
        self.value = value
