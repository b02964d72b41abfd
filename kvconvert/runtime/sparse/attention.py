"""`kvconvert.sparse(model, policy)`: run a transformers model with sparse attention.

The model's attention layers call the function registered in transformers' `AttentionInterface` under
`kvconvert_sparse` (with sdpa's mask function). It reads the per-layer policy and state that the
context manager attaches to each attention module, then runs `execute.decode_step` (one new token) or
`execute.prefill_step` (several). Layers with a sliding window or logit soft-capping keep the model's
own sdpa attention.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ...errors import UserError
from .execute import decode_step, prefill_step
from .policies import SparsePolicy, parse_policy_spec
from .state import PageSummaryCache, ReadStats

NAME = "kvconvert_sparse"
_registered = False


@dataclass
class LayerRuntime:
    layer: int
    policy: object
    use_kernels: bool
    stats: ReadStats
    summaries: PageSummaryCache | None = None
    fallback: object = None


@dataclass
class SparseSession:
    """What `sparse()` yields: the resolved policy and read statistics (`stats()`)."""

    policy: SparsePolicy
    use_kernels: bool
    read: ReadStats = field(default_factory=ReadStats)

    def stats(self) -> dict:
        return self.read.summary()


def _is_causal_mask(mask: torch.Tensor, sq: int, sk: int) -> bool:
    want = torch.arange(sk, device=mask.device)[None, :] <= (sk - sq + torch.arange(sq, device=mask.device))[:, None]
    m = mask[..., -sk:] if mask.dtype == torch.bool else mask[..., -sk:] == 0
    return bool((m == want).all())


def sparse_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers attention function: query [B, H, S, D], key/value [B, Hkv, L, D] -> ([B, S, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rt: LayerRuntime | None = getattr(module, "_kvconvert_sparse", None)
    if rt is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") or kwargs.get("sliding_window") or query.shape[-1] != value.shape[-1]:
        return _fallback(rt, module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    sq, sk = query.shape[2], key.shape[2]
    if attention_mask is not None and not _is_causal_mask(attention_mask, sq, sk):
        raise UserError("sparse attention runs unpadded batches only (attention_mask all ones); "
                        "run padded sequences one at a time")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    use_kernels = rt.use_kernels and query.is_cuda
    if sq == 1:
        out = decode_step(query, key, value, rt.policy.decode, scale, rt.summaries, use_kernels, rt.stats)
    else:
        out = prefill_step(query, key, value, rt.policy.prefill, scale, rt.summaries, use_kernels, rt.stats)
    return out.transpose(1, 2).contiguous(), None


def _fallback(rt: LayerRuntime, module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """The model's own attention (layers the sparse paths do not cover: soft-capping, sliding windows)."""
    fn = rt.fallback
    if fn is None:
        raise UserError(f"layer {rt.layer}: no dense attention to fall back to for this layer type")
    sq, sk = query.shape[2], key.shape[2]
    if getattr(fn, "__name__", "") == "eager_attention_forward":
        if attention_mask is None:
            attention_mask = torch.arange(sk, device=query.device)[None, :] <= (
                sk - sq + torch.arange(sq, device=query.device))[:, None]
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min)
        attention_mask = attention_mask.expand(query.shape[0], 1, sq, sk)
    return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _dense_function(module, implementation: str):
    """The attention function `implementation` names for `module` (eager: the modeling file's own)."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def register() -> None:
    """Register `kvconvert_sparse` with transformers (attention function + sdpa's mask builder)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sparse_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def _attention_modules(model) -> list:
    mods = [m for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and type(m).__name__.endswith("Attention")]
    if not mods:
        raise UserError(f"{type(model).__name__}: no attention layers with layer_idx found; sparse attention "
                        "supports transformers decoder models using the AttentionInterface")
    return mods


def _check_layers(policy: SparsePolicy, num_layers: int) -> None:
    bad = [i for i in policy.layers if not 0 <= i < num_layers]
    for phase in policy.phase_policies():
        bad += [i for i in getattr(phase, "dense_layers", []) if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"policy layers/dense_layers {sorted(set(bad))} out of range: the model has {num_layers} layers")


@contextlib.contextmanager
def sparse(model, policy="dense", *, use_kernels: bool | None = None):
    """Run `model` (a transformers causal LM) with sparse attention inside the block.

    policy: a `SparsePolicy`, a spec string (`page_topk:page=16,keep=0.25`), a YAML path or a dict.
    use_kernels: Triton kernels on CUDA tensors (default: when CUDA is available); the eager
    references otherwise. Yields a `SparseSession` (`.stats()` -> KV fraction read per phase).
    On exit the model's attention implementation is restored.
    """
    policy = parse_policy_spec(policy)
    register()
    mods = _attention_modules(model)
    _check_layers(policy, max(m.layer_idx for m in mods) + 1)
    if use_kernels is None:
        use_kernels = torch.cuda.is_available()
    session = SparseSession(policy, use_kernels)
    previous = model.config._attn_implementation
    for m in mods:
        lp = policy.for_layer(m.layer_idx)
        page = lp.decode.key_summary_page()
        summaries = PageSummaryCache(page) if page else None
        m._kvconvert_sparse = LayerRuntime(m.layer_idx, lp, use_kernels, session.read, summaries,
                                           _dense_function(m, previous))
    try:
        model.set_attn_implementation(NAME)
        if model.config._attn_implementation != NAME:
            raise UserError(f"{type(model).__name__} cannot switch its attention implementation; "
                            "sparse attention needs a model built on transformers' AttentionInterface")
        yield session
    finally:
        for m in mods:
            m.__dict__.pop("_kvconvert_sparse", None)
        model.set_attn_implementation(previous)
