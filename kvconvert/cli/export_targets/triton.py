"""kvconvert export triton ENGINE_OR_ONNX_DIR --repo DIR --name NAME: a Triton Inference Server repository."""

from __future__ import annotations

from pathlib import Path


def register(sub, common) -> None:
    p = sub.add_parser("triton", parents=[common], help="Triton model repository from an engine or ONNX folder",
                       description="Write NAME/config.pbtxt + NAME/1/model.plan (engine folder), the streaming "
                                   "generation model NAME_generate (Python backend) and a README.")
    p.add_argument("src", metavar="ENGINE_OR_ONNX_DIR")
    p.add_argument("--repo", required=True, metavar="DIR", help="repository folder (must be empty or absent)")
    p.add_argument("--name", default=None, help="engine model name (kvmodel); the generator is NAME_generate")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--instances", type=int, default=None, help="instances per model (1)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default generation length (64)")
    p.add_argument("--generate-backend", choices=["onnxruntime", "engine"], default=None,
                   help="what NAME_generate runs (ONNX folder: onnxruntime; engine folder: engine)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...export.triton import TritonRepoConfig, export_triton

    cfg = TritonRepoConfig().merged({"name": args.name, "instances": args.instances,
                                     "max_new_tokens": args.max_new_tokens,
                                     "generate_backend": args.generate_backend})
    res = export_triton(Path(args.src), cfg, Path(args.repo), overwrite=args.overwrite)
    for name in res.metrics["triton"]["models"]:
        print(res.out / name / "config.pbtxt")
    print(res.out / "README.md")
    return 0
