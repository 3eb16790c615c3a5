"""The user-data document: a cloud-config with `write_files` only (spec-adaptor §5.6, spec-podvm §2).

The adaptor renders it (`render`, byte for byte upstream's template, so stock pod VM images read it); the
pod VM's caa-process-user-data parses it strictly (`parse`, upstream's yaml.v2 `UnmarshalStrict`) and writes
the files it allows under /run/peerpod.

`render` writes each content as a YAML literal block, so `parse(render(files))` gives back each content with
exactly one final newline (none when empty). Like upstream's template it can only carry text whose first
non-empty line does not start with white space and that holds no YAML line breaks other than '\\n' (no '\\r',
U+0085, U+2028, U+2029) nor YAML-unprintable characters: what CAA writes (Go JSON, base64, TOML) never does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

__all__ = [
    "APF_PATH",
    "AUTH_PATH",
    "CloudConfigError",
    "INITDATA_PATH",
    "PEERPOD_DIR",
    "PEERPOD_FILES",
    "SCRATCH_PATH",
    "WriteFile",
    "parse",
    "render",
]

#: Where the pod VM's files go; caa-process-user-data writes only these names (upstream's allow-list).
PEERPOD_DIR = "/run/peerpod"
PEERPOD_FILES = ("aa.toml", "cdh.toml", "apf.json", "auth.json", "initdata", "scratch-space.marker")
APF_PATH = f"{PEERPOD_DIR}/apf.json"
AUTH_PATH = f"{PEERPOD_DIR}/auth.json"
INITDATA_PATH = f"{PEERPOD_DIR}/initdata"
SCRATCH_PATH = f"{PEERPOD_DIR}/scratch-space.marker"


class CloudConfigError(ValueError):
    """The user data is not the strict cloud-config document; the message says what is wrong."""


@attrs.frozen
class WriteFile:
    """One `write_files` item: an absolute path and its text (empty for a marker file)."""

    path: str
    content: str = ""


def render(files: Sequence[WriteFile]) -> str:
    """The cloud-config text of §5.6, byte for byte (an empty content writes a `path` line only)."""
    lines = ["#cloud-config"]
    if files:
        lines += ["", "write_files:"]
        for f in files:
            lines.append(f"  - path: {f.path}")
            if f.content:
                lines.append("    content: |")
                pieces = f.content.split("\n")
                if pieces and pieces[-1] == "":
                    pieces.pop()
                lines += ["      " + p for p in pieces]
    return "\n".join(lines) + "\n"


def _strict_loader() -> type:
    import yaml  # the pod VM has PyYAML; imported here so the node-side writer does not need it

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if not isinstance(key, str):  # keys of the document are names; `? {a: 1}` would not even hash
                raise yaml.constructor.ConstructorError(None, None, f"mapping key {key!r} is not a string",
                                                        key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return dict(yaml.SafeLoader.construct_mapping(loader, node, deep=deep))

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return StrictLoader


def parse(text: bytes | str) -> list[WriteFile]:
    """Parse the strict `{write_files: [{path, content}]}` document.

    `#cloud-config` is a comment; an empty document gives no files. Any other key at either level, a
    duplicate key or a non-string value is a `CloudConfigError`.
    """
    import yaml

    try:
        doc = yaml.load(text, Loader=_strict_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise CloudConfigError(f"invalid cloud-config YAML: {e}") from None
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise CloudConfigError(f"cloud-config must be a mapping, not {type(doc).__name__}")
    extra = sorted(str(k) for k in doc if k != "write_files")
    if extra:
        raise CloudConfigError(f"cloud-config: unsupported key(s) {', '.join(extra)}")
    items = doc.get("write_files")
    if items is None:
        return []
    if not isinstance(items, list):
        raise CloudConfigError("cloud-config: write_files must be a list")
    files: list[WriteFile] = []
    for i, item in enumerate(items):
        if item is None:
            item = {}
        if not isinstance(item, dict):
            raise CloudConfigError(f"cloud-config: write_files[{i}] must be a mapping")
        extra = sorted(str(k) for k in item if k not in ("path", "content"))
        if extra:
            raise CloudConfigError(f"cloud-config: write_files[{i}]: unsupported key(s) {', '.join(extra)}")
        path, content = item.get("path", ""), item.get("content", "")
        path = "" if path is None else path
        content = "" if content is None else content
        if not isinstance(path, str) or not isinstance(content, str):
            raise CloudConfigError(f"cloud-config: write_files[{i}]: path and content must be strings")
        files.append(WriteFile(path, content))
    return files
