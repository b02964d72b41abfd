"""kvconvert export engine ONNX_DIR --out DIR: a TensorRT / TensorRT-RTX plan with the KVAttention plugin."""

from __future__ import annotations

from pathlib import Path


def register(sub, common) -> None:
    p = sub.add_parser("engine", parents=[common], help="TensorRT / TensorRT-RTX engine from an ONNX export",
                       description="Build model.plan from a `kvconvert export onnx` folder (prefill + decode "
                                   "optimization profiles, kvconvert::KVAttention bound to our plugin; a "
                                   "--attention standard export needs no plugin).")
    p.add_argument("onnx_dir", metavar="ONNX_DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--backend", choices=["tensorrt-rtx", "tensorrt"], default=None, help="(tensorrt-rtx)")
    p.add_argument("--max-batch", type=int, default=None, help="largest batch in the profiles (1)")
    p.add_argument("--opt-batch", type=int, default=None, help="batch the kernels are tuned for (max)")
    p.add_argument("--max-prefill", type=int, default=None, help="longest prompt chunk (the ONNX max_context)")
    p.add_argument("--opt-prefill", type=int, default=None, help="prompt length the kernels are tuned for (128)")
    p.add_argument("--compute-capabilities", default=None, help="TensorRT-RTX targets, e.g. SM86,SM89")
    p.add_argument("--plugin", choices=["python", "aot"], default=None,
                   help="python: IPluginV3 (needs kvconvert in the serving process); aot: embedded PTX (tensorrt)")
    p.add_argument("--decompose-attention", action="store_true", default=None,
                   help="build standard ONNX Attention from unfused layers (needed for an fp32 export; slower)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...export.engine import EngineConfig, export_engine

    ccs = args.compute_capabilities.split(",") if args.compute_capabilities else None
    cfg = EngineConfig().merged({"backend": args.backend, "max_batch": args.max_batch, "opt_batch": args.opt_batch,
                                 "max_prefill": args.max_prefill, "opt_prefill": args.opt_prefill,
                                 "compute_capabilities": ccs, "plugin": args.plugin,
                                 "decompose_attention": args.decompose_attention})
    res = export_engine(Path(args.onnx_dir), cfg, Path(args.out), overwrite=args.overwrite,
                        progress=not getattr(args, "quiet", False))
    print(f"{res.out / 'model.plan'}  ({res.metrics['engine']['plan_bytes']} bytes, "
          f"{res.metrics['engine']['build_seconds']} s)")
    return 0
