"""Write a root filesystem directory as a one-layer OCI image archive (what `podman load` and `ctr import`
read): an OCI image layout (oci-layout, index.json, blobs/sha256/...) in an uncompressed tar.

    python3 scripts/oci_archive.py --rootfs DIR --ref localhost/caa:0.1.0 --out caa.oci.tar \
        --entrypoint /usr/local/bin/entrypoint.sh --user 65532 --env PATH=... [--env K=V ...]

The layer is reproducible: entries in name order, numeric owners, every mtime set to SOURCE_DATE_EPOCH (or 0),
gzip without a timestamp. Device nodes and the contents of /dev, /proc and /sys are left out (the runtime
provides them). Standard library only, so the build needs nothing beyond Debian's python3.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
import tempfile
from pathlib import Path

RUNTIME_DIRS = ("dev", "proc", "sys")


def _entries(rootfs: Path) -> list[Path]:
    """Every path under rootfs, parents before children, in name order; runtime directories kept empty."""
    out: list[Path] = []
    for top, dirs, files in os.walk(rootfs):
        rel_top = Path(top).relative_to(rootfs)
        if rel_top.parts and rel_top.parts[0] in RUNTIME_DIRS:
            dirs[:] = []
            continue
        dirs.sort()
        for name in sorted(dirs + files):
            out.append(Path(top) / name)
    return sorted(out, key=lambda p: p.relative_to(rootfs).parts)


def write_layer(rootfs: Path, out: io.BufferedIOBase, mtime: int) -> str:
    """The uncompressed tar of rootfs into `out`; returns its sha256 (the layer's diff_id)."""
    digest = hashlib.sha256()

    class Hashing:
        """Passes the tar stream on to `out` and hashes it on the way."""

        def write(self, data: bytes) -> int:
            digest.update(data)
            out.write(data)
            return len(data)

    sink = Hashing()
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for path in _entries(rootfs):
            st = path.lstat()
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
                continue
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(rootfs)))
            info.uname = info.gname = ""
            info.mtime = mtime
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return f"sha256:{digest.hexdigest()}"


def _blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def build(rootfs: Path, ref: str, out: Path, entrypoint: list[str], user: str, env: list[str],
          arch: str = "amd64") -> str:
    """Write the archive; returns the manifest digest."""
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    with tempfile.TemporaryDirectory(prefix="oci-", dir=out.parent) as tmp:
        layout = Path(tmp)
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        layer_tmp = layout / "layer.tar.gz"
        with open(layer_tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            diff_id = write_layer(rootfs, gz, mtime)
        layer_digest = hashlib.sha256()
        with open(layer_tmp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                layer_digest.update(chunk)
        layer_size = layer_tmp.stat().st_size
        layer_tmp.rename(blobs / layer_digest.hexdigest())
        config = {
            "architecture": arch, "os": "linux",
            "config": {"Entrypoint": entrypoint, "Env": env, "User": user, "WorkingDir": "/",
                       "Labels": {"org.opencontainers.image.title": ref}},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": "scripts/build-image.sh"}],
        }
        config_digest, config_size = _blob(blobs, json.dumps(config, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                       "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": f"sha256:{layer_digest.hexdigest()}", "size": layer_size}],
        }
        manifest_digest, manifest_size = _blob(blobs, json.dumps(manifest, sort_keys=True).encode())
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
            "size": manifest_size, "platform": {"architecture": arch, "os": "linux"},
            # podman names the image after ref.name, containerd after its own annotation
            "annotations": {"org.opencontainers.image.ref.name": ref, "io.containerd.image.name": ref}}]}
        (layout / "index.json").write_text(json.dumps(index, sort_keys=True))
        (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            for name in ("oci-layout", "index.json", "blobs"):
                tar.add(layout / name, arcname=name, filter=_normalise(mtime))
        partial.rename(out)
        return manifest_digest


def _normalise(mtime: int):  # type: ignore[no-untyped-def]
    def f(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = mtime
        return info
    return f


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rootfs", required=True, type=Path)
    p.add_argument("--ref", required=True, help="image name, e.g. localhost/caa:0.1.0")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--entrypoint", action="append", default=[])
    p.add_argument("--user", default="")
    p.add_argument("--env", action="append", default=[])
    args = p.parse_args(argv)
    if not args.rootfs.is_dir():
        p.error(f"--rootfs {args.rootfs}: not a directory")
    digest = build(args.rootfs, args.ref, args.out.resolve(), args.entrypoint, args.user, args.env)
    print(f"{args.out}: {args.ref} {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
