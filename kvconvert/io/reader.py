"""Stream a checkpoint's tensors shard by shard, never holding more than one shard."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import UserError
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
                return check_finite(name, sf.get_tensor(name), f)
        if self._pickled is None or self._pickled[0] != f:  # a pickle shard is parsed whole: keep the last one
            self._pickled = (f, _load_pickle(f))
        return check_finite(name, self._pickled[1][name], f)


def check_finite(name: str, t: torch.Tensor, path: Path | None = None) -> torch.Tensor:
    """`t` itself; `UserError` if a floating-point tensor holds NaN or Inf (a damaged checkpoint)."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        where = f" in {path.name}" if path is not None else ""
        raise UserError(f"tensor '{name}'{where} holds {bad} values: the checkpoint is damaged; re-download it or "
                        "re-export it from the training run")
    return t


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        first = f"it references {found[1]}" if found else "it needs code to be rebuilt"
        raise UserError(f"{path} cannot be loaded safely: it holds more than tensors ({first}); if you trust "
                        "where it came from, convert it to safetensors in a sandbox, e.g. python -c \"import torch; "
                        "from safetensors.torch import save_file; sd = torch.load('" + path.name + "', "
                        "weights_only=False); save_file({k: v.contiguous() for k, v in sd.items() "
                        "if isinstance(v, torch.Tensor)}, 'model.safetensors')\"") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise UserError(f"corrupt pickle file {path} ({first}); re-download it or convert the model to "
                        "safetensors") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise UserError(f"{path} is not a state dict (a mapping of names to tensors); convert the model to "
                        "safetensors")
    return data
