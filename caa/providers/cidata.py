"""NoCloud `cidata` ISO 9660 image holding the user data, built in memory with pycdlib (spec-providers §2.5)."""

from __future__ import annotations

import io

import pycdlib


def build_cidata_iso(user_data: bytes, hostname: str, vendor_data: bytes = b"") -> bytes:
    """
    An ISO with volume label `cidata` and the files `user-data`, `meta-data` (`local-hostname: <name>`)
    and `vendor-data`. Interchange level 4 keeps the lower-case, dashed names that cloud-init and
    caa-process-user-data look for.
    """
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=4, vol_ident="cidata", sys_ident="LINUX")
    files = (
        ("user-data", user_data),
        ("meta-data", f"local-hostname: {hostname}\n".encode()),
        ("vendor-data", vendor_data),
    )
    for name, data in files:
        iso.add_fp(io.BytesIO(data), len(data), "/" + name)
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def read_cidata_iso(image: bytes) -> dict[str, bytes]:
    """The files of a cidata ISO by name (for tests and tools)."""
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    files: dict[str, bytes] = {}
    try:
        for child in iso.list_children(iso_path="/"):
            name = child.file_identifier().decode()
            if name in (".", "..") or child.is_dir():
                continue
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, iso_path="/" + name)
            files[name.split(";")[0]] = out.getvalue()
    finally:
        iso.close()
    return files
