"""The line framing both ACME protocols share: ASCII lines ending in LF, each reply sealed with
` *XXXXXXXX`, the CRC-32 (zlib) of the text before it in upper-case hex, so that a corrupted reply
is refused before any number is read from it."""

from __future__ import annotations

import re
import zlib

_SEAL = re.compile(r"(.*) \*([0-9A-F]{8})")


def sealed(text: str) -> str:
    """`text` with its CRC seal."""
    return f"{text} *{zlib.crc32(text.encode('ascii')):08X}"


def opened(line: str) -> str | None:
    """The text of a sealed line, or None when it has no seal or the seal does not match."""
    match = _SEAL.fullmatch(line.rstrip("\r\n"))
    if match is None or int(match.group(2), 16) != zlib.crc32(match.group(1).encode("ascii", "replace")):
        return None
    return match.group(1)
