"""Engine decode speed (GPU): tokens/s and ms/step for a dense vs a sparse (sink + window) policy at 8K and
32K context, and the KV memory the Runner allocates. Needs TensorRT-RTX on an SM80/86/89/120 GPU (not Hopper)
or enterprise TensorRT, and a model whose ONNX export reaches the context (default: SmolLM2-135M, RoPE
extrapolated; speed, not quality, is measured).

    python benchmarks/engine_decode.py [--model builtin:smollm2-135m] [--contexts 8192 32768]
        [--policy sink_window:sink=64,window=2048] [--steps 64] [--out runs/engine_decode]

Writes a table (stdout + results.json) and results.png. Not run in CI (no GPU there).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def measure(engine_dir: Path, context: int, steps: int) -> dict:
    import torch

    from kvconvert.export.engine import Runner

    runner = Runner(engine_dir)
    cache = runner.empty_cache(1)
    kv_bytes = sum(c.numel() * c.element_size() for c in cache)
    prompt = context - steps - 1
    ids = torch.randint(0, int(runner.meta["vocab_size"]), (1, 1), device="cuda")
    # fill the cache by claiming `prompt` tokens are present (decode cost depends on positions read, not content)
    length = torch.tensor([prompt], device="cuda")
    for _ in range(3):
        runner.step(ids, length[:, None].clone(), length.clone(), cache)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step_len = length + i
        runner.step(ids, step_len[:, None].clone(), step_len.clone(), cache)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"context": context, "ms_per_step": 1e3 * seconds / steps, "tokens_per_s": steps / seconds,
            "kv_bytes_allocated": kv_bytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--policy", default="sink_window:sink=64,window=2048")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--backend", default="tensorrt-rtx")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--out", default="runs/engine_decode")
    args = p.parse_args()

    from kvconvert.export.engine import EngineConfig, export_engine
    from kvconvert.export.onnx import OnnxExportConfig, export_onnx

    out = Path(args.out)
    rows = []
    for context in args.contexts:
        for name, policy in (("dense", None), ("sparse", args.policy)):
            onnx_dir, engine_dir = out / f"onnx-{name}-{context}", out / f"engine-{name}-{context}"
            if not (onnx_dir / "model.onnx").is_file():
                export_onnx(args.model, OnnxExportConfig(dtype=args.dtype, max_context=context, policy=policy,
                                                         validate=False, logits="last"), onnx_dir, overwrite=True)
            if not (engine_dir / "model.plan").is_file():
                export_engine(onnx_dir, EngineConfig(backend=args.backend, opt_prefill=128, max_prefill=512),
                              engine_dir, overwrite=True)
            rows.append({"policy": name, **measure(engine_dir, context, args.steps)})
            print(f"{name:7s} ctx {context:6d}: {rows[-1]['ms_per_step']:.2f} ms/step, "
                  f"{rows[-1]['tokens_per_s']:.1f} tok/s, KV {rows[-1]['kv_bytes_allocated'] / 2**20:.0f} MiB")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("dense", "sparse"):
        pts = [r for r in rows if r["policy"] == name]
        ax.plot([r["context"] for r in pts], [r["ms_per_step"] for r in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("ms / decode step")
    ax.set_title("engine decode step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)


if __name__ == "__main__":
    main()
