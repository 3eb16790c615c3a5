"""initdata: the pod's guest configuration document, sent by the adaptor and measured by the pod VM.

Format (spec-podvm §2.4): base64 (standard alphabet, padded; line breaks ignored) of gzip of a TOML document

    algorithm = "sha384"      # sha256 | sha384 | sha512
    version = "0.1.0"
    [data]
    "aa.toml" = '''...'''     # all values are strings
    "cdh.toml" = '''...'''
    "policy.rego" = '''...'''

The digest is the lowercase hex of `algorithm` over the decompressed TOML bytes exactly as received. Older
adaptors sent base64 of the TOML without gzip; `decode` accepts that too (told apart by the gzip magic).
The adaptor uses `encode` (the pod annotation) and `validate` (its --initdata flag); the pod VM `decode`
and `parse`.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import tomllib
import zlib
from collections.abc import Callable
from typing import Any

import attrs

__all__ = ["ALGORITHMS", "Initdata", "InitdataError", "decode", "encode", "parse", "validate"]

ALGORITHMS: dict[str, Callable[..., Any]] = {
    "sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512,
}
_GZIP_MAGIC = b"\x1f\x8b"


class InitdataError(ValueError):
    """The initdata document is malformed; the message says which step failed."""


@attrs.frozen
class Initdata:
    """A parsed initdata document: `toml` is the bytes the digest covers."""

    algorithm: str
    version: str
    data: dict[str, str]
    toml: bytes
    digest: str


def encode(toml: bytes | str) -> str:
    """base64 of gzip of the TOML, what the adaptor sends (mtime 0, so equal documents encode equally)."""
    raw = toml.encode("utf-8") if isinstance(toml, str) else toml
    return base64.b64encode(gzip.compress(raw, mtime=0)).decode("ascii")


def decode(text: bytes | str) -> bytes:
    """base64 (line breaks ignored) -> gunzip (multi-member) when gzip -> the TOML bytes."""
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    raw = raw.replace(b"\r", b"").replace(b"\n", b"")  # like Go's base64 decoder: only line breaks ignored
    try:
        blob = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InitdataError(f"initdata is not valid base64: {e}") from None
    if blob[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as e:
            raise InitdataError(f"initdata is not valid gzip: {e}") from None
    return blob


def parse(toml: bytes) -> Initdata:
    """Parse and check the TOML document; the digest is computed over `toml` as given."""
    try:
        doc = tomllib.loads(toml.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InitdataError(f"initdata is not valid TOML: {e}") from None
    algorithm = doc.get("algorithm")
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise InitdataError(f"initdata: unsupported algorithm {algorithm!r} (sha256, sha384 or sha512)")
    version = doc.get("version", "")
    if not isinstance(version, str):
        raise InitdataError(f"initdata: version must be a string, not {type(version).__name__}")
    data = doc.get("data", {})
    if not isinstance(data, dict):
        raise InitdataError("initdata: [data] must be a table")
    for k, v in data.items():
        if not isinstance(v, str):
            raise InitdataError(f"initdata: data value {k!r} must be a string, not {type(v).__name__}")
    digest = ALGORITHMS[algorithm](toml).hexdigest()
    return Initdata(algorithm=algorithm, version=version, data=dict(data), toml=toml, digest=digest)


def validate(text: str) -> Initdata:
    """Check an encoded document as the adaptor's --initdata flag requires (a version is mandatory)."""
    init = parse(decode(text.strip()))
    if not init.version:
        raise InitdataError("initdata has no version string")
    return init
