"""Go `encoding/json` rules in Python: what Go writes (`dumps`) and how Go matches object keys (`fold_keys`).

Upstream's daemons are Go programs; files both sides read (apf.json, the cloud_volumes annotation) must be
byte for byte what Go's `json.Marshal` / `json.MarshalIndent(v, "", "    ")` writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["dumps", "fold_keys"]

# Go's encoder is HTML-safe by default and escapes the two JavaScript line separators; Python writes
# all five raw with ensure_ascii=False. Inside a JSON text these characters only occur within strings,
# so replacing them in the output is exact.
_GO_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                             "\u2028": "\\u2028", "\u2029": "\\u2029"})


def dumps(obj: Any, indent: int | None = None) -> str:
    """`obj` as Go writes it: compact (`json.Marshal`) or with `indent` spaces (`json.MarshalIndent`).

    Keys keep the mapping's order (a Go struct's field order); raw UTF-8, HTML characters escaped.
    """
    if indent is None:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    else:
        text = json.dumps(obj, indent=indent, ensure_ascii=False)
    return text.translate(_GO_ESCAPES)


def fold_keys(doc: Mapping[Any, Any]) -> dict[str, Any]:
    """The object's string keys lower-cased, as Go matches them to struct fields (case-insensitively).

    Where two keys fold together, the one already lower-case wins; non-string keys are dropped.
    """
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if not isinstance(key, str):
            continue
        if key.lower() not in out or key == key.lower():
            out[key.lower()] = value
    return out
