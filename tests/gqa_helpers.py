"""Test helpers for mha-to-gqa: expand a GQA checkpoint to more KV heads by repeating each head."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kvconvert.convert.gqa_layout import kv_roles, split_fused
from kvconvert.convert.gqa_stream import write_converted
from kvconvert.io import copy_side_files, resolve_source
from kvconvert.models import describe


def repeat_heads(t: torch.Tensor, kv_heads: int, head_dim: int, factor: int) -> torch.Tensor:
    """[KV*d, ...] -> [KV*factor*d, ...], each head repeated `factor` times in place (what repeat_kv does)."""
    x = t.reshape(kv_heads, 1, head_dim, *t.shape[1:]).expand(kv_heads, factor, head_dim, *t.shape[1:])
    return x.reshape(kv_heads * factor * head_dim, *t.shape[1:]).clone()


def expand_kv(src: Path, dst: Path, kv_heads: int) -> Path:
    """Write `src` with every KV head repeated so it has `kv_heads` KV heads (same function)."""
    source = resolve_source(src)
    config = source.config_dict()
    view = describe(config)
    factor = kv_heads // view.num_kv_heads
    roles = kv_roles(view)

    def convert(name, t):
        if name not in roles:
            return t
        if roles[name][1] in ("qkv", "qkv_bias"):
            q, k, v = split_fused(t, view.num_heads, view.num_kv_heads, view.head_dim)
            return torch.cat([q, repeat_heads(k, view.num_kv_heads, view.head_dim, factor),
                              repeat_heads(v, view.num_kv_heads, view.head_dim, factor)])
        return repeat_heads(t, view.num_kv_heads, view.head_dim, factor)

    Path(dst).mkdir(parents=True, exist_ok=True)
    write_converted(source, Path(dst), convert, 2**40, progress=False)
    copy_side_files(source.path, Path(dst), skip=("config.json",))
    (Path(dst) / "config.json").write_text(json.dumps({**config, "num_key_value_heads": kv_heads}))
    return Path(dst)


@torch.no_grad()
def logits_of(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model(ids).logits


def shuffle_kv_heads(src: Path, dst: Path, kv_order: list[int]) -> Path:
    """Write `src` with its KV heads (and their query heads) reordered: the same function, other grouping."""
    from safetensors.torch import load_file, save_file

    from kvconvert.convert.gqa_grouping import permute_heads
    from kvconvert.convert.gqa_layout import layer_tensors, read_layer

    source = resolve_source(src)
    view = describe(source.config_dict())
    state = {}
    for f in source.weight_files:
        state.update(load_file(f))
    for layer in range(view.num_layers):
        w = permute_heads(read_layer(state.__getitem__, view, layer), kv_order, view.num_heads, view.head_dim)
        state.update({k: v.contiguous() for k, v in layer_tensors(view, layer, w).items()})
    Path(dst).mkdir(parents=True, exist_ok=True)
    save_file(state, str(Path(dst) / "model.safetensors"), metadata={"format": "pt"})
    copy_side_files(source.path, Path(dst))
    return Path(dst)
