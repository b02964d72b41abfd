"""Cheap structural validation of safetensors files (header parse + size check), no tensor reads."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from ..errors import UserError

_DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def read_header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header of `path`; `UserError` if the file is truncated or corrupt."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100 * 2**20:
                raise ValueError("header length points past the end of the file")
            header = json.loads(f.read(n))
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, stop = info["data_offsets"]
            expect = math.prod(info["shape"]) * _DTYPE_SIZE.get(info["dtype"], 1)
            if stop - start != expect:
                raise ValueError(f"tensor '{name}' has {stop - start} bytes, its shape needs {expect}")
            end = max(end, stop)
        if 8 + n + end > size:
            raise ValueError(f"file is truncated ({size} bytes, tensors need {8 + n + end})")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt safetensors file {path}: {exc}; re-download or re-export it") from None
    return header


def tensor_shapes(path: Path) -> dict[str, tuple[list[int], str]]:
    return {k: (v["shape"], v["dtype"]) for k, v in read_header(path).items() if k != "__metadata__"}
