"""`kvconvert inspect`: the normalized view, sizes, and what-if KV tables (config + headers only)."""

from __future__ import annotations

from typing import Any

from ..models import AttentionView, describe, dtype_bytes


def inspect_source(source, context: int = 32768, batch: int = 8, dtype: str = "bf16") -> dict[str, Any]:
    """Everything `inspect` reports, as a JSON-able dict. Reads no tensor data."""
    cfg = source.config_dict()
    view = describe(cfg)
    nbytes = dtype_bytes(dtype)
    return {
        "source": source.spec,
        "path": str(source.path),
        "model_type": view.model_type,
        "architectures": cfg.get("architectures", []),
        "view": view.to_dict(),
        "parameters": source.reader().num_parameters(),
        "dtype": dtype,
        "context": context,
        "batch": batch,
        "kv_bytes_per_token": view.kv_bytes_per_token(dtype),
        "kv_gib": view.kv_gib(context, batch, dtype),
        "what_if": what_if(view, context, batch, nbytes),
    }


def what_if(view: AttentionView, context: int, batch: int, nbytes: int) -> list[dict[str, Any]]:
    """KV bytes/token and GiB for each reachable GQA group count and a few uniform latent ranks."""
    base = view.kv_elements_per_token() * nbytes
    rows = []
    for g in sorted(view.valid_group_counts(), reverse=True):
        per_tok = 2 * view.num_layers * g * view.head_dim * nbytes
        label = "current" if g == view.num_kv_heads and not view.kv_widths else ("MQA" if g == 1 else f"GQA-{g}")
        rows.append({"kind": "gqa", "label": label, "kv_heads": g, "rank": None,
                     "bytes_per_token": per_tok, "gib": per_tok * context * batch / 2**30,
                     "ratio": per_tok / base, "available": view.supports_gqa or g == view.num_kv_heads})
    for frac in (0.5, 0.25, 0.125):
        rank = max(1, int(view.kv_width * frac))
        per_tok = 2 * view.num_layers * rank * nbytes
        rows.append({"kind": "latent", "label": f"latent r={rank}", "kv_heads": None, "rank": rank,
                     "bytes_per_token": per_tok, "gib": per_tok * context * batch / 2**30,
                     "ratio": per_tok / base, "available": True})
    return rows


def format_inspect(r: dict[str, Any]) -> str:
    v = r["view"]
    rope = v["rope"]
    rope_txt = "none" if not rope else (
        f"theta {rope['theta']:g}, rotary dim {rope['rotary_dim']}/{v['head_dim']}, "
        f"scaling {rope['scaling']['rope_type'] if rope['scaling'] else 'none'}")
    names = v["names"]
    proj = names["qkv"] + " (fused)" if names["qkv"] else " ".join(names[k] for k in ("q", "k", "v"))
    biases = ",".join(k for k in ("q", "k", "v", "o") if v[f"{k}_bias"]) or "none"
    kind = "MHA" if v["num_kv_heads"] == v["num_heads"] else f"GQA {v['num_heads'] // v['num_kv_heads']}:1"
    widths = {tuple(w) for w in v["kv_widths"]}
    lines = [
        f"Model        {r['source']}  ({r['model_type']}, {', '.join(r['architectures']) or '?'})",
        f"Attention    {v['num_layers']} layers, hidden {v['hidden_size']}, {v['num_heads']} query heads, "
        f"{v['num_kv_heads']} KV heads, head dim {v['head_dim']} ({kind})",
        f"RoPE         {rope_txt}",
        f"Projections  {proj} -> {names['o']}; biases: {biases}; QK-norm: {'yes' if v['qk_norm'] else 'no'}",
        f"Parameters   {r['parameters'] / 1e6:,.1f} M",
    ]
    if len(widths) > 1 or (widths and next(iter(widths)) != (v['num_kv_heads'] * v['head_dim'],) * 2):
        lines.append(f"Cache widths per layer (K, V): {', '.join(f'{k}+{w}' for k, w in v['kv_widths'])}")
    if not v["supports_gqa"]:
        lines.append(f"GQA          not available: {v['gqa_note']}")
    lines += [
        f"KV cache     {r['kv_bytes_per_token']:,} bytes/token ({r['dtype']}); "
        f"{r['kv_gib']:.2f} GiB at context {r['context']:,} x batch {r['batch']}",
        "",
        f"What-if ({r['dtype']}, context {r['context']:,}, batch {r['batch']}):",
        f"  {'configuration':<18}{'bytes/token':>12}{'GiB':>10}{'ratio':>8}",
    ]
    for row in r["what_if"]:
        note = "" if row["available"] else "  (not loadable by this architecture)"
        lines.append(f"  {row['label']:<18}{row['bytes_per_token']:>12,}{row['gib']:>10.2f}{row['ratio']:>8.3f}{note}")
    return "\n".join(lines)
