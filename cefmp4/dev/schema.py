"""The event log's JSON Schema, generated from the event classes.

``docs/events.schema.json`` is the output of this module, shipped in the repo
so a consumer in another language can read the log without reading Python:
``python -m cefmp4.dev.schema`` (``task schema``) rewrites it, ``--check`` only
compares, and ``tests/test_versions.py`` fails when the file and the code
disagree, so an event cannot change without the file changing with it.

The document describes one stream entry as XREAD returns it - four string
fields - with a ``oneOf`` branch per event type pinning ``type`` and ``v`` and
pointing ``data`` (JSON text) at the type's schema in ``$defs``
(``contentSchema``). Each ``$defs`` entry is msgspec's schema of the class plus
``x-version``, its current version; ``x-versions`` maps every type to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from cefmp4.domain.events import EVENT_TYPES, Event

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "events.schema.json"

DESCRIPTION = (
    "One entry of the CefMP4 event log (the Redis Stream <prefix>:events), as XREAD returns "
    "its fields: all four are strings. `type` names the event and `v` is its version, per "
    "type; `data` is JSON text, an object whose schema is $defs[type] (the oneOf branch for "
    "the type gives it as contentSchema). Each $defs entry has `x-version`, the version this "
    "schema describes; `x-versions` lists them all. Read an entry whose type is in $defs and "
    "whose v equals x-version with that schema. An entry with a lower v was written by older "
    "code in that version's shape (this file's git history has it); CefMP4 itself upcasts it. "
    "An unknown type or a higher v comes from newer code: skip it, as an older CefMP4 replica "
    "does. Adding an optional member does not bump v, so ignore members you do not know."
)

_ENVELOPE: dict[str, Any] = {
    "type": {"type": "string", "description": "The event type: a key of $defs."},
    "v": {
        "type": "string",
        "pattern": "^[1-9][0-9]*$",
        "description": "The version of that type the entry was written at (decimal).",
    },
    "data": {
        "type": "string",
        "contentMediaType": "application/json",
        "description": "The event as a JSON object; its schema is $defs[type].",
    },
    "replica": {"type": "string", "description": "The process that wrote the entry."},
}


def event_schema(types: Iterable[type[Event]]) -> dict[str, Any]:
    """The JSON Schema of a log entry whose event is one of ``types``."""
    classes = list(types)
    _, components = msgspec.json.schema_components(classes, ref_template="#/$defs/{name}")
    defs = {cls.__name__: {**components[cls.__name__], "x-version": cls.VERSION} for cls in classes}
    defs.update({name: s for name, s in components.items() if name not in defs})
    branches = [
        {
            "title": cls.__name__,
            "properties": {
                "type": {"const": cls.__name__},
                "v": {"const": str(cls.VERSION)},
                "data": {"contentSchema": {"$ref": f"#/$defs/{cls.__name__}"}},
            },
        }
        for cls in classes
    ]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "CefMP4 event log entry",
        "description": DESCRIPTION,
        "type": "object",
        "required": list(_ENVELOPE),
        "properties": _ENVELOPE,
        "oneOf": branches,
        "x-versions": {cls.__name__: cls.VERSION for cls in classes},
        "$defs": defs,
    }


def render(schema: dict[str, Any]) -> str:
    """The file's text: stable, so regenerating an unchanged schema is a no-op."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cefmp4.dev.schema", description="Write the event log's JSON Schema."
    )
    parser.add_argument("path", nargs="?", type=Path, default=SCHEMA_PATH)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render(event_schema(EVENT_TYPES.values()))
    if args.check:
        current = args.path.read_text(encoding="utf-8") if args.path.exists() else ""
        if current != text:
            print(f"{args.path} is stale: run `task schema`", file=sys.stderr)
            return 1
        return 0
    args.path.parent.mkdir(parents=True, exist_ok=True)
    args.path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
