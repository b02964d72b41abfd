"""Content hashes of checkpoint folders, cached by (path, size, mtime) outside the checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 8 * 2**20


def cache_dir() -> Path:
    root = os.environ.get("KVCONVERT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvconvert"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_dir() / "hashes" / key
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest)
    return digest


def folder_sha256(files: list[Path], root: Path) -> str:
    """sha256 over (relative name, file sha256) of `files`, order-independent."""
    entries = sorted((str(p.relative_to(root)), file_sha256(p)) for p in files)
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()
