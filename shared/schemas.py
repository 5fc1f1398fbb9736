"""JSON Schemas of the wire messages, generated from shared/wire.py into docs/schemas/.

`python -m shared.schemas` rewrites them; tests/test_schemas.py fails when the checked-in
files differ from what the code generates, so the docs cannot drift from the wire.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec

from shared.settings import REPO_ROOT
from shared.wire import WIRE_MESSAGES

SCHEMA_DIR = REPO_ROOT / "docs" / "schemas"
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def generate() -> dict[str, str]:
    """File name -> JSON text, one schema per top-level wire message."""
    (refs, components) = msgspec.json.schema_components(
        WIRE_MESSAGES, ref_template="#/$defs/{name}"
    )
    files = {}
    for message, ref in zip(WIRE_MESSAGES, refs, strict=True):
        schema = {
            "$schema": DIALECT,
            "$id": f"https://billy.tools/schemas/{message.__name__}.json",
            "title": message.__name__,
            "description": (message.__doc__ or "").strip().splitlines()[0],
            **ref,
            "$defs": components,
        }
        files[f"{message.__name__}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generate().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write():
        print(path.relative_to(REPO_ROOT))
    sys.exit(0)
