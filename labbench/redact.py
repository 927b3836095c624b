"""Credentials out of what the bench writes: the HTML reports, JUnit, the journal.

A name is secret when one of its word parts (split at `_`, `-`, `.` and lower-to-upper case changes,
compared case-insensitively) is one of
  - KEY, KEYS or JWT, as a whole part: `API_KEY`, `AWS_SECRET_ACCESS_KEY`, `SSH_KEY_PASSPHRASE`,
    `apiKey` match; `KEYBOARD`, `MONKEY`, `KEYRING_BACKEND` do not;
  - TOKEN, SECRET(S), PASSWORD, PASSWD, PASSPHRASE, CREDENTIAL(S) or APIKEY, as a whole part or its
    end: `GITHUB_TOKEN`, `CI_JOB_TOKEN`, `NPMTOKEN`, `DBPASSWORD` match; `TOKENIZERS_PARALLELISM`,
    `SECRETARY`, `PWD` do not;
or when it matches one of the extra patterns: shell-style globs on the whole name, case-insensitive,
given as `patterns` or, by default, comma-separated in $LABBENCH_REDACT (e.g. `*_DSN,SENTRY_*`).

In text, the value of any environment variable with a secret name (at least MIN_VALUE_CHARS long:
shorter ones such as `1` or `true` would mask ordinary words), the userinfo of any URL
(`https://user:pass@host`, `https://token@host`) and the value (bare or quoted) of any `name=value`
whose name is secret (`?private_token=...`, `GITHUB_TOKEN=...` or `--api-key=...` on a command line)
become `***`. Mappings (an environment, pytest-metadata's table, a journal record) keep their keys:
values under secret names are masked, other strings are redacted as text. HTML has its text and
attribute values redacted as text, read unescaped.
"""

from __future__ import annotations

import fnmatch
import functools
import html
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MASK = "***"
MIN_VALUE_CHARS = 6

_PART = re.compile(
    r"(?:KEYS?|JWT|\w*(?:TOKEN|SECRETS?|PASSWORD|PASSWD|PASSPHRASE|CREDENTIALS?|APIKEY))", re.IGNORECASE
)
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
# scheme://userinfo@ : the userinfo runs to the last @ before the authority ends
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[\w.~%!$&'()*+,;=:@-]*@")
_ASSIGNMENT = re.compile(
    r"(?<![\w.-])(?P<name>-{0,2}[A-Za-z_][\w.-]*)="
    r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s&\"'<>;,]*)"
)
_TAG = re.compile(r"<[^>]*>")
_ATTRIBUTE = re.compile(r"""(?P<head>[^\s"'<>/=]+\s*=\s*)(?P<value>"[^"]*"|'[^']*'|[^\s"'<>`=]+)""")


@dataclass(frozen=True)
class _Rules:
    patterns: tuple[str, ...]
    values: re.Pattern[str] | None  # the secret-named environment variables' values


def configured_patterns() -> list[str]:
    """The extra name patterns of $LABBENCH_REDACT (comma-separated globs)."""
    return [p.strip() for p in os.environ.get("LABBENCH_REDACT", "").split(",") if p.strip()]


def is_secret(name: str, patterns: Iterable[str] | None = None) -> bool:
    """Whether a variable, property or parameter called `name` holds a secret (see the module docstring)."""
    if any(_PART.fullmatch(word) for word in _WORDS.findall(name)):
        return True
    extra = configured_patterns() if patterns is None else patterns
    return any(fnmatch.fnmatchcase(name.upper(), p.upper()) for p in extra)


def redact_text(text: str, patterns: Iterable[str] | None = None) -> str:
    """`text` with secret environment values, URL userinfo and the values of secret-named `name=value`s
    masked."""
    return _text(text, _rules(patterns))


def redact_html(markup: str, patterns: Iterable[str] | None = None) -> str:
    """`markup` with its text and attribute values through `redact_text`; a `data:` URI (an embedded
    image) and every part with nothing to mask are kept as they are."""
    rules = _rules(patterns)

    def attribute(m: re.Match[str]) -> str:
        value = m["value"]
        quote = value[0] if value[0] in "\"'" else ""
        inner = value[1:-1] if quote else value
        if html.unescape(inner).lstrip().lower().startswith("data:"):
            return m[0]
        return f"{m['head']}{quote}{_escaped(inner, rules, quote=True)}{quote}"

    parts, end = [], 0
    for tag in _TAG.finditer(markup):
        parts += [_escaped(markup[end : tag.start()], rules, quote=False), _ATTRIBUTE.sub(attribute, tag[0])]
        end = tag.end()
    parts.append(_escaped(markup[end:], rules, quote=False))
    return "".join(parts)


def redact_env(mapping: Mapping[str, Any], patterns: Iterable[str] | None = None) -> dict[str, Any]:
    """A copy of `mapping` (an environment, pytest-metadata's table, a JSON record), each value through
    `redact_value`."""
    rules = _rules(patterns)
    return {k: _value(k, v, rules) for k, v in mapping.items()}


def redact_value(name: Any, value: Any, patterns: Iterable[str] | None = None) -> Any:
    """The value of a variable or property called `name`: masked if the name is secret, else with its
    strings through `redact_text` (nested mappings and lists walked the same way, lists become lists)."""
    return _value(name, value, _rules(patterns))


def _rules(patterns: Iterable[str] | None) -> _Rules:
    extra = tuple(configured_patterns() if patterns is None else patterns)
    return _Rules(extra, _secret_values(tuple(os.environ.items()), extra))


@functools.lru_cache(maxsize=8)
def _secret_values(environ: tuple[tuple[str, str], ...], patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """A pattern of the values of `environ`'s secret-named variables, longest first."""
    values = {v for k, v in environ if len(v) >= MIN_VALUE_CHARS and is_secret(k, patterns)}
    return re.compile("|".join(map(re.escape, sorted(values, key=len, reverse=True)))) if values else None


def _text(text: str, rules: _Rules) -> str:
    if rules.values is not None:
        text = rules.values.sub(MASK, text)
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _ASSIGNMENT.sub(
        lambda m: (
            f"{m['name']}={MASK}" if m["value"] and is_secret(m["name"].lstrip("-"), rules.patterns) else m[0]
        ),
        text,
    )


def _escaped(escaped: str, rules: _Rules, quote: bool) -> str:
    """HTML-escaped text redacted as the text it stands for."""
    text = html.unescape(escaped)
    redacted = _text(text, rules)
    return escaped if redacted == text else html.escape(redacted, quote=quote)


def _value(name: Any, value: Any, rules: _Rules) -> Any:
    return MASK if is_secret(str(name), rules.patterns) else _walk(value, rules)


def _walk(value: Any, rules: _Rules) -> Any:
    if isinstance(value, str):
        return _text(value, rules)
    if isinstance(value, Mapping):
        return {k: _value(k, v, rules) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk(v, rules) for v in value]
    return value
