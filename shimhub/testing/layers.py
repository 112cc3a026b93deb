"""Building layer tars in memory for tests."""

from __future__ import annotations

import io
import tarfile


def tar(*entries: tuple) -> bytes:
    """A tar of (name, kind, data) entries; kind is file, dir, symlink, hardlink, chardev, blockdev or fifo.

    For file, data is the content (str or bytes); for symlink and hardlink, the target;
    an optional fourth item is a dict of TarInfo attributes (mode, uid, pax_headers, …).
    """
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            name, kind, data = entry[:3]
            extra = entry[3] if len(entry) > 3 else {}
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            info.mode = 0o755 if kind == "dir" else 0o644
            payload = None
            if kind == "file":
                payload = data if isinstance(data, bytes) else data.encode()
                info.size = len(payload)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, data
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, data
            elif kind in ("chardev", "blockdev"):
                info.type = tarfile.CHRTYPE if kind == "chardev" else tarfile.BLKTYPE
                info.devmajor, info.devminor = data
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            for key, value in extra.items():
                setattr(info, key, value)
            archive.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return out.getvalue()
