"""Check an exported decoder against PyTorch: logits of a prefill and a few greedy decode steps."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...runtime.cache_io import cache_of, with_cache
from .ort_generate import OrtGenerator


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


@torch.no_grad()
def compare_with_torch(folder: Path, model: torch.nn.Module, *, prompt_len: int, decode_steps: int,
                       batch: int = 2, seed: int = 0,
                       reference: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict[str, Any]:
    """Max abs logit difference ONNX Runtime vs `model` (transformers, its own KV cache).

    `batch` random prompts of `prompt_len` tokens; decoding feeds PyTorch's greedy tokens to both.
    `reference()` wraps the PyTorch calls (e.g. a sparse-attention context). Returns the figures.
    """
    gen = OrtGenerator(folder)
    vocab = int(gen.meta["vocab_size"])
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=g)
    ctx = reference or contextlib.nullcontext
    with ctx():
        out = model(input_ids=ids, use_cache=True)
    ref_logits, past = out.logits, cache_of(out)
    cache = gen.empty_cache(batch)
    pos = np.broadcast_to(np.arange(prompt_len), (batch, prompt_len))
    logits, cache = gen.step(ids.numpy(), pos, np.zeros(batch, np.int64), cache)
    ref = ref_logits[:, -logits.shape[1]:]
    prefill = float(np.abs(logits.astype(np.float32) - _np(ref)).max())
    decode = 0.0
    nxt = ref_logits[:, -1].argmax(-1)
    agree = True
    for t in range(decode_steps):
        length = prompt_len + t
        with ctx():
            out = model(input_ids=nxt[:, None], **with_cache(model, past), use_cache=True,
                        position_ids=torch.full((batch, 1), length))
        past = cache_of(out)
        logits, cache = gen.step(nxt[:, None].numpy(), np.full((batch, 1), length), np.full(batch, length), cache)
        decode = max(decode, float(np.abs(logits.astype(np.float32) - _np(out.logits)).max()))
        agree = agree and bool((logits[:, -1].argmax(-1) == _np(out.logits[:, -1]).argmax(-1)).all())
        nxt = out.logits[:, -1].argmax(-1)
    return {"prefill_max_abs_diff": prefill, "decode_max_abs_diff": decode, "max_abs_diff": max(prefill, decode),
            "greedy_tokens_agree": agree, "batch": batch, "prompt_len": prompt_len, "decode_steps": decode_steps,
            "logit_scale": float(_np(ref_logits).__abs__().max())}
