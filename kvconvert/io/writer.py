"""Sharded safetensors writer: holds at most one shard of new tensors in memory, writes an HF index."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .json_file import write_json  # noqa: F401 - re-exported for the passes that write config.json
from .sources import SIDE_FILES, code_files

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB", the passes' default max_shard_size
PAGE = 4096
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "B": 1}


def parse_size(text: str | int) -> int:
    """'5GB' (5 * 10**9), '500MB', '2GiB' (2 * 2**30) or a byte count -> bytes.

    Decimal and binary units as transformers' `save_pretrained(max_shard_size=...)` reads them, so one string
    means one size whichever writer gets it (pass the int to `save_pretrained`: huggingface_hub knows no GiB).
    """
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * SIZE_UNITS[unit])
    return int(s)


_ST_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


@dataclass(frozen=True)
class FileSlice:
    """A tensor's bytes inside an existing safetensors file, copied to the output without being decoded."""

    path: Path
    offset: int
    nbytes: int
    dtype: str
    shape: list[int]


class ShardedWriter:
    """`add()` tensors (or `add_slice()` unchanged ones) in checkpoint order, then `finish()`.

    Shards are named `model-0000i-of-0000N.safetensors` (or `model.safetensors` when one suffices) with a
    `model.safetensors.index.json` weight map, as transformers expects. Only added tensors are held in
    memory (at most one shard's worth); slices are copied file to file by the kernel (`os.copy_file_range`).
    """

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, metadata: dict | None = None):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor | FileSlice] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().contiguous()
        self._append(name, tensor, tensor.numel() * tensor.element_size())

    def add_slice(self, name: str, piece: FileSlice) -> None:
        self._append(name, piece, piece.nbytes)

    def _append(self, name: str, item: torch.Tensor | FileSlice, nbytes: int) -> None:
        if name in self._names:
            raise ValueError(f"tensor '{name}' written twice")
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._names.add(name)
        self._pending[name] = item
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        """End the current shard now (nothing happens when it is empty)."""
        if not self._pending:
            return
        path = self.folder / f"shard-{len(self._written):05d}.tmp"
        _write_safetensors(path, self._pending, self.metadata)
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        self.flush()
        n = len(self._written)
        if n == 1:
            final = self.folder / "model.safetensors"
            self._written[0][0].rename(final)
            return [final]
        weight_map, finals = {}, []
        for i, (path, names) in enumerate(self._written):
            final = self.folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            finals.append(final)
            weight_map.update({k: final.name for k in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return finals


def _write_safetensors(path: Path, items: dict[str, torch.Tensor | FileSlice], metadata: dict[str, str]) -> None:
    """The safetensors format: u64 header length, JSON header (space-padded to 8 bytes), then the data."""
    header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    offset = 0
    for name, item in items.items():
        if isinstance(item, FileSlice):
            dtype, shape, nbytes = item.dtype, list(item.shape), item.nbytes
        else:
            dtype, shape, nbytes = _ST_DTYPE[item.dtype], list(item.shape), item.numel() * item.element_size()
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((_page_residue(items, header) - 8 - len(raw)) % PAGE)
    with open(path, "wb", buffering=0) as out:
        _write_all(out, struct.pack("<Q", len(raw)) + raw)
        for item in _coalesced(items.values()):
            if isinstance(item, FileSlice):
                _copy_range(item.path, item.offset, item.nbytes, out)
            elif item.numel():
                _write_all(out, memoryview(item.reshape(-1).view(torch.uint8).numpy()))


def _coalesced(items) -> Iterator[torch.Tensor | FileSlice]:
    """The items in order, with runs of slices adjacent in the same source file merged into one copy."""
    run: FileSlice | None = None
    for item in items:
        if isinstance(item, FileSlice) and run is not None and item.path == run.path \
                and item.offset == run.offset + run.nbytes:
            run = FileSlice(run.path, run.offset, run.nbytes + item.nbytes, "U8", [run.nbytes + item.nbytes])
            continue
        if run is not None:
            yield run
        run = item if isinstance(item, FileSlice) else None
        if run is None:
            yield item
    if run is not None:
        yield run


def _page_residue(items: dict[str, torch.Tensor | FileSlice], header: dict) -> int:
    """Where the data section should start, modulo a page, so copied slices keep their source page offset.

    The kernel copies a range whose source and destination offsets differ by whole pages about twice as fast
    as a misaligned one. Tensor sizes are mostly whole pages, so one header padding (spaces, as the format
    allows) aligns nearly every slice; the residue chosen is the one most copied bytes ask for (8-aligned).
    """
    votes: dict[int, int] = {}
    for name, item in items.items():
        if isinstance(item, FileSlice):
            residue = (item.offset - header[name]["data_offsets"][0]) % PAGE
            votes[residue] = votes.get(residue, 0) + item.nbytes
    best = max(votes, key=votes.__getitem__) if votes else 0
    return best - best % 8


def _write_all(out, data) -> None:
    """Unbuffered writes may be partial (Linux caps one write at ~2 GiB)."""
    view = memoryview(data).cast("B")
    while view:
        n = out.write(view)
        view = view[n:]


def _copy_range(src: Path, offset: int, nbytes: int, out) -> None:
    with open(src, "rb") as f:
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < nbytes:
                    n = os.copy_file_range(f.fileno(), out.fileno(), nbytes - done, offset + done)
                    if n == 0:
                        raise OSError(f"{src} ended early")
                    done += n
                return
            except OSError:
                pass  # e.g. across file systems that refuse it: copy the rest through user space
        f.seek(offset + done)
        while done < nbytes:
            chunk = f.read(min(64 * 2**20, nbytes - done))
            if not chunk:
                raise OSError(f"{src} ended early")
            _write_all(out, chunk)
            done += len(chunk)


def copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy config, generation config and tokenizer files (not weights) from `src` to `dst`, and the Python
    modules their `auto_map` names (copied, never run), so the output loads with --trust-remote-code as the
    input did."""
    for name in SIDE_FILES:
        if name in skip:
            continue
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, Path(dst) / name)
    for f in code_files(Path(src)):
        rel = f.relative_to(Path(src))
        (Path(dst) / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, Path(dst) / rel)
