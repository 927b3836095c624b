"""Credentials out of what the bench writes: report environment tables, JUnit properties, the journal.

A name is secret when one of its word parts (split at `_`, `-`, `.` and lower-to-upper case changes,
compared case-insensitively) is one of
  - KEY, KEYS or JWT, as a whole part: `API_KEY`, `AWS_SECRET_ACCESS_KEY`, `SSH_KEY_PASSPHRASE`,
    `apiKey` match; `KEYBOARD`, `MONKEY`, `KEYRING_BACKEND` do not;
  - TOKEN, SECRET(S), PASSWORD, PASSWD, PASSPHRASE, CREDENTIAL(S) or APIKEY, as a whole part or its
    end: `GITHUB_TOKEN`, `CI_JOB_TOKEN`, `NPMTOKEN`, `DBPASSWORD` match; `TOKENIZERS_PARALLELISM`,
    `SECRETARY`, `PWD` do not;
or when it matches one of the extra patterns: shell-style globs on the whole name, case-insensitive,
given as `patterns` or, by default, comma-separated in $LABBENCH_REDACT (e.g. `*_DSN,SENTRY_*`).

In text, the userinfo of any URL (`https://user:pass@host`, `https://token@host`) and the value (bare
or quoted) of any `name=value` whose name is secret (`?private_token=...`, `GITHUB_TOKEN=...` or
`--api-key=...` on a command line) become `***`. Mappings (an environment, pytest-metadata's table, a
journal record) keep their keys: values under secret names are masked, other strings are redacted as
text.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"

_PART = re.compile(r"(?:KEYS?|JWT|\w*(?:TOKEN|SECRETS?|PASSWORD|PASSWD|PASSPHRASE|CREDENTIALS?|APIKEY))",
                   re.IGNORECASE)
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
# scheme://userinfo@ : the userinfo runs to the last @ before the authority ends
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[\w.~%!$&'()*+,;=:@-]*@")
_ASSIGNMENT = re.compile(r"(?<![\w.-])(?P<name>-{0,2}[A-Za-z_][\w.-]*)="
                         r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s&\"'<>;,]*)")


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
    """`text` with URL userinfo and the values of secret-named `name=value`s masked."""
    extra = configured_patterns() if patterns is None else list(patterns)
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _ASSIGNMENT.sub(
        lambda m: f"{m['name']}={MASK}" if m["value"] and is_secret(m["name"].lstrip("-"), extra) else m[0], text)


def redact_env(mapping: Mapping[str, Any], patterns: Iterable[str] | None = None) -> dict[str, Any]:
    """A copy of `mapping` (an environment, pytest-metadata's table, a JSON record), each value through
    `redact_value`."""
    extra = configured_patterns() if patterns is None else list(patterns)
    return {k: redact_value(k, v, extra) for k, v in mapping.items()}


def redact_value(name: Any, value: Any, patterns: Iterable[str] | None = None) -> Any:
    """The value of a variable or property called `name`: masked if the name is secret, else with its
    strings through `redact_text` (nested mappings and lists walked the same way, lists become lists)."""
    extra = configured_patterns() if patterns is None else list(patterns)
    return MASK if is_secret(str(name), extra) else _walk(value, extra)


def _walk(value: Any, extra: list[str]) -> Any:
    if isinstance(value, str):
        return redact_text(value, extra)
    if isinstance(value, Mapping):
        return redact_env(value, extra)
    if isinstance(value, (list, tuple)):
        return [_walk(v, extra) for v in value]
    return value
