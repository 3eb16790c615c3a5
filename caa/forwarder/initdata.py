"""initdata: decode `/run/peerpod/initdata`, compute its digest exactly as upstream, extract the guest configs.

Format (spec-podvm §2.4): base64 (standard alphabet; line breaks ignored) of gzip of a TOML document

    algorithm = "sha384"      # sha256 | sha384 | sha512
    version = "0.1.0"
    [data]
    "aa.toml" = '''...'''     # all values are strings
    "cdh.toml" = '''...'''
    "policy.rego" = '''...'''

The digest is the lowercase hex of `algorithm` over the decompressed TOML bytes exactly as received. Older
adaptors sent base64 of the TOML without gzip; that is accepted too (told apart by the gzip magic).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import os
import tomllib
import zlib
from pathlib import Path

import attr
from twisted.logger import Logger

__all__ = [
    "InitdataError",
    "Initdata",
    "ALGORITHMS",
    "INITDATA_FILES",
    "DUMMY_TOML",
    "decode",
    "encode",
    "parse",
    "process",
]

ALGORITHMS = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}
#: The only names initdata may write (relative to the output directory).
INITDATA_FILES = ("aa.toml", "cdh.toml", "policy.rego")
#: Written when no initdata came with the user data: it yields an empty aa.toml, which starts the
#: attestation agent (byte-exact with upstream, whose digest is adb48cc1...478d).
DUMMY_TOML = b'algorithm = "sha256"\nversion = "0.1.0"\n\n[data]\n"aa.toml" = \'\'\'\n\'\'\''

_log = Logger(namespace="caa.forwarder.initdata")


class InitdataError(ValueError):
    """The initdata document is malformed; the message says which step failed."""


@attr.frozen
class Initdata:
    algorithm: str
    version: str
    data: dict[str, str]
    toml: bytes
    digest: str


def decode(text: bytes | str) -> bytes:
    """base64 (line breaks ignored) -> gunzip (multi-member) -> the TOML bytes."""
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    raw = raw.replace(b"\r", b"").replace(b"\n", b"")  # like Go: only line breaks ignored
    try:
        blob = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InitdataError(f"initdata is not valid base64: {e}") from None
    if blob[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as e:
            raise InitdataError(f"initdata is not valid gzip: {e}") from None
    return blob


def encode(toml: bytes) -> bytes:
    """The inverse of `decode`: base64 of gzip (what the adaptor sends)."""
    return base64.b64encode(gzip.compress(toml, mtime=0))


def parse(toml: bytes) -> Initdata:
    """Parse and validate the TOML document; compute the digest over `toml` as given."""
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


def write_file(path: Path, content: bytes, mode: int = 0o644) -> None:
    """Write `content` to `path` atomically (temporary file, rename) with exactly `mode`."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, content)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def process(output_dir: str | os.PathLike[str]) -> Initdata:
    """Upstream's `extractInitdataAndHash` on `output_dir` (normally /run/peerpod).

    Reads `initdata` (writing the dummy one when absent), writes the allowed `[data]` entries and
    `initdata.digest` (no newline). Keys other than aa.toml, cdh.toml, policy.rego (after normalising the
    path) are skipped with a log line. Raises `InitdataError`.
    """
    out = Path(output_dir)
    source = out / "initdata"
    if source.exists():
        toml = decode(source.read_bytes())
    else:
        _log.info("no initdata: writing the default one")
        toml = DUMMY_TOML
        write_file(source, encode(toml))
    init = parse(toml)
    allowed = {os.path.normpath(out / n) for n in INITDATA_FILES}
    for key, value in init.data.items():
        target = os.path.normpath(out / key)
        if target not in allowed:
            _log.warn("initdata: {key!r} is not an allowed file; skipped", key=key)
            continue
        write_file(Path(target), value.encode("utf-8"))
    write_file(out / "initdata.digest", init.digest.encode("ascii"))
    _log.info("initdata: {algorithm} digest {digest}", algorithm=init.algorithm, digest=init.digest)
    return init
