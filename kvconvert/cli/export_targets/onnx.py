"""kvconvert export onnx MODEL --out DIR: decoder graph with KV cache and kvconvert attention nodes."""

from __future__ import annotations

from ..options import add_source_flags, open_source


def register(sub, common) -> None:
    p = sub.add_parser("onnx", parents=[common], help="ONNX decoder with KV cache, validated in ONNX Runtime",
                       description="Export one decoder graph (prefill and decode) with fixed-capacity per-layer KV "
                                   "buffers and one kvconvert::KVAttention node (or standard ONNX Attention ops) per "
                                   "layer; checks ONNX Runtime logits against PyTorch unless --no-validate.")
    add_source_flags(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--policy", default=None, metavar="SPEC",
                   help="sparse attention policy (e.g. page_topk:page=16,keep=0.25, or a YAML file); default dense")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="weights and cache dtype (fp32)")
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="KV buffer capacity in tokens (default: max_position_embeddings, at most 4096)")
    p.add_argument("--logits", default=None, choices=["all", "last"], help="logits for all positions or the last")
    p.add_argument("--attention", default=None, choices=["kvconvert", "standard"],
                   help="kvconvert: one kvconvert::KVAttention node per layer, every policy (default); standard: ONNX "
                        "TensorScatter + Attention ops, dense/sink_window only, engines need no plugin")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (17; 24 with --attention standard)")
    p.add_argument("--no-validate", dest="validate", action="store_false", default=None,
                   help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("--tolerance", type=float, default=None, help="allowed max|logit diff| / max(1, max|logit|) (fp32: 1e-4)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...export.onnx import OnnxExportConfig, export_onnx

    cfg = OnnxExportConfig().merged({"policy": args.policy, "dtype": args.dtype, "max_context": args.max_context,
                                     "logits": args.logits, "attention": args.attention, "opset": args.opset,
                                     "validate": args.validate, "tolerance": args.tolerance})
    result = export_onnx(open_source(args), cfg, args.out, overwrite=args.overwrite,
                         progress=not getattr(args, "quiet", False))
    m = result.metrics
    opsets = ", ".join(f"{k} {v}" for k, v in m["opset"].items())
    print(f"wrote {result.out}/model.onnx: {m['onnx_bytes'] / 2**20:.1f} MiB, opset {opsets}, "
          f"IR {m['ir_version']}, {m['export_seconds']:.1f} s")
    v = m.get("validation")
    if v:
        print(f"validation vs PyTorch (batch {v['batch']}, prefill {v['prompt_len']} + {v['decode_steps']} decode "
              f"steps): max abs logit diff {v['max_abs_diff']:.3g} (prefill {v['prefill_max_abs_diff']:.3g}, "
              f"decode {v['decode_max_abs_diff']:.3g}); relative to max|logit| {v['logit_scale']:.3g}: "
              f"{v['scaled_max_abs_diff']:.3g} (tolerance {v['tolerance']:.3g})")
    return 0
