"""Held-out perplexity in non-overlapping chunks (the figure every pass reports)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..runtime.input_device import input_device


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, chunk: int = 512, max_tokens: int | None = 2048,
               progress: bool = False) -> float:
    """exp(mean next-token NLL) of `ids` (LongTensor[N]) cut into chunks of `chunk` tokens.

    Each chunk is scored independently (no context carried over), matching the reference figures in
    the issues (first 2,048 tokens, chunks of 512).
    """
    ids = ids.flatten()
    if max_tokens:
        ids = ids[:max_tokens]
    device = input_device(model)
    nll, count = 0.0, 0
    starts = range(0, ids.numel() - 1, chunk)
    for s in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        piece = ids[s:s + chunk].unsqueeze(0).to(device)
        if piece.numel() < 2:
            break
        logits = model(piece).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], piece[0, 1:], reduction="sum")
        nll += loss.item()
        count += piece.numel() - 1
    return math.exp(nll / max(count, 1))


def chunks(ids: torch.Tensor, chunk: int = 512, max_tokens: int | None = 2048) -> list[torch.Tensor]:
    """The scored pieces of `ids` (LongTensor[N]) as LongTensor[1, <=chunk] (pieces under 2 tokens dropped)."""
    ids = ids.flatten()
    if max_tokens:
        ids = ids[:max_tokens]
    pieces = [ids[s:s + chunk].unsqueeze(0) for s in range(0, ids.numel() - 1, chunk)]
    return [p for p in pieces if p.numel() >= 2]


@torch.no_grad()
def perplexity_layerwise(source, ids: torch.Tensor, chunk: int = 512, max_tokens: int | None = 2048,
                         device: str = "auto", progress: bool = False) -> float:
    """`perplexity` of a checkpoint run one decoder layer at a time (`runtime.layerwise`): the same chunks,
    all pushed through layer i before layer i+1 is read; memory is about one layer + the chunks' hidden states."""
    from ..runtime.layerwise import LayerwiseModel

    runner = LayerwiseModel(source, device=device, progress=progress)
    states = runner.forward(chunks(ids, chunk, max_tokens), desc="perplexity")
    nll, count = 0.0, 0
    with runner.head_context():
        for s in states:
            total, n = runner.nll(s)
            nll += float(total)
            count += n
    return math.exp(nll / max(count, 1))
