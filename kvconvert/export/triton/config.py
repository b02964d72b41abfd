"""`kvconvert export triton` settings."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from ...config import StrictConfig


class TritonRepoConfig(StrictConfig):
    """`name`: the engine model's name (the generation model is `<name>_generate`). `instances`: model
    instances per model (each generation instance has its own scheduler and batch cache). `max_new_tokens`:
    default generation length. `generate_backend`: what the generation model runs: "onnxruntime" (the ONNX
    session on CPU; the default for an ONNX folder) or "engine" (calls the `<name>` TensorRT model per step
    with a sequence id, its KV cache kept by Triton as implicit state; the default for an engine folder).
    `max_sequence_idle_us`: how long Triton keeps an idle sequence's cache.

    Load limits of the generation model (per instance): `max_active` sequences decoded together (its batch
    cache is `max_active` rows of max_context slots), `max_queued` requests waiting for a row (more are refused
    at once), `queue_timeout_s` (a request waiting longer gets an error), `max_tokens_limit` (the largest
    `max_tokens` a request may ask; None = max_context), `prefill_chunk` (prompt tokens per scheduler step
    summed over the sequences being prefilled, so a long prompt does not stall running ones), `ort_threads`
    (the ONNX Runtime session's intra-op threads; 0 = one per core)."""

    name: str = "kvmodel"
    instances: int = Field(1, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    generate_backend: Literal["onnxruntime", "engine"] | None = None
    max_sequence_idle_us: int = 60_000_000
    max_active: int = Field(8, ge=1)
    max_queued: int = Field(64, ge=0)
    queue_timeout_s: float = Field(30.0, gt=0)
    max_tokens_limit: int | None = Field(None, ge=1)
    prefill_chunk: int = Field(128, ge=1)
    ort_threads: int = Field(0, ge=0)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("model names use letters, digits, '_', '.', '-'")
        return v

    def generate_parameters(self) -> dict[str, str]:
        """The generation model's config.pbtxt parameters for these limits."""
        keys = ("max_new_tokens", "max_active", "max_queued", "queue_timeout_s", "prefill_chunk", "ort_threads",
                "max_tokens_limit")
        return {k: str(getattr(self, k)) for k in keys if getattr(self, k) is not None}
