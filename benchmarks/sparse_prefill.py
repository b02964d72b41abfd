"""Block-sparse causal prefill time against density, relative to our own dense path in the same run.

CPU (default when no GPU): dense = torch SDPA (causal), sparse = `block_sparse_prefill_reference` over a
`select_blocks(..., density=d)` selection. GPU: dense = `block_sparse_prefill` with every causal block
(`all_blocks`), SDPA (flash) as the outside baseline, sparse = the same kernel on the selection.
r = kept blocks / causal blocks; speedup = t_dense / (t_select + t_attn); limit = 1 / (r + t_select/t_dense).

    python benchmarks/sparse_prefill.py --contexts 8192,16384,32768 --densities 1,0.5,0.25,0.125,0.0625
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import bench, efficiency, plot

from kvconvert.kernels import (
    all_blocks,
    block_importance,
    block_sparse_prefill,
    block_sparse_prefill_reference,
    select_blocks,
)


def run(args) -> list[dict]:
    device, dtype = args.device, getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for ctx in args.contexts:
        q = torch.randn(1, args.heads, ctx, args.head_dim, device=device, dtype=dtype, generator=gen)
        k = torch.randn(1, args.kv_heads, ctx, args.head_dim, device=device, dtype=dtype, generator=gen)
        v = torch.randn(1, args.kv_heads, ctx, args.head_dim, device=device, dtype=dtype, generator=gen)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                        enable_gqa=True)
        if device == "cuda":
            full = all_blocks(1, args.kv_heads, ctx, ctx, args.tile, device)
            t_dense = bench(lambda: block_sparse_prefill(q, k, v, *full.args()), args.repeats, device=device)
            t_sdpa = bench(sdpa, args.repeats, device=device)
            attn = block_sparse_prefill
        else:
            t_dense = bench(sdpa, args.repeats)
            t_sdpa = None
            attn = block_sparse_prefill_reference
        causal = float(all_blocks(1, 1, ctx, ctx, args.tile).counts.sum())
        for d in args.densities:
            def select():
                return select_blocks(block_importance(q, k, args.tile), ctx, ctx, args.tile, mass=None, density=d,
                                     sink_blocks=1, local_blocks=1)

            sel = select()
            r = float(sel.counts.double().sum()) / (causal * args.kv_heads)
            t_select = bench(select, args.repeats, device=device)
            t_attn = bench(lambda: attn(q, k, v, *sel.args()), args.repeats, device=device)
            row = {"context": ctx, "density": d, "r": r, "t_dense_ms": t_dense * 1e3, "t_select_ms": t_select * 1e3,
                   "t_attn_ms": t_attn * 1e3, **efficiency(t_dense, t_select, t_attn, r)}
            if t_sdpa is not None:
                row["t_sdpa_ms"], row["dense_vs_sdpa"] = t_sdpa * 1e3, t_dense / t_sdpa
            rows.append(row)
            print(f"ctx {ctx:>6}  density {d:<7.4g} r {r:5.3f}  dense {row['t_dense_ms']:9.1f} ms  select "
                  f"{row['t_select_ms']:7.1f} ms  attn {row['t_attn_ms']:9.1f} ms  speedup {row['speedup']:5.2f}  "
                  f"limit {row['limit']:5.2f}  efficiency {row['efficiency']:4.2f}"
                  + (f"  sdpa {row['t_sdpa_ms']:.2f} ms" if t_sdpa is not None else ""), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 16384, 32768])
    p.add_argument("--densities", type=lambda s: [float(x) for x in s.split(",")],
                   default=[1, 0.5, 0.25, 0.125, 0.0625])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float16 on GPU, float32 on CPU by default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    print(f"block-sparse prefill, device {args.device}, {args.dtype}, heads {args.heads}/{args.kv_heads}, "
          f"head_dim {args.head_dim}, tile {args.tile}")
    rows = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot(rows, "r", "context", args.plot, f"block-sparse prefill ({args.device})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
