"""YAML loading that keeps line numbers, so validation errors can say `file:LINE: key.path: message`.

ruamel.yaml's round-trip loader records where each key and value sits; pydantic reports where an
error is as a key path. This module joins the two: load, substitute environment variables, validate
with a pydantic model, and turn every pydantic error into one line naming the file, line and key path.

Substitution, in every string value, as in the shell: `${VAR}` (an unset VAR is an error),
`${VAR:-default}` (the default when VAR is unset or empty), `${VAR-default}` (only when unset).
`$$` is a literal `$`; a `$` not followed by `{` or `$` stays as it is. Anything else starting
with `${` (no closing brace, a bad name, a nested substitution) is an error, never kept as text.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence, get_args, get_origin

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from labbench.errors import LabConfigError

#: `$$`, or `${` up to the next `}` (or the end of the string, when there is none)
_DOLLAR = re.compile(r"\$(\$|\{[^}]*\}?)")
#: what follows `$` in a well-formed substitution: name, operator (`:-` or `-`), default
_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^${}]*))?\}")

Loc = Sequence[str | int]


class Source:
    """A parsed YAML document and its file name, able to say on which line a key path sits."""

    def __init__(self, path: Path, data: Any, label: str | None = None):
        self.path, self.data = path, data
        self.label = label or path.name

    @classmethod
    def load(cls, path: Path, error: type[LabConfigError] = LabConfigError) -> "Source":
        path = Path(path)
        label = path.name
        try:
            text = path.read_text()
        except OSError as exc:
            raise error(f"{path}: cannot read: {exc.strerror}") from None
        try:
            data = YAML(typ="rt").load(text)
        except MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else 1
            raise error(f"{label}:{line}: not valid YAML: {exc.problem or exc.context}") from None
        src = cls(path, data if data is not None else CommentedMap(), label)
        src.data = src._substitute(src.data, (), error)
        return src

    def _substitute(self, node: Any, loc: tuple, error: type[LabConfigError]) -> Any:
        """Substitute environment variables in every string scalar (see the module docstring)."""
        if isinstance(node, CommentedMap):
            for key in list(node):
                node[key] = self._substitute(node[key], loc + (key,), error)
        elif isinstance(node, CommentedSeq):
            for i, item in enumerate(node):
                node[i] = self._substitute(item, loc + (i,), error)
        elif isinstance(node, str):

            def value(m: re.Match) -> str:
                token = m.group(1)
                if token == "$":
                    return "$"
                ref = _REF.fullmatch(token)
                if ref is None:
                    problem = ("no closing }" if not token.endswith("}") else
                               "expected ${VAR}, ${VAR:-default} or ${VAR-default} ($$ for a literal $)")
                    raise error(self.where(loc, f'bad substitution "${token}": {problem}'))
                name, op, default = ref.groups()
                current = os.environ.get(name)
                if op and (current is None or (op == ":-" and not current)):
                    return default
                if current is None:
                    raise error(self.where(loc, f"environment variable {name} is not set"))
                return current

            return _DOLLAR.sub(value, node)
        return node

    def line(self, loc: Loc) -> int:
        """The line of the deepest part of `loc` that exists in the document (1-based)."""
        node, line = self.data, 1
        for part in loc:
            if isinstance(node, CommentedMap) and part in node:
                line = node.lc.value(part)[0] + 1 if _is_scalar(node[part]) else node.lc.key(part)[0] + 1
                node = node[part]
            elif isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node):
                line = node.lc.item(part)[0] + 1
                node = node[part]
            else:
                break
        return line

    def where(self, loc: Loc, message: str) -> str:
        path = ".".join(str(p) for p in loc)
        return f"{self.label}:{self.line(loc)}: {path + ': ' if path else ''}{message}"

    def validate(self, model: type[BaseModel], data: Any = None,
                 error: type[LabConfigError] = LabConfigError) -> BaseModel:
        """Validate the document (or `data` derived from it, with the same key paths) against `model`."""
        try:
            return model.model_validate(plain(self.data) if data is None else data)
        except ValidationError as exc:
            errors = _drop_misspelt_missing(exc.errors())
            lines = [self.where(*describe(err, model)) for err in errors]
            raise error("\n".join(dict.fromkeys(lines))) from None


def _drop_misspelt_missing(errors: list[dict]) -> list[dict]:
    """A misspelt required key shows as unknown *and* missing; keep only the unknown key (it says both)."""
    extras = {(tuple(e["loc"][:-1]), str(e["loc"][-1])) for e in errors if e["type"] == "extra_forbidden"}

    def misspelt(e: dict) -> bool:
        parent, key = tuple(e["loc"][:-1]), str(e["loc"][-1])
        return e["type"] == "missing" and any(
            p == parent and difflib.get_close_matches(key, [x], cutoff=0.6) for p, x in extras)

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


def suggest(word: str, choices: Iterable[str]) -> str:
    """`; did you mean "x"?` when a close match exists, else the empty string."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f'; did you mean "{match[0]}"?' if match else ""


def unknown(kind: str, name: str, known: Iterable[str]) -> str:
    """The message for a name that is not among `known`: did-you-mean, then the known names."""
    known = sorted(known)
    return f'unknown {kind} "{name}"{suggest(name, known)} (known: {", ".join(known) or "none"})'


def _shown(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return json.dumps(value) if isinstance(value, str) else str(value).lower() if value is None else str(value)


_EXPECTED = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
    "float_parsing": "a number", "float_type": "a number",
    "bool_parsing": "true or false", "bool_type": "true or false",
    "string_type": "a string", "dict_type": "a mapping", "model_type": "a mapping",
    "model_attributes_type": "a mapping", "list_type": "a list", "path_type": "a path",
}


def describe(err: dict, model: type[BaseModel]) -> tuple[tuple, str]:
    """One pydantic error -> (key path, message in the bench's words)."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1])
        return loc, f"unknown key{suggest(loc[-1], allowed)}" + (
            f" (allowed: {', '.join(sorted(allowed))})" if allowed else "")
    if kind == "missing":
        return loc, "required key is missing"
    if kind in _EXPECTED:
        return loc, f"expected {_EXPECTED[kind]}, got {_shown(err['input'])}"
    if kind == "literal_error":
        return loc, f"expected {err['ctx']['expected']}, got {_shown(err['input'])}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return loc, f"{err['msg'].lower()}, got {_shown(err['input'])}"
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return loc, msg


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at `loc` inside `model`, following nested models and dict values."""
    current: Any = model
    for part in loc:
        current = _submodel(current, part)
        if current is None:
            return []
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        return []
    return [n for n, f in current.model_fields.items() if not (f.json_schema_extra or {}).get("from_key")]


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
