"""Stream a checkpoint's tensors shard by shard, never holding more than one shard."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from .safetensors_check import read_header


class CheckpointReader:
    def __init__(self, root: Path, files: list[Path], fmt: str = "safetensors"):
        self.root = root
        self.files = files
        self.format = fmt
        self._index: dict[str, Path] | None = None
        self._pickled: tuple[Path, dict[str, torch.Tensor]] | None = None

    def names_by_file(self) -> dict[Path, list[str]]:
        if self.format != "safetensors":
            return {f: list(_load_pickle(f)) for f in self.files}
        return {f: [k for k in read_header(f) if k != "__metadata__"] for f in self.files}

    def shapes(self) -> dict[str, tuple[list[int], str]]:
        out: dict[str, tuple[list[int], str]] = {}
        if self.format != "safetensors":
            for f in self.files:
                out.update({k: (list(v.shape), str(v.dtype)) for k, v in _load_pickle(f).items()})
            return out
        for f in self.files:
            out.update({k: (v["shape"], v["dtype"]) for k, v in read_header(f).items() if k != "__metadata__"})
        return out

    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape, _ in self.shapes().values())

    def iter_shards(self) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
        """Yield (file, {name: tensor}) one shard at a time (tensors are memory-mapped when possible)."""
        for f in self.files:
            if self.format == "safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="pt") as sf:
                    yield f, {k: sf.get_tensor(k) for k in sf.keys()}
            else:
                yield f, _load_pickle(f)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for _, tensors in self.iter_shards():
            yield from tensors.items()

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from the shard that holds it (the name -> shard index is built once)."""
        if self._index is None:
            self._index = {n: f for f, names in self.names_by_file().items() for n in names}
        f = self._index[name]
        if self.format == "safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                return sf.get_tensor(name)
        if self._pickled is None or self._pickled[0] != f:  # a pickle shard is parsed whole: keep the last one
            self._pickled = (f, _load_pickle(f))
        return self._pickled[1][name]


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
