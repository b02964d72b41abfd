"""`kvconvert export triton` settings."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import field_validator

from ...config import StrictConfig


class TritonRepoConfig(StrictConfig):
    """`name`: the engine model's name (the generation model is `<name>_generate`). `instances`: model
    instances per model. `max_new_tokens`: default generation length (a request may ask for fewer or more up
    to max_context). `generate_backend`: what the generation model runs: "onnxruntime" (the ONNX session, CPU
    or CUDA; the default for an ONNX folder) or "engine" (calls the `<name>` TensorRT model step by step with a
    sequence id, its KV cache kept by Triton as implicit state; the default for an engine folder).
    `max_sequence_idle_us`: how long Triton keeps an idle sequence's cache."""

    name: str = "kvmodel"
    instances: int = 1
    max_new_tokens: int = 64
    generate_backend: Literal["onnxruntime", "engine"] | None = None
    max_sequence_idle_us: int = 60_000_000

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("model names use letters, digits, '_', '.', '-'")
        return v
