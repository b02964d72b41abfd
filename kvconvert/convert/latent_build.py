"""fit-latent steps: statistics -> spectra -> ranks -> factors -> in-memory latent model -> folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models import AttentionView
from .activations import attention_input_grams
from .latent_fit import Spectrum, allocate, attention_weights, attention_weights_from, layer_spectra, set_dense_kv


@dataclass
class LatentFit:
    """Per layer: cached widths (k, v) — (r, 0) for a joint latent — and the factor tensors by name."""

    widths: list[tuple[int, int]]
    joint: bool
    factors: list[dict[str, torch.Tensor]]
    kv_fraction: float
    tokens: int
    sensitivity: list[list[float]] = field(default_factory=list)


def _scaling(model, view: AttentionView, layer: int) -> float:
    return float(model.get_submodule(view.layer_prefix(layer)).scaling)


def _inv_freq(model, view: AttentionView) -> torch.Tensor | None:
    """The RoPE frequencies the model really uses (scaled variants included), or None."""
    rotary = getattr(model.get_submodule(view.attn_prefix.split("layers.")[0].rstrip(".")), "rotary_emb", None)
    freq = getattr(rotary, "inv_freq", None)
    return None if freq is None else freq.detach().double().cpu()


@torch.no_grad()
def _kl_to_reference(model, batches: list[torch.Tensor], ref_logp: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for ids, ref in zip(batches, ref_logp):
        logp = F.log_softmax(model(ids, use_cache=False).logits.float()[0], dim=-1)
        total += float(F.kl_div(logp, ref, log_target=True, reduction="sum"))
        count += ids.numel()
    return total / max(count, 1)


@torch.no_grad()
def measure_sensitivity(model, view: AttentionView, spectra: list[dict[str, Spectrum]], probe_rank: list[int],
                        batches: list[torch.Tensor], progress: bool = True) -> list[list[float]]:
    """Per layer [s_k, s_v]: KL(model || model with only that layer's K (or V) at `probe_rank`) per unit of
    that layer's weighted residual error — the exchange rate used to allocate ranks across layers."""
    ref = [F.log_softmax(model(ids, use_cache=False).logits.float()[0], dim=-1) for ids in batches]
    out = []
    bar = tqdm(range(view.num_layers), desc="sensitivity", disable=not progress, leave=False)
    for layer in bar:
        w = attention_weights(model, view, layer)
        row = []
        for kind, orig in (("k", w.k), ("v", w.v)):
            spec, r = spectra[layer][kind], probe_rank[layer]
            down, up = spec.factors(r)
            set_dense_kv(model, view, layer, **{kind: up @ down, ("v" if kind == "k" else "k"): None})
            kl = _kl_to_reference(model, batches, ref)
            set_dense_kv(model, view, layer, **{kind: orig, ("v" if kind == "k" else "k"): None})
            row.append(max(kl, 1e-12) / max(spec.residual(r), 1e-30))
        out.append(row)
    return out


def _budget(cfg, view: AttentionView) -> tuple[int, int]:
    """(per-layer uniform width of each K/V latent (or of the joint latent), total cached elements)."""
    width = view.kv_width
    per = 2 * width if cfg.joint_kv else width
    if cfg.rank is not None:
        r = cfg.rank
    else:
        r = max(1, round(cfg.kv_ratio * per))
    total = view.num_layers * (r if cfg.joint_kv else 2 * r)
    return r, total


def fit_factors(model, view: AttentionView, cfg, batches: list[torch.Tensor], progress: bool = True,
                stats: tuple[list[torch.Tensor], int] | None = None,
                fishers: list[torch.Tensor] | None = None) -> LatentFit:
    """Ranks and factors for every layer. `stats`: precomputed `attention_input_grams` of `batches`;
    `fishers`: precomputed `kv_output_fishers` (metric="fisher"). `model` may be a
    `runtime.layerwise.LayerwiseModel` (see `fit_factors_layerwise`)."""
    from .activations import is_layerwise

    if is_layerwise(model):
        return fit_factors_layerwise(model, view, cfg, batches, progress)
    grams, tokens = stats or attention_input_grams(model, view, batches, progress=progress)
    width = view.kv_width
    weights = [attention_weights(model, view, i) for i in range(view.num_layers)]
    rope = {"inv_freq": _inv_freq(model, view), "context": cfg.calib.seqlen}
    damping = cfg.damping
    if cfg.metric == "fisher":
        if fishers is None:
            from .latent_fisher import kv_output_fishers

            fishers, _ = kv_output_fishers(model, view, batches[:cfg.sensitivity_samples], progress)
        damping = max(damping, 1e-2)
    else:
        fishers = [None] * view.num_layers
    spectra = [layer_spectra(weights[i], view, grams[i], tokens, cfg.metric, _scaling(model, view, i), damping,
                             fisher=fishers[i], **rope) for i in range(view.num_layers)]
    uniform, _ = _budget(cfg, view)
    measured: list[list[float]] = []
    sensitivity: list[list[float]] = []  # per layer [K, V] exchange rate: loss per unit of weighted error
    if cfg.metric == "fisher" and cfg.allocation == "sensitivity":
        sensitivity = [[1.0, 1.0] for _ in range(view.num_layers)]  # Fisher eigenvalues are loss units already
    elif cfg.allocation == "sensitivity" and uniform < (2 * width if cfg.joint_kv else width):
        probe = [min(width - 1, max(1, round(uniform / 2))) if cfg.joint_kv else min(width - 1, uniform)] * view.num_layers
        measured = measure_sensitivity(model, view, spectra, probe, batches[:cfg.sensitivity_samples], progress)
        sensitivity = measured
    if cfg.joint_kv:
        for i in range(view.num_layers):
            wk, wv = sensitivity[i] if sensitivity else (1 / max(spectra[i]["k"].eigvals.sum().item(), 1e-30),
                                                        1 / max(spectra[i]["v"].eigvals.sum().item(), 1e-30))
            spectra[i] = layer_spectra(weights[i], view, grams[i], tokens, cfg.metric, _scaling(model, view, i),
                                       damping, joint_weights=(wk, wv), fisher=fishers[i], **rope)
    extras = [_layer_extras(w, keep_q=True) for w in weights]
    return _allocate_and_factor(view, cfg, spectra, extras, sensitivity, measured, tokens)


def needs_probe(cfg, view: AttentionView) -> bool:
    """Whether rank allocation measures KL probes (metric != fisher with sensitivity allocation): those edit a
    whole in-memory model."""
    uniform, _ = _budget(cfg, view)
    width = view.kv_width
    return cfg.metric != "fisher" and cfg.allocation == "sensitivity" and \
        uniform < (2 * width if cfg.joint_kv else width)


def _layer_extras(w, keep_q: bool) -> dict[str, torch.Tensor]:
    out = {}
    if w.k_bias is not None:
        out["k_proj.bias"] = w.k_bias
    if w.v_bias is not None:
        out["v_proj.bias"] = w.v_bias
    if keep_q:
        out["q_proj"] = w.q
        if w.q_bias is not None:
            out["q_proj.bias"] = w.q_bias
    return out


def _compact(spec: dict[str, Spectrum]) -> dict[str, Spectrum]:
    """fp32 factors material (eigenvalues stay fp64): half the memory for all layers' spectra."""
    return {k: Spectrum(v.eigvals, v.eigvecs.float(), v.lift.float(), v.unlift.float()) for k, v in spec.items()}


def fit_factors_layerwise(runner, view: AttentionView, cfg, batches: list[torch.Tensor],
                          progress: bool = True) -> LatentFit:
    """`fit_factors` one decoder layer at a time: Fishers by a layer-by-layer backward, then one forward pass
    in which each layer's spectra are computed as soon as its Gram matrix is complete (the Gram and the
    layer's weights freed at once). q projections are not kept (`save_latent_streaming` copies them)."""
    if needs_probe(cfg, view):
        raise ValueError("KL-probe sensitivity needs the whole model in memory (use fit_factors on a model)")
    tree = runner.model
    get = runner.reader.get
    names = runner.reader.shapes()
    rope = {"inv_freq": _inv_freq(tree, view), "context": cfg.calib.seqlen}
    damping = cfg.damping
    fishers: list = [None] * view.num_layers
    if cfg.metric == "fisher":
        from .latent_fisher import kv_output_fishers_layerwise

        fishers, _ = kv_output_fishers_layerwise(runner, view, batches[:cfg.sensitivity_samples], progress)
        damping = max(damping, 1e-2)
    tokens = sum(int(b.numel()) for b in batches)
    spectra: list = [None] * view.num_layers
    extras: list = [None] * view.num_layers

    def on_layer(i: int, grams: list) -> None:
        w = attention_weights_from(lambda n: get(n) if n in names else None, view, i)
        scaling = _scaling(tree, view, i)
        spec = layer_spectra(w, view, grams[i], tokens, cfg.metric, scaling, damping, fisher=fishers[i], **rope)
        if cfg.joint_kv:
            jw = (1.0, 1.0) if cfg.metric == "fisher" and cfg.allocation == "sensitivity" else \
                (1 / max(spec["k"].eigvals.sum().item(), 1e-30), 1 / max(spec["v"].eigvals.sum().item(), 1e-30))
            spec = layer_spectra(w, view, grams[i], tokens, cfg.metric, scaling, damping, joint_weights=jw,
                                 fisher=fishers[i], **rope)
        spectra[i] = _compact(spec)
        extras[i] = _layer_extras(w, keep_q=False)
        grams[i] = None
        fishers[i] = None

    attention_input_grams(runner, view, batches, progress=progress, after_layer=on_layer)
    sensitivity = [[1.0, 1.0] for _ in range(view.num_layers)] \
        if cfg.metric == "fisher" and cfg.allocation == "sensitivity" else []
    return _allocate_and_factor(view, cfg, spectra, extras, sensitivity, [], tokens)


def _allocate_and_factor(view: AttentionView, cfg, spectra: list[dict[str, Spectrum]],
                         extras: list[dict[str, torch.Tensor]], sensitivity: list[list[float]],
                         measured: list[list[float]], tokens: int) -> LatentFit:
    """Widths from the global budget (uniform or by sensitivity-scaled eigenvalues), then each layer's factors."""
    width = view.kv_width
    joint_cap = min(2 * width, view.hidden_size)
    uniform, total = _budget(cfg, view)
    full = {i % view.num_layers for i in cfg.keep_full_layers}
    widths: list[tuple[int, int]] = [(0, 0)] * view.num_layers
    for i in full:
        widths[i] = (joint_cap, 0) if cfg.joint_kv else (width, width)
    rest = [i for i in range(view.num_layers) if i not in full]
    budget = total - sum(k + v for k, v in widths)
    if full and budget < len(rest) * cfg.min_rank * (1 if cfg.joint_kv else 2):
        from ..errors import UserError

        raise UserError(f"keep_full_layers {sorted(full)} alone use more than the KV budget; "
                        "raise --kv-ratio/--rank or keep fewer layers full")
    if not sensitivity:
        if full and rest:
            uniform = budget // (len(rest) * (1 if cfg.joint_kv else 2))
        for i in rest:
            widths[i] = (min(uniform, joint_cap), 0) if cfg.joint_kv else (uniform, uniform)
    elif cfg.joint_kv:
        lists = [{"gain": spectra[i]["kv"].eigvals} for i in rest]
        ranks = allocate(lists, budget, [joint_cap] * len(rest), cfg.min_rank)
        for i, r in zip(rest, ranks):
            widths[i] = (r, 0)
    else:
        lists, caps = [], []
        for i in rest:
            for j, kind in enumerate("kv"):
                lists.append({"gain": spectra[i][kind].eigvals.clamp_min(0) * sensitivity[i][j]})
                caps.append(width)
        ranks = allocate(lists, budget, caps, cfg.min_rank)
        for n, i in enumerate(rest):
            widths[i] = (ranks[2 * n], ranks[2 * n + 1])

    factors = []
    for i, (rk, rv) in enumerate(widths):
        if cfg.joint_kv:
            down, up = spectra[i]["kv"].factors(rk)
            factors.append({"kv_latent": down, "k_proj": up[:width], "v_proj": up[width:]})
        else:
            dk, uk = spectra[i]["k"].factors(rk)
            dv, uv = spectra[i]["v"].factors(rv)
            factors.append({"k_latent": dk, "k_proj": uk, "v_latent": dv, "v_proj": uv})
        factors[-1].update(extras[i])
    frac = sum(k + v for k, v in widths) / (2 * width * view.num_layers)
    return LatentFit([tuple(map(int, w)) for w in widths], cfg.joint_kv, factors, frac, tokens, measured)


def latent_config_dict(config: dict[str, Any], fit: LatentFit) -> dict[str, Any]:
    """config.json of the latent folder: the base config plus the latent layout."""
    out = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    out.update({
        "model_type": "kvconvert_latent",
        "base_model_type": config["model_type"],
        "architectures": ["KVLatentForCausalLM"],
        "kvconvert_latent": {
            "kv_widths": [list(w) for w in fit.widths],
            "joint_kv": fit.joint,
            "cache_layout": "per layer keys/values Tensor[batch, 1, tokens, width] of pre-RoPE latents",
            "format_version": 1,
        },
    })
    return out


def _state_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if name.endswith(".bias") else f"{prefix}.{name}.weight"


def build_latent_model(base, view: AttentionView, config: dict[str, Any], fit: LatentFit):
    """A latent model in memory holding the base model's weights plus the factors (fp32, eval mode)."""
    from ..runtime.latent import register
    from ..runtime.latent.config import KVLatentConfig
    from ..runtime.latent.modeling import latent_class_for

    register()
    lconf = KVLatentConfig(**latent_config_dict(config, fit))
    lconf._attn_implementation = base.config._attn_implementation
    dtype = next(base.parameters()).dtype
    model = latent_class_for(lconf.base_model_type)(lconf).to(dtype)
    names = view.names
    drop = {names.q, names.k, names.v, names.qkv} - {None}
    state = {}
    for key, value in base.state_dict().items():
        parts = key.rsplit(".", 2)
        if len(parts) == 3 and parts[1] in drop and any(parts[0] == view.layer_prefix(i) for i in range(view.num_layers)):
            continue
        state[key] = value
    for i, tensors in enumerate(fit.factors):
        pre = view.layer_prefix(i)
        for name, t in tensors.items():
            state[_state_name(pre, name)] = t.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not _tied(model, m)]
    if missing or unexpected:
        raise RuntimeError(f"latent model state mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval()


def _tied(model, name: str) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and name.endswith("lm_head.weight")


def save_latent(model, source, folder: Path, cfg, fit: LatentFit) -> None:
    """Weights (shared tensors once) in the source's dtype, latent config.json, tokenizer/side files."""
    from ..io import ShardedWriter, copy_side_files, parse_size
    from ..io.writer import write_json

    config = source.config_dict()
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        str(config.get("dtype") or config.get("torch_dtype")), torch.float32)
    writer = ShardedWriter(folder, parse_size(cfg.max_shard_size))
    seen = set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen or _tied(model, name):
            continue
        seen.add(t.data_ptr())
        writer.add(name, t.detach().to(dtype))
    writer.finish()
    copy_side_files(source.path, folder, skip=("config.json",))
    write_json(folder / "config.json", latent_config_dict(config, fit))


