"""Build the krew archive (the shim and its README) reproducibly, and print its sha256.

    python plugins/krew/build_archive.py dist/kubectl-backfill-krew.tar.gz

The same bytes every time (fixed mtimes, owners and gzip header), so the ``sha256`` in
``plugins/krew/backfill.yaml`` can be checked against the repository (tests/test_krew_plugin.py)
and the archive attached to a release under the name its ``uri`` gives.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = ("kubectl-backfill", "README.md")


def archive_bytes() -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name in FILES:
            content = (HERE / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(content), 0, 0o755 if name == "kubectl-backfill" else 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            archive.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue(), mtime=0)


def sha256() -> str:
    return hashlib.sha256(archive_bytes()).hexdigest()


if __name__ == "__main__":
    destination = Path(sys.argv[1] if len(sys.argv) > 1 else "dist/kubectl-backfill-krew.tar.gz")
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(archive_bytes())
    print(f"{destination} sha256 {sha256()}")
