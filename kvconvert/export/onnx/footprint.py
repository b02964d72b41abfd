"""RAM and disk an ONNX export (and a TensorRT engine build) of a checkpoint needs, stated before loading.

The TorchScript exporter holds the model in the export dtype and, while serialising, a second copy of every
weight as an ONNX initializer; validation then runs ONNX Runtime (a third copy, memory-mapped from the external
data file) beside the PyTorch model. So the export needs about 3 x weights of RAM and 1 x weights of disk; an
engine build parses the ONNX (1 x) and holds TensorRT's builder copy (about 2 x more).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ... import resources
from ...errors import UserError
from ...models import dtype_bytes

ONNX_RAM_COPIES = 3
ENGINE_RAM_COPIES = 3


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def export_needs(parameters: int, dtype: str, validate: bool = True) -> dict[str, int]:
    """{"ram": bytes, "disk": bytes} of an ONNX export of `parameters` weights in `dtype`."""
    weights = parameters * dtype_bytes(dtype)
    return {"ram": weights * (ONNX_RAM_COPIES if validate else ONNX_RAM_COPIES - 1), "disk": weights}


def check_export_fits(source, dtype: str, out: Path, validate: bool = True) -> dict[str, int]:
    """UserError, before anything is loaded, when the export cannot fit this machine's RAM or the disk of `out`."""
    need = export_needs(source.reader().num_parameters(), dtype, validate)
    free = resources.available_ram()
    if free is not None and need["ram"] > free:
        smaller = " (or --dtype fp16)" if dtype == "fp32" else ""
        raise UserError(f"exporting {source.spec} to ONNX in {dtype} needs about {_gib(need['ram'])} of RAM "
                        f"(model + ONNX initializers + validation) but {_gib(free)} is available; export on a "
                        f"machine with more memory{smaller}, or build with onnxruntime-genai's model builder "
                        "(python -m onnxruntime_genai.models.builder, streams weights)")
    parent = Path(out).resolve().parent
    while not parent.exists():
        parent = parent.parent
    disk = shutil.disk_usage(parent).free
    if need["disk"] > disk:
        raise UserError(f"the ONNX export needs {_gib(need['disk'])} of disk beside {out} but {_gib(disk)} is free")
    return need


def engine_needs(onnx_bytes: int) -> dict[str, int]:
    """{"ram": bytes, "disk": bytes} of a TensorRT engine build from an ONNX model of `onnx_bytes` weights."""
    return {"ram": onnx_bytes * ENGINE_RAM_COPIES, "disk": onnx_bytes}


def check_engine_fits(onnx_bytes: int) -> None:
    need = engine_needs(onnx_bytes)
    free = resources.available_ram()
    if free is not None and need["ram"] > free:
        raise UserError(f"building a TensorRT engine from {_gib(onnx_bytes)} of ONNX weights needs about "
                        f"{_gib(need['ram'])} of RAM but {_gib(free)} is available; build it on the GPU machine "
                        "that will run it (trtexec --onnx=model.onnx)")
