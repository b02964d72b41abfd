"""Content hashes of checkpoint files and folders, memoised by (path, size, mtime) outside the checkpoint.

Content hashes are BLAKE3 (about 3x the speed of SHA-256 on one core), on one thread, so hashing a source in a
thread beside a streaming conversion leaves the other core to the conversion's own copy; `file_sha256` stays for
digests users check with `sha256sum` (engine plans).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Callable
from pathlib import Path

WINDOW = 64 * 2**20
CONTENT_HASH = "blake3"


def cache_dir() -> Path:
    root = os.environ.get("KVCONVERT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvconvert"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _blake3(path: Path) -> str:
    import blake3

    h = blake3.blake3()
    size = path.stat().st_size
    with open(path, "rb") as f:  # mapped a window at a time: no copy into Python, RSS bounded by one window
        for offset in range(0, size, WINDOW):
            n = min(WINDOW, size - offset)
            with _map(f, offset, n) as window:
                h.update(window)
    return h.hexdigest()


def _map(f, offset: int, n: int) -> mmap.mmap:
    """A read-only map of n bytes at offset, prefaulted in one call where the OS can (Linux MAP_POPULATE)."""
    if hasattr(mmap, "MAP_POPULATE"):
        return mmap.mmap(f.fileno(), n, offset=offset, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                         prot=mmap.PROT_READ)
    return mmap.mmap(f.fileno(), n, offset=offset, access=mmap.ACCESS_READ)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_ALGORITHMS: dict[str, Callable[[Path], str]] = {"blake3": _blake3, "sha256": _sha256}


def _memoised(path: Path, algorithm: str) -> str:
    st = path.stat()
    key = hashlib.sha256(f"{algorithm}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_dir() / "hashes" / key
    if memo.exists():
        return memo.read_text().strip()
    digest = _ALGORITHMS[algorithm](path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest)
    return digest


def file_hash(path: Path) -> str:
    """Hex BLAKE3 content hash of one file."""
    return _memoised(Path(path), CONTENT_HASH)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of one file (for digests checked with standard tools)."""
    return _memoised(Path(path), "sha256")


def folder_hash(files: list[Path], root: Path) -> str:
    """Hex BLAKE3 over (relative name, file hash) of `files`, order-independent."""
    import blake3

    entries = sorted((str(p.relative_to(root)), file_hash(p)) for p in files)
    return blake3.blake3(json.dumps(entries).encode()).hexdigest()
