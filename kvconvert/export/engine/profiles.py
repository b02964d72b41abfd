"""Optimization profiles (min, opt, max shapes per input) for prefill and decode, from the ONNX metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import UserError
from .config import EngineConfig

Shape = tuple[int, ...]


@dataclass
class Profile:
    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


def _check(what: str, opt: int, hi: int, lo: int = 1) -> None:
    if not lo <= opt <= hi:
        raise UserError(f"profile {what}: opt {opt} must lie in [{lo}, max {hi}]; raise the max or lower the opt")


def cache_buffers(meta: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(past name, heads, width) of every cache buffer in graph order: K/V [kv_heads, head_dim] or latents [1, rank]."""
    if meta.get("cache", {}).get("buffers"):
        return [(b["past"], int(b["heads"]), int(b["width"])) for b in meta["cache"]["buffers"]]
    kv, hd = int(meta["num_kv_heads"]), int(meta["head_dim"])
    return [(f"past_{k}_{i}", kv, hd) for i in range(int(meta["num_layers"])) for k in ("key", "value")]


def engine_profiles(meta: dict[str, Any], cfg: EngineConfig) -> list[Profile]:
    """Profile 0 "prefill": seq 1..max_prefill; profile 1 "decode": seq 1. Batch 1..max_batch in both.
    Cache inputs `past_*` [batch, heads, max_context, width] vary only in batch."""
    max_context = int(meta["max_context"])
    max_prefill = cfg.max_prefill or max_context
    if max_prefill > max_context:
        raise UserError(f"--max-prefill {max_prefill} exceeds the ONNX export's max_context {max_context}")
    opt_batch = cfg.opt_batch or cfg.max_batch
    _check("batch", opt_batch, cfg.max_batch)
    opt_prefill = cfg.opt_prefill or min(128, max_prefill)
    _check("prefill length", opt_prefill, max_prefill)
    buffers = cache_buffers(meta)
    out = []
    for name, (s_opt, s_max) in {"prefill": (opt_prefill, max_prefill), "decode": (1, 1)}.items():
        p = Profile(name)
        lo, mid, hi = 1, opt_batch, cfg.max_batch
        for inp in ("input_ids", "position_ids"):
            p.shapes[inp] = ((lo, 1), (mid, s_opt), (hi, s_max))
        p.shapes["cache_length"] = ((lo,), (mid,), (hi,))
        for name, heads, width in buffers:
            p.shapes[name] = tuple((b, heads, max_context, width) for b in (lo, mid, hi))
        out.append(p)
    return out
