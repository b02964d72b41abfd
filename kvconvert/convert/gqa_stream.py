"""Write a converted checkpoint tensor by tensor: read one source tensor, convert it, hand it to the writer.

Peak memory is about one output shard (what `ShardedWriter` holds) plus the tensor being converted,
whatever the model size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..io import ModelSource, ShardedWriter


def iter_source_tensors(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in checkpoint order, loading one tensor at a time from safetensors shards."""
    reader = source.reader()
    if reader.format != "safetensors":
        yield from reader.iter_tensors()
        return
    from safetensors import safe_open

    for f, names in reader.names_by_file().items():
        with safe_open(str(f), framework="pt") as sf:
            for name in names:
                yield name, sf.get_tensor(name)


def write_converted(source: ModelSource, folder: Path, convert: Callable[[str, torch.Tensor], torch.Tensor],
                    max_shard_bytes: int, progress: bool = True, desc: str = "writing") -> dict:
    """Stream every tensor of `source` through `convert(name, tensor)` into sharded safetensors in `folder`.

    Returns {"files": [...], "bytes_written": n, "tensors": n}.
    """
    shapes = source.reader().shapes()
    writer = ShardedWriter(folder, max_shard_bytes, metadata={"kvconvert": "mha_to_gqa"})
    count = 0
    for name, tensor in tqdm(iter_source_tensors(source), total=len(shapes), desc=desc, disable=not progress,
                             leave=False):
        writer.add(name, convert(name, tensor))
        count += 1
    files = writer.finish()
    return {"files": [f.name for f in files], "bytes_written": writer.total_bytes, "tensors": count}
