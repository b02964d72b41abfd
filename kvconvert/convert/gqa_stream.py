"""Write a converted checkpoint tensor by tensor: read one source tensor, convert it, hand it to the writer.

Tensors the conversion leaves alone are not decoded at all: their bytes are copied file to file
(`ShardedWriter.add_slice`), and a new output shard starts with each source shard (split further only where
it exceeds the shard size), so every copy keeps its source page offset. Peak memory is about one output shard
of converted tensors plus the tensor being converted, whatever the model size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..io import ModelSource, ShardedWriter
from ..io.reader import check_finite
from ..io.safetensors_check import read_header
from ..io.writer import FileSlice
from ..models.expected_tensors import check_tensors

_CHECKED: set[str] = set()


def check_source_weights(source: ModelSource) -> None:
    """`UserError` (before anything is written) unless `source` holds every tensor its architecture needs,
    with the shapes its config.json implies (headers only; once per config and set of headers)."""
    import hashlib
    import json

    config, shapes = source.config_dict(), source.reader().shapes()
    key = hashlib.sha256(json.dumps([config, sorted(shapes.items())], sort_keys=True, default=str).encode()).hexdigest()
    if key in _CHECKED:
        return
    check_tensors(config, shapes, source.spec, source.trust_remote_code)
    _CHECKED.add(key)


def iter_source_tensors(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in checkpoint order, loading one tensor at a time from safetensors shards (NaN/Inf
    refused)."""
    reader = source.reader()
    if reader.format != "safetensors":
        for f, tensors in reader.iter_shards():
            for name, t in tensors.items():
                yield name, check_finite(name, t, f)
        return
    from safetensors import safe_open

    for f, names in reader.names_by_file().items():
        with safe_open(str(f), framework="pt") as sf:
            for name in names:
                yield name, check_finite(name, sf.get_tensor(name), f)


def write_converted(source: ModelSource, folder: Path, convert: Callable[[str, torch.Tensor], torch.Tensor],
                    max_shard_bytes: int, progress: bool = True, desc: str = "writing",
                    changes: Callable[[str], bool] | None = None) -> dict:
    """Stream every tensor of `source` through `convert(name, tensor)` into sharded safetensors in `folder`.

    `changes(name)` says which tensors `convert` may change (None: all); the others are copied as bytes.
    Every tensor the architecture needs must be present with its expected shape (`check_source_weights`);
    decoded tensors holding NaN/Inf are refused. Returns {"files": [...], "bytes_written": n, "tensors": n}.
    """
    check_source_weights(source)
    reader = source.reader()
    writer = ShardedWriter(folder, max_shard_bytes, metadata={"kvconvert": "mha_to_gqa"})
    bar = tqdm(total=len(reader.shapes()), desc=desc, disable=not progress, leave=False)
    count = 0
    if reader.format == "safetensors" and changes is not None:
        from safetensors import safe_open

        for f in reader.files:
            writer.flush()  # output shards follow the source's, so each copies from one file, page-aligned
            header = read_header(f)
            with open(f, "rb") as fh:
                data_start = 8 + int.from_bytes(fh.read(8), "little")
            in_file_order = sorted((n for n in header if n != "__metadata__"),
                                   key=lambda n: header[n]["data_offsets"][0])
            with safe_open(str(f), framework="pt") as sf:
                for name in in_file_order:  # sequential reads; adjacent unchanged tensors copy as one range
                    if changes(name):
                        writer.add(name, convert(name, check_finite(name, sf.get_tensor(name), f)))
                    else:
                        info = header[name]
                        start, stop = info["data_offsets"]
                        writer.add_slice(name, FileSlice(f, data_start + start, stop - start, info["dtype"],
                                                         info["shape"]))
                    count += 1
                    bar.update()
    else:
        for name, tensor in iter_source_tensors(source):
            writer.add(name, convert(name, tensor))
            count += 1
            bar.update()
    bar.close()
    files = writer.finish()
    return {"files": [f.name for f in files], "bytes_written": writer.total_bytes, "tensors": count}
