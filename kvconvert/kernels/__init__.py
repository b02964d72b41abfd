"""Kernels: leaves that import only torch/triton. Each Triton kernel sits beside an eager reference
with the same signature (`name` and `name_reference`); importing works without a GPU and without triton."""

from .block_sparse_prefill import (
    block_sparse_prefill,
    block_sparse_prefill_reference,
    sink_window_prefill_reference,
)
from .latent_decode import (
    LatentWeights,
    latent_decode,
    latent_decode_reference,
    sink_window_pages,
)
from .paged_decode import dense_decode, dense_decode_reference, paged_decode, paged_decode_reference
from .selection import (
    BlockSelection,
    PageSelection,
    all_blocks,
    all_pages,
    block_importance,
    page_summaries,
    score_pages,
    select_blocks,
    select_pages,
    update_page_summaries,
)
from .sink_window_decode import sink_window_decode, sink_window_decode_reference

__all__ = [
    "BlockSelection", "PageSelection", "all_blocks", "all_pages", "block_importance", "block_sparse_prefill",
    "block_sparse_prefill_reference", "dense_decode", "dense_decode_reference", "LatentWeights", "latent_decode",
    "latent_decode_reference", "page_summaries",
    "paged_decode", "paged_decode_reference", "score_pages", "select_blocks", "select_pages",
    "sink_window_decode", "sink_window_decode_reference", "sink_window_pages", "sink_window_prefill_reference",
    "update_page_summaries",
]
