"""`block_sparse_prefill`: a long prompt attends only to the key blocks that carry most of its attention."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .dense import causal_pairs, dense_prefill
from .registry import Policy, register_policy


@register_policy
class BlockSparsePrefillPolicy(Policy):
    """Block-sparse causal prefill over tiles of `tile` query x `tile` key tokens.

    Block importance = softmax over the causal key blocks of (mean-pooled query block . mean-pooled
    key block) * scale, averaged over the query heads of a KV group. The `sink_blocks` first key
    blocks and the `local_blocks` blocks ending at the diagonal are always kept; then blocks in
    descending importance until the kept mass reaches `mass` (or, if `density` is given, until
    `ceil(density * causal blocks)` are kept). Prompts shorter than `dense_below` stay dense.
    """

    phases = ("prefill",)
    onnx_lowering = "block_sparse_prefill"
    context_multiple_label = "block_sparse_prefill tile"
    kind: Literal["block_sparse_prefill"] = "block_sparse_prefill"
    tile: int = Field(64, ge=64, le=128)
    mass: float = Field(0.95, gt=0.0, le=1.0)
    density: float | None = Field(None, gt=0.0, le=1.0)
    sink_blocks: int = Field(1, ge=0)
    local_blocks: int = Field(1, ge=1)
    dense_below: int = Field(1024, ge=0)
    dense_layers: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> BlockSparsePrefillPolicy:
        if self.tile & (self.tile - 1):
            raise ValueError(f"tile={self.tile} must be a power of two (the kernels tile by it)")
        return self

    def select(self, q, k, scale: float):
        """`kernels.selection.BlockSelection` of the key blocks each query block of q [B, H, S, D] reads."""
        from ....kernels import block_importance, select_blocks

        probs = block_importance(q, k, self.tile, scale)
        return select_blocks(probs, q.shape[2], k.shape[2], self.tile, mass=None if self.density else self.mass,
                             density=self.density, sink_blocks=self.sink_blocks, local_blocks=self.local_blocks)

    def prefill(self, q, k, v, scale, use_kernels):
        sq, sk = q.shape[2], k.shape[2]
        if sq < self.dense_below:
            pairs = causal_pairs(sq, sk)
            return dense_prefill(q, k, v, scale), pairs, pairs
        from ....kernels import block_sparse_prefill, block_sparse_prefill_reference
        from ....kernels.selection import block_diagonal

        sel = self.select(q, k, scale)
        fn = block_sparse_prefill if use_kernels else block_sparse_prefill_reference
        blocks = sel.counts.shape[2]
        allowed = block_diagonal(blocks, sq, sk, self.tile).sum() + blocks
        return fn(q, k, v, *sel.args(), scale=scale), float(sel.counts.double().mean()) * blocks, float(allowed)

    def onnx_attributes(self, phase: str) -> dict:
        return {**super().onnx_attributes(phase),
                "prefill_tile": self.tile, "prefill_mass": float(self.mass),
                "prefill_density": float(self.density or 0.0), "prefill_sink_blocks": self.sink_blocks,
                "prefill_local_blocks": self.local_blocks, "prefill_dense_below": self.dense_below}

    def onnx_context_multiple(self) -> int:
        return self.tile

    def validate_length(self) -> int:
        return max(self.dense_below, 3 * self.tile)
