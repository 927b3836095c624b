#!/usr/bin/env python3
"""Write a .tflite model as the C++ source (model_data.cpp) that a board firmware links.

The array is const, so it stays in flash, and aligned to 16 bytes, because TFLite Micro reads
weights in place. Neither `xxd -i` (mutable, unaligned) nor ESP-IDF's EMBED_FILES (no
alignment guarantee) gives both. Standard library only, so it runs inside any board SDK's
Python.

    python3 firmware/tools/embed_model.py MODEL.tflite OUT/model_data.cpp [--name NAME]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
BYTES_PER_LINE = 16


def model_source(model: bytes, name: str, origin: str) -> str:
    """The C++ source defining lb_model_data, lb_model_data_bytes and lb_model_name."""
    rows = (
        ", ".join(f"0x{b:02x}" for b in model[i : i + BYTES_PER_LINE])
        for i in range(0, len(model), BYTES_PER_LINE)
    )
    body = ",\n    ".join(rows)
    return (
        f"// {origin} ({len(model)} bytes), written by firmware/tools/embed_model.py.\n"
        "// Rebuild it from the model rather than editing it.\n"
        '#include "lb_model_data.h"\n\n'
        f"alignas(16) const unsigned char lb_model_data[] = {{\n    {body}\n}};\n"
        f"const unsigned int lb_model_data_bytes = {len(model)}u;\n"
        f'const char lb_model_name[] = "{name}";\n'
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the .tflite file")
    parser.add_argument("out", type=Path, help="the model_data.cpp to write")
    parser.add_argument("--name", help="model string for profile%% (default: the file's stem)")
    args = parser.parse_args(argv)

    name = args.name or args.model.stem
    if not NAME_RE.fullmatch(name):
        parser.error(f"model name {name!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    model = args.model.read_bytes()
    if len(model) < 8 or model[4:8] != b"TFL3":
        parser.error(f"{args.model}: not a TFLite flatbuffer (no TFL3 identifier at byte 4)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(model_source(model, name, args.model.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
