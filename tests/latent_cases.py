"""Shared setup of the latent_decode kernel tests (tests/test_latent_decode_kernel.py, tests/gpu/test_latent_gpu.py):
RoPE tables and the page_topk selection over keys rebuilt from the latents."""

import torch

from kvconvert.kernels import page_summaries, score_pages, select_pages
from kvconvert.kernels.latent_decode import rebuild_keys


def rope_table(length, rotary, device="cpu"):
    """(cos, sin) [length, rotary], theta 10000, halves duplicated (the layout LatentWeights holds)."""
    inv = 1.0 / (10000 ** (torch.arange(0, rotary, 2, device=device).float() / rotary))
    emb = torch.arange(length, device=device)[:, None].float() * inv
    emb = torch.cat([emb, emb], -1)
    return emb.cos(), emb.sin()


def topk_pages(q, c_k, w, lens, page, keep, sink_pages, recent_pages, keys_dtype=None):
    """select_pages for queries q [B, H, D] over pages of `page` slots, scored on the summaries of the keys
    rebuilt from c_k [B, 1, T, Rk] at positions 0..T-1 (cast to `keys_dtype` when given)."""
    positions = torch.arange(c_k.shape[2], device=c_k.device)[None].expand(len(lens), -1)
    keys = rebuild_keys(c_k[:, 0], w, positions)
    if keys_dtype is not None:
        keys = keys.to(keys_dtype)
    kmin, kmax = page_summaries(keys, lens, page)
    return select_pages(score_pages(q, kmin, kmax), lens, page, keep, sink_pages, recent_pages)
