"""Placement of the reference model a calibrated pass reads: one device, or spread by `accelerate`.

The calibrated GQA fit only runs the reference forward (hooks gather per-layer Gram matrices) and reads the
projection weights from the checkpoint itself, and healing only runs it forward as the teacher, so the reference
may be spread over GPUs, CPU RAM and disk (`device_map="auto"`, `max_memory`, `offload_folder`) to fit a model
larger than memory. The trained student is always a plain model on one device.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from typing import Literal

from .. import resources
from ..config import StrictConfig
from ..models import dtype_bytes

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class PlacementConfig(StrictConfig):
    """`device_map`: None = the whole reference on `device`; "auto" / "balanced" / "sequential" = accelerate fills
    GPUs, then CPU RAM, then `offload_folder` (a temporary folder when None), each bounded by `max_memory`
    (e.g. {"0": "70GiB", "cpu": "16GiB"}). `dtype`: the reference's weights in memory (the fit math is fp64 anyway)."""

    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | None = None
    device: str = "cpu"
    max_memory: dict[str, str] | None = None
    offload_folder: str | None = None
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"


@contextlib.contextmanager
def load_reference(source, cfg: PlacementConfig) -> Iterator:
    """`source.load_model` placed as `cfg` says; a temporary offload folder lives as long as the context."""
    import torch

    dtype = getattr(torch, DTYPES[cfg.dtype])
    if cfg.device_map is None:
        yield source.load_model(dtype, device_map=None if cfg.device == "cpu" else cfg.device)
        return
    with contextlib.ExitStack() as stack:
        folder = cfg.offload_folder or stack.enter_context(tempfile.TemporaryDirectory(prefix="kvconvert-offload-"))
        max_memory = {int(k) if k.isdigit() else k: v for k, v in (cfg.max_memory or {}).items()} or None
        yield source.load_model(dtype, device_map=cfg.device_map, max_memory=max_memory, offload_folder=folder)


def check_fits_in_ram(parameters: int, cfg: PlacementConfig, student: bool, hint: str | None = None) -> None:
    """UserError, before anything is loaded, when the reference (and a fp32 student) cannot fit in RAM.

    Only for a reference on the CPU without a device map; a dispatched or GPU reference is accelerate's to place.
    """
    from ..errors import UserError

    if cfg.device_map is not None or cfg.device != "cpu":
        return
    free = resources.available_ram()
    need = parameters * dtype_bytes(cfg.dtype) + (parameters * 4 if student else 0)
    if free is None or need <= free:
        return
    what = f"the reference model ({cfg.dtype})" + (" plus the fp32 student" if student else "")
    if hint is None:
        hint = ("pass --device-map auto (accelerate offloads the reference to GPUs / disk)"
                + (", --reference-dtype bf16" if cfg.dtype == "fp32" else "")
                + (", or heal on a GPU machine" if student else ""))
    raise UserError(f"{what} needs {need / 2**30:.1f} GiB of RAM but {free / 2**30:.1f} GiB is available; {hint}")
