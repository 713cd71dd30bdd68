"""Writing a config document as TOML, for a dispatcher started as a subprocess.

Just the subset a dispatcher config needs: scalars, lists, tables, arrays of tables, and inline
tables inside those (``batch = { ... }``, ``filter = { "data.x" = [...] }``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["to_toml", "write_toml"]


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def _toml_value(value: object) -> str:
    if isinstance(value, Mapping):  # an inline table: batch = { max_events = 100, ... }
        pairs = (f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(pairs) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _is_table_array(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def to_toml(doc: Mapping[str, Any]) -> str:
    """The document as TOML text: top-level keys, then tables, then arrays of tables."""
    lines = [
        f"{_toml_key(k)} = {_toml_value(v)}"
        for k, v in doc.items()
        if not isinstance(v, Mapping) and not _is_table_array(v)
    ]
    for key, value in doc.items():
        if isinstance(value, Mapping):
            lines += ["", f"[{key}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()]
    for key, value in doc.items():
        if _is_table_array(value):
            for table in value:
                lines += ["", f"[[{key}]]"]
                lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def write_toml(path: Any, doc: Mapping[str, Any]) -> str:
    """Write the document as TOML to ``path``; returns the path as a string."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(to_toml(doc))
    return str(path)
