"""Cheap structural validation of safetensors files (header parse + layout check), no tensor reads.

The checks are the ones the `safetensors` library makes when it opens a file, so a file that passes here
opens there: a JSON object header, known dtypes, non-negative integer shapes, byte ranges that match the
shapes and tile the data section exactly, string-to-string `__metadata__`.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from ..errors import UserError

DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER = 100 * 2**20


def _count(x: Any) -> bool:
    return type(x) is int and x >= 0


def _check_tensor(name: str, info: Any) -> tuple[int, int]:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ValueError(f"tensor '{name}' needs dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_SIZE:
        raise ValueError(f"tensor '{name}' has the unknown dtype {dtype!r} (known: {', '.join(DTYPE_SIZE)})")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise ValueError(f"tensor '{name}' has the shape {shape!r}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise ValueError(f"tensor '{name}' has data_offsets {offsets!r}, not [start, end] with start <= end")
    start, stop = offsets
    expect = math.prod(shape) * DTYPE_SIZE[dtype]
    if stop - start != expect:
        raise ValueError(f"tensor '{name}' has {stop - start} bytes, its shape {shape} of {dtype} needs {expect}")
    return start, stop


def read_header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header of `path`; `UserError` if the file is truncated or corrupt."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > MAX_HEADER:
                raise ValueError("header length points past the end of the file")
            text = f.read(n)
        if not text.lstrip(b" ").startswith(b"{"):
            raise ValueError("the header is not a JSON object")
        header = json.loads(text.decode("utf-8"), parse_constant=_no_constant)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        meta = header.get("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("__metadata__ must map strings to strings")
        ranges = sorted(_check_tensor(name, info) for name, info in header.items() if name != "__metadata__")
        end = 0
        for start, stop in ranges:
            if start != end:
                raise ValueError(f"tensor data is not contiguous (a tensor starts at byte {start}, expected {end})")
            end = stop
        if 8 + n + end != size:
            what = "truncated" if 8 + n + end > size else "longer than its tensors"
            raise ValueError(f"file is {what} ({size} bytes, header and tensors need {8 + n + end})")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"corrupt safetensors file {path}: {exc}; re-download or re-export it") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    return header


def _no_constant(name: str) -> Any:
    raise ValueError(f"the header holds {name}, which is not JSON")


def tensor_shapes(path: Path) -> dict[str, tuple[list[int], str]]:
    return {k: (v["shape"], v["dtype"]) for k, v in read_header(path).items() if k != "__metadata__"}
