"""initdata in the pod VM: decode `/run/peerpod/initdata`, write its digest and the guest configs it carries.

The document format, its decoding and digest are `caa.podvm_api.initdata` (shared with the adaptor, which
encodes it); this module is upstream's `extractInitdataAndHash`: which files it may write, and the default
document written when the user data brought none.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.logger import Logger

from caa.podvm_api.initdata import Initdata, InitdataError, decode, encode, parse

__all__ = ["DUMMY_TOML", "INITDATA_FILES", "InitdataError", "process", "write_file"]

#: The only names initdata may write (relative to the output directory).
INITDATA_FILES = ("aa.toml", "cdh.toml", "policy.rego")
#: Written when no initdata came with the user data: it yields an empty aa.toml, which starts the
#: attestation agent (byte-exact with upstream, whose digest is adb48cc1...478d).
DUMMY_TOML = b'algorithm = "sha256"\nversion = "0.1.0"\n\n[data]\n"aa.toml" = \'\'\'\n\'\'\''

_log = Logger(namespace="caa.forwarder.initdata")


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
        write_file(source, encode(toml).encode("ascii"))
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
