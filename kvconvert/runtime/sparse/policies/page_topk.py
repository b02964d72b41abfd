"""`page_topk` (Quest): a decode step reads the pages whose key bounds score highest for its query."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from ....errors import UserError
from .block_sparse_prefill import BlockSparsePrefillPolicy
from .dense import dense_decode
from .registry import Policy, register_policy


@register_policy
class PageTopKPolicy(Policy):
    """Quest-style decode selection over pages of `page` tokens.

    Per (sequence, KV head, page) the cache keeps the element-wise min and max of the page's keys.
    The query scores each page by `sum_d max(q_d*kmin_d, q_d*kmax_d)` (max over the query heads of
    the group), the top pages are read. `sink_pages` first and `recent_pages` last pages are always
    kept. Pages kept = `ceil(budget/page)` if `budget` (tokens) is given, else `ceil(keep * pages)`.
    Contexts shorter than `dense_below` tokens and the layers in `dense_layers` stay dense.
    """

    phases = ("decode",)
    onnx_lowering = "page_topk"
    context_multiple_label = "page_topk page size"
    kind: Literal["page_topk"] = "page_topk"
    page: int = Field(32, ge=16, le=64)
    keep: float = Field(0.25, gt=0.0, le=1.0)
    budget: int | None = Field(None, ge=1)
    sink_pages: int = Field(1, ge=0)
    recent_pages: int = Field(1, ge=1)
    dense_below: int = Field(512, ge=0)
    dense_layers: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> PageTopKPolicy:
        if self.page % 8:
            raise ValueError(f"page={self.page} must be a multiple of 8 tokens")
        if self.budget is not None and self.budget > self.dense_below:
            raise ValueError(
                f"budget={self.budget} tokens is larger than the shortest sparse context dense_below="
                f"{self.dense_below}: raise dense_below to at least the budget or lower the budget")
        if self.budget is not None and math.ceil(self.budget / self.page) < self.sink_pages + self.recent_pages:
            raise ValueError(f"budget={self.budget} tokens is fewer than sink_pages+recent_pages pages "
                             f"of {self.page} tokens")
        return self

    def check_pair(self, decode: Policy, prefill: Policy) -> None:
        if isinstance(prefill, BlockSparsePrefillPolicy) and prefill.tile % self.page:
            raise ValueError(f"page={self.page} must divide the prefill tile={prefill.tile} "
                             "(page summaries are built from prefill tiles)")

    def pages_kept(self, context: int) -> int:
        """Pages read for a context of `context` tokens (all of them when dense)."""
        pages = math.ceil(context / self.page)
        if context < self.dense_below:
            return pages
        if self.budget is not None:
            if self.budget > context:
                raise UserError(f"page_topk.budget={self.budget} tokens is larger than the context "
                                f"({context} tokens); lower budget")
            k = math.ceil(self.budget / self.page)
        else:
            k = math.ceil(self.keep * pages - 1e-9)
        return min(pages, max(k, self.sink_pages + self.recent_pages))

    def key_summary_page(self) -> int:
        return self.page

    def decode_read(self, context: int) -> int:
        return min(context, self.pages_kept(context) * self.page)

    def select(self, q1, kmin, kmax, seq_lens, context: int):
        """`kernels.selection.PageSelection` of the pages q1 [B, H, D] reads at `context` cached tokens
        (summaries kmin/kmax [B, Hkv, P, D], seq_lens int32 [B])."""
        from ....kernels import score_pages, select_pages

        keep = self.pages_kept(context)
        return select_pages(score_pages(q1, kmin, kmax), seq_lens, self.page, keep, self.sink_pages,
                            self.recent_pages)

    def decode(self, q1, k, v, seq_lens, scale, pages, use_kernels):
        if k.shape[2] < self.dense_below:
            return dense_decode(q1, k, v, scale)
        from ....kernels import paged_decode, paged_decode_reference

        sel = self.select(q1, *pages, seq_lens, k.shape[2])
        fn = paged_decode if use_kernels else paged_decode_reference
        return fn(q1, k, v, *sel.args(), scale=scale)

    def onnx_attributes(self, phase: str) -> dict:
        return {**super().onnx_attributes(phase),
                "decode_page": self.page, "decode_keep": float(self.keep), "decode_budget": int(self.budget or 0),
                "decode_sink_pages": self.sink_pages, "decode_recent_pages": self.recent_pages,
                "decode_dense_below": self.dense_below}

    def onnx_context_multiple(self) -> int:
        return self.page

    def validate_length(self) -> int:
        return self.dense_below + 2 * self.page
