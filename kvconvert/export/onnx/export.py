"""`export_onnx`: one decoder graph (prefill and decode) with KV cache buffers and kvconvert attention nodes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ...errors import PassFailed, UserError
from ...io import PassResult, atomic_output_dir, copy_side_files, provenance, resolve_source
from ...io.sources import ModelSource
from ...models import AttentionView, describe, dtype_bytes
from .attention_op import DOMAIN
from .cache_layout import CacheLayout, cache_layout
from .config import OnnxExportConfig
from .graph import attach_metadata, save_and_check, trace_to_onnx
from .policy import PolicyBinding, bind_policy
from .standard_attention import RECORD as STANDARD_RECORD
from .standard_attention import check_standard, lower_to_standard
from .wrapper import DecoderStep

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_MAX_CONTEXT = 4096


def _source(model: Any) -> ModelSource:
    return model if isinstance(model, ModelSource) else resolve_source(model)


def _special_tokens(source: ModelSource, config: dict[str, Any]) -> dict[str, Any]:
    gen_file = source.path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    return {k: gen.get(k, config.get(k)) for k in ("eos_token_id", "bos_token_id")}


def graph_metadata(view: AttentionView, layout: CacheLayout, cfg: OnnxExportConfig, max_context: int,
                   vocab_size: int, tokens: dict[str, Any], attributes: list[dict[str, Any]],
                   policy: PolicyBinding, lowerings: list[str] | None = None) -> dict[str, Any]:
    """The `kvconvert` metadata_props JSON (INTERFACES.md); `cache` lists the buffers (names, heads, widths)."""
    inputs, outputs = layout.io_names()
    cache = layout.metadata(dtype_bytes(cfg.dtype))
    latent = {"latent": {"joint_kv": layout.kind == "joint_latent", "kv_widths": [list(w) for w in view.widths()]}} \
        if layout.latent else {}
    return {
        "format": "kvconvert-onnx-decoder/1", "model_type": view.model_type,
        "num_layers": view.num_layers, "num_heads": view.num_heads, "num_kv_heads": view.num_kv_heads,
        "head_dim": view.head_dim, "hidden_size": view.hidden_size, "max_context": max_context,
        "dtype": cfg.dtype, "vocab_size": vocab_size, **tokens, "policy": policy.spec,
        "policy_resolved": policy.resolved, "opset": cfg.resolved_opset(),
        "logits": cfg.logits, "inputs": inputs, "outputs": outputs,
        "cache_layout": layout.describe(), "cache": cache, "kv_bytes_per_token": cache["bytes_per_token"], **latent,
        "attention": {"mode": cfg.attention, **(STANDARD_RECORD if cfg.attention == "standard" else
                                                {"domain": DOMAIN, "op_type": layout.op_type,
                                                 "runtime": cfg.runtime, "lowerings": lowerings or []}),
                      "attributes": attributes[0], "per_layer": attributes},
    }


def export_onnx(model: Any, cfg: OnnxExportConfig | None = None, out: str | Path = "onnx", *,
                overwrite: bool = False, progress: bool = True) -> PassResult:
    """Export `model` (path / spec / ModelSource) to `out`/model.onnx; validates in ONNX Runtime unless
    `cfg.validate` is False (PassFailed above tolerance, nothing written). Returns PassResult(out, metrics)."""
    cfg = cfg or OnnxExportConfig()
    source = _source(model)
    config = source.config_dict()
    view = describe(config)
    layout = cache_layout(view, config)
    max_context = cfg.max_context or min(view.max_position_embeddings or DEFAULT_MAX_CONTEXT, DEFAULT_MAX_CONTEXT)
    if max_context < 2:
        raise UserError(f"--max-context {max_context} is too small; use at least 2")
    policy = bind_policy(cfg.policy, view, max_context)
    opset = cfg.resolved_opset()
    if cfg.attention == "standard":
        check_standard(opset, policy.page_topk, policy.block_sparse)
    dtype = TORCH_DTYPES[cfg.dtype]
    out = Path(out)
    from .footprint import check_export_fits

    check_export_fits(source, cfg.dtype, out, cfg.validate)
    started = time.perf_counter()
    stages = ["load", "trace", "check"] + (["validate"] if cfg.validate else [])
    bar = _progress(stages, progress)
    with atomic_output_dir(out, overwrite, inputs=(source.path,)) as tmp:
        bar.set_description("load")
        torch_model = source.load_model(dtype=dtype)
        bar.update()
        bar.set_description("trace")
        step = DecoderStep(torch_model, view, layout, logits=cfg.logits, policy_attributes=policy.layer_attributes)
        graph = trace_to_onnx(step, max_context, dtype, opset, tmp / "model.onnx", page_topk=policy.page_topk,
                              block_sparse=policy.block_sparse, fused=cfg.runtime == "onnxruntime")
        lowerings = [n.overload for n in graph.graph.node if n.domain == DOMAIN and n.overload]
        if cfg.attention == "standard" and layout.latent:
            from .latent_standard import lower_latent_to_standard

            lower_latent_to_standard(graph, view.rope.rotary_dim)
        elif cfg.attention == "standard":
            lower_to_standard(graph, max_context)
        vocab = int(torch_model.get_output_embeddings().weight.shape[0])
        attach_metadata(graph, graph_metadata(view, layout, cfg, max_context, vocab,
                                              _special_tokens(source, config), step.attributes, policy,
                                              lowerings))
        bar.update()
        bar.set_description("check")
        weights = sum(p.numel() * p.element_size() for p in torch_model.parameters())
        external = cfg.external_data == "always" or (
            cfg.external_data == "auto" and weights > cfg.external_threshold_mb * 2**20)
        info = save_and_check(graph, tmp, external)
        del graph
        copy_side_files(source.path, tmp)
        export_seconds = time.perf_counter() - started
        bar.update()
        metrics: dict[str, Any] = {"export_seconds": round(export_seconds, 2), **info, "max_context": max_context}
        if cfg.validate:
            bar.set_description("validate")
            steps = min(cfg.validate_decode_steps, max(0, max_context - 2))
            prompt = max(1, min(max(cfg.validate_prompt_len, policy.min_validate_len), max_context - steps))
            found = _validate(tmp, torch_model, prompt, steps, policy)
            found["tolerance"] = cfg.resolved_tolerance()
            found["scaled_max_abs_diff"] = found["max_abs_diff"] / max(1.0, found["logit_scale"])
            found["passed"] = found["scaled_max_abs_diff"] <= found["tolerance"]
            metrics["validation"] = found
            bar.update()
            if not found["passed"]:
                raise PassFailed(f"ONNX Runtime logits differ from PyTorch by {found['max_abs_diff']:.3g} "
                                 f"(/ max(1, max|logit|={found['logit_scale']:.3g}) > tolerance "
                                 f"{found['tolerance']:.3g}; prefill "
                                 f"{found['prefill_max_abs_diff']:.3g}, decode {found['decode_max_abs_diff']:.3g})")
        bar.close()
        record = provenance.new_record(source.provenance(), provenance.read(source.path))
        provenance.add_pass(record, "export_onnx", {**cfg.model_dump(), "max_context": max_context, "opset": opset},
                            time.perf_counter() - started, {"onnx": metrics})
        provenance.write(tmp, record)
    return PassResult(out=out.resolve(), metrics=metrics, record=record)


def _validate(folder: Path, model, prompt: int, steps: int, policy: PolicyBinding) -> dict[str, Any]:
    from .validate import compare_with_torch

    try:
        return compare_with_torch(folder, model, prompt_len=prompt, decode_steps=steps,
                                  reference=policy.reference(model))
    except PassFailed:
        raise
    except Exception as exc:  # ONNX Runtime without kernels for this dtype, etc.
        hint = " (this ONNX Runtime has no kernel for an op in this dtype, e.g. bf16 on CPU)" \
            if "NOT_IMPLEMENTED" in str(exc) else ""
        raise PassFailed(f"validation could not run ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                         f"pass --no-validate to export without it{hint}") from exc


def _progress(stages: list[str], enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=len(stages), disable=not enabled, unit="stage", leave=False)


__all__ = ["export_onnx", "graph_metadata"]
