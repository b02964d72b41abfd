"""`kvconvert export engine` settings."""

from __future__ import annotations

from typing import Literal

from ...config import StrictConfig

RTX_TARGETS = ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121")


class EngineConfig(StrictConfig):
    """Two optimization profiles are built: 0 = prefill (seq 1..max_prefill, opt opt_prefill or min(128, max_prefill)) and 1 = decode
    (seq 1), both with batch 1..max_batch (opt opt_batch). The cache inputs are static in their context axis
    (the ONNX max_context). Precision is the ONNX graph's own (strongly typed network), there is no flag for it.

    `backend`: "tensorrt-rtx" (PyPI wheels, builds without a GPU, runs on SM75-121 but not Hopper) or
    "tensorrt" (enterprise TensorRT: needs a GPU to build). `compute_capabilities`: TensorRT-RTX targets
    (None: SM80, SM86, SM89, SM120). `plugin`: "python" binds kvconvert::KVAttention to the Python IPluginV3
    (the engine runs where `kvconvert` registers it in-process); "aot" (enterprise TensorRT only) embeds the
    Triton kernel's PTX so the engine loads in Triton's C++ TensorRT backend without Python. A standard-attention
    export (`--attention standard`) has no plugin node: `plugin` is ignored and the plan needs no Python.
    `decompose_attention`: let TensorRT build the ONNX Attention ops from unfused layers (needed for fp32, which
    has no fused kernel; slower).
    """

    backend: Literal["tensorrt-rtx", "tensorrt"] = "tensorrt-rtx"
    max_batch: int = 1
    opt_batch: int | None = None
    max_prefill: int | None = None
    opt_prefill: int | None = None
    compute_capabilities: list[str] | None = None
    plugin: Literal["python", "aot"] = "python"
    workspace_mb: int | None = None
    decompose_attention: bool = False