def save_latent_streaming(source, folder: Path, cfg, fit: LatentFit, view: AttentionView,
                          progress: bool = False) -> int:
    """The latent folder written from the checkpoint reader, never from an in-memory model: every base tensor
    the latent model keeps is copied as bytes (`ShardedWriter.add_slice`), each layer's K/V projections (and a
    fused qkv) are dropped, the factors are added in the source's dtype. Returns the bytes written."""
    from ..io import ShardedWriter, copy_side_files, parse_size
    from ..io.safetensors_check import read_header
    from ..io.writer import FileSlice, write_json

    config = source.config_dict()
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        str(config.get("dtype") or config.get("torch_dtype")), torch.float32)
    reader = source.reader()
    names = reader.shapes()
    lookup = lambda n: reader.get(n) if n in names else None  # noqa: E731
    drop: set[str] = set()
    new: dict[str, torch.Tensor] = {}
    for i, tensors in enumerate(fit.factors):
        pre = view.layer_prefix(i)
        if view.fused_qkv:
            drop |= {f"{pre}.{view.names.qkv}.weight", f"{pre}.{view.names.qkv}.bias"}
            w = attention_weights_from(lookup, view, i)
            new[f"{pre}.q_proj.weight"] = w.q
            if w.q_bias is not None:
                new[f"{pre}.q_proj.bias"] = w.q_bias
        else:
            drop |= {f"{pre}.{view.names.k}.weight", f"{pre}.{view.names.v}.weight"}
        for name, t in tensors.items():
            full = _state_name(pre, name)
            if full not in names or full in drop:  # unchanged base tensors (q, biases) are copied below
                new[full] = t
    writer = ShardedWriter(folder, parse_size(cfg.max_shard_size), metadata={"kvconvert": "fit_latent"})
    if reader.format == "safetensors":
        for f in reader.files:
            writer.flush()
            header = read_header(f)
            with open(f, "rb") as fh:
                data_start = 8 + int.from_bytes(fh.read(8), "little")
            for name in sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0]):
                if name in drop:
                    continue
                info = header[name]
                start, stop = info["data_offsets"]
                writer.add_slice(name, FileSlice(f, data_start + start, stop - start, info["dtype"], info["shape"]))
    else:
        for name, t in reader.iter_tensors():
            if name not in drop:
                writer.add(name, t)
    writer.flush()
    for name, t in tqdm(new.items(), desc="latent factors", disable=not progress, leave=False):
        writer.add(name, t.detach().to(dtype).contiguous())
    writer.finish()
    copy_side_files(source.path, folder, skip=("config.json",))
    write_json(folder / "config.json", latent_config_dict(config, fit))
    return writer.total_bytes
