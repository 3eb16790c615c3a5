"""Generate caa/proto/ from protos/ with grpcio-tools (`make protos`).

protoc writes top-level imports (`import oci_pb2`, `from google.rpc import status_pb2`); they are rewritten to
absolute imports inside `caa.proto`, except for the well-known types that the protobuf runtime ships.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "caa" / "proto"


def proto_files() -> list[Path]:
    return sorted(p.relative_to(PROTOS) for p in PROTOS.rglob("*.proto"))


def _rewrite(text: str, local_modules: set[str]) -> str:
    def plain(m: re.Match[str]) -> str:
        mod = m.group(1)
        return f"from caa.proto import {mod} as {m.group(2)}" if mod in local_modules else m.group(0)

    def dotted(m: re.Match[str]) -> str:
        pkg, mod = m.group(1), m.group(2)
        if f"{pkg}.{mod}" in local_modules:
            return f"from caa.proto.{pkg} import {mod}"
        return m.group(0)

    text = re.sub(r"^import (\w+_pb2) as (\w+)$", plain, text, flags=re.M)
    text = re.sub(r"^from ([\w.]+) import (\w+_pb2)(?= as |$)", dotted, text, flags=re.M)
    return text


def generate(out: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # type: ignore[import-untyped]

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p) for p in proto_files()]
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}", *files]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    local = {str(p.with_suffix("")).replace("/", ".") + "_pb2" for p in proto_files()}
    written = []
    for path in sorted(out.rglob("*_pb2.py*")):
        path.write_text(_rewrite(path.read_text(), local))
        written.append(path)
    for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        init = d / "__init__.py"
        if not init.exists():
            init.write_text("")
    return written


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for old in OUT.rglob("*_pb2.py*"):
            old.unlink()
        shutil.copytree(tmp, OUT, dirs_exist_ok=True)
    (OUT / "__init__.py").write_text('"""Python modules generated from protos/ by `make protos`; do not edit."""\n')
    print(f"generated {len(proto_files())} protos into {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
