"""`sink_window` (StreamingLLM): each query sees the first `sink` and the last `window` tokens, both phases."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .dense import causal_pairs
from .registry import Policy, register_policy


@register_policy
class SinkWindowPolicy(Policy):
    """StreamingLLM: each query sees the first `sink` tokens and the last `window` tokens (itself included)."""

    onnx_lowering = "sink_window"
    kind: Literal["sink_window"] = "sink_window"
    sink: int = Field(4, ge=0)
    window: int = Field(1024, ge=1)

    def decode_read(self, context: int) -> int:
        return min(context, self.sink + self.window)

    def decode(self, q1, k, v, seq_lens, scale, pages, use_kernels):
        from ....kernels import sink_window_decode, sink_window_decode_reference

        fn = sink_window_decode if use_kernels else sink_window_decode_reference
        return fn(q1, k, v, seq_lens, self.sink, self.window, scale=scale)

    def prefill(self, q, k, v, scale, use_kernels):
        from ....kernels import sink_window_prefill_reference

        sq, sk = q.shape[2], k.shape[2]
        seen = sum(min(t + 1, self.sink + self.window) for t in range(sk - sq, sk))
        out = sink_window_prefill_reference(q, k, v, self.sink, self.window, scale=scale)
        return out, seen, causal_pairs(sq, sk)

    def onnx_attributes(self, phase: str) -> dict:
        return {phase: self.kind, f"{phase}_sink": int(self.sink), f"{phase}_window": int(self.window)}

    def validate_length(self) -> int:
        return self.sink + self.window + 4
