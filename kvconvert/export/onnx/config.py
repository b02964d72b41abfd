"""Typed settings of `export_onnx`."""

from __future__ import annotations

import warnings
from typing import Literal

from ...config import StrictConfig

DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 2.5e-1}
DEFAULT_OPSET = {"kvconvert": 17, "standard": 24}


with warnings.catch_warnings():  # the field `validate` (INTERFACES.md) shadows pydantic's deprecated classmethod
    warnings.simplefilter("ignore")

    class OnnxExportConfig(StrictConfig):
        """`kvconvert export onnx` settings.

        `max_context`: capacity T of the fixed per-layer cache buffers `past_key_{i}` [batch, kv_heads, T, head_dim]
        (latent-KV models: `past_key_latent_{i}` [batch, 1, T, rank], ...) (None: the model's
        max_position_embeddings, capped at 4096). `policy`: a sparse attention policy spec
        (`parse_policy_spec` syntax or a YAML path; None = dense). `logits`: "all" positions or only the "last".
        `validate`: compare ONNX Runtime against PyTorch (prefill + `validate_decode_steps` decode steps) and fail
        when max|logit diff| / max(1, max|logit|) exceeds `tolerance` (None: per dtype, 1e-4 for fp32). `external_data`: weights in `model.onnx.data`
        ("auto": when the weights exceed `external_threshold_mb`). `attention`: "kvconvert" = one
        `kvconvert::KVAttention` node per layer (every policy; engines bind it to our plugin), "standard" = the
        ONNX `TensorScatter` + `Attention` ops (dense / sink_window only; engines need no plugin). `opset`: None =
        17 for kvconvert attention, 24 for standard (its minimum: TensorScatter). `runtime`: "onnxruntime" = the
        KVAttention function body of dense layers is ONNX Runtime's `com.microsoft::GroupQueryAttention` (fast,
        in-place cache), "any" = standard ops only (any ONNX runtime; engines bind the node to the plugin either way).
        """

        dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
        max_context: int | None = None
        policy: str | None = None
        logits: Literal["all", "last"] = "all"
        attention: Literal["kvconvert", "standard"] = "kvconvert"
        runtime: Literal["onnxruntime", "any"] = "onnxruntime"
        opset: int | None = None
        validate: bool = True
        validate_prompt_len: int = 12
        validate_decode_steps: int = 4
        tolerance: float | None = None
        external_data: Literal["auto", "always", "never"] = "auto"
        external_threshold_mb: int = 256

        def resolved_opset(self) -> int:
            return self.opset if self.opset is not None else DEFAULT_OPSET[self.attention]

        def resolved_tolerance(self) -> float:
            return self.tolerance if self.tolerance is not None else DEFAULT_TOLERANCE[self.dtype]
