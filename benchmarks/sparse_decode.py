"""Decode attention time against the kept fraction r, relative to our own dense path in the same run.

CPU (default when no GPU): the eager PyTorch path (dense = `dense_decode_reference`, sparse =
`paged_decode_reference` over a page_topk selection). GPU: the Triton kernels (dense = `dense_decode`,
i.e. the paged kernel with every page) plus torch SDPA as the outside baseline.
speedup = t_dense / (t_select + t_attn); limit = 1 / (r + t_select / t_dense); efficiency = speedup / limit.

    python benchmarks/sparse_decode.py --contexts 8192,32768,131072 --fractions 1,0.5,0.25,0.125,0.0625
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
    dense_decode,
    dense_decode_reference,
    page_summaries,
    paged_decode,
    paged_decode_reference,
    score_pages,
    select_pages,
)


def run(args) -> list[dict]:
    device = args.device
    dtype = getattr(torch, args.dtype)
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for ctx in args.contexts:
        shape = (args.batch, args.kv_heads, ctx, args.head_dim)
        k = torch.randn(shape, device=device, dtype=dtype, generator=gen)
        v = torch.randn(shape, device=device, dtype=dtype, generator=gen)
        q = torch.randn(args.batch, args.heads, args.head_dim, device=device, dtype=dtype, generator=gen)
        lens = torch.full((args.batch,), ctx, dtype=torch.int32, device=device)
        kmin, kmax = page_summaries(k, lens, args.page)
        if device == "cuda":
            t_dense = bench(lambda: dense_decode(q, k, v, lens, page_size=64), args.repeats, device=device)
            t_sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                q[:, :, None], k, v, enable_gqa=True), args.repeats, device=device)
            attn = paged_decode
        else:
            t_dense = bench(lambda: dense_decode_reference(q, k, v, lens), args.repeats)
            t_sdpa = None
            attn = paged_decode_reference
        pages = (ctx + args.page - 1) // args.page
        for r in args.fractions:
            keep = max(2, round(r * pages))

            def select():
                return select_pages(score_pages(q, kmin, kmax), lens, args.page, keep, 1, 1)

            sel = select()
            t_select = bench(select, args.repeats, device=device)
            t_attn = bench(lambda: attn(q, k, v, *sel.args()), args.repeats, device=device)
            row = {"context": ctx, "r": r, "pages_kept": keep, "t_dense_ms": t_dense * 1e3,
                   "t_select_ms": t_select * 1e3, "t_attn_ms": t_attn * 1e3,
                   **efficiency(t_dense, t_select, t_attn, keep / pages)}
            if t_sdpa is not None:
                row["t_sdpa_ms"] = t_sdpa * 1e3
                row["dense_vs_sdpa"] = t_dense / t_sdpa
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


def _fmt(r: dict) -> str:
    s = (f"ctx {r['context']:>7}  r {r['r']:<7.4g} dense {r['t_dense_ms']:8.3f} ms  select {r['t_select_ms']:7.3f} ms  "
         f"attn {r['t_attn_ms']:8.3f} ms  speedup {r['speedup']:6.2f}  limit {r['limit']:6.2f}  "
         f"efficiency {r['efficiency']:5.2f}")
    if "dense_vs_sdpa" in r:
        s += f"  sdpa {r['t_sdpa_ms']:.3f} ms (dense/sdpa {r['dense_vs_sdpa']:.2f})"
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]
    p.add_argument("--contexts", type=ints, default=[8192, 32768, 131072])
    p.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[1, 0.5, 0.25, 0.125, 0.0625])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float16 on GPU, float32 on CPU by default")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--plot", default=None, help="PNG of speedup vs r per context")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    print(f"decode attention, device {args.device}, {args.dtype}, batch {args.batch}, heads {args.heads}/"
          f"{args.kv_heads}, head_dim {args.head_dim}, page {args.page}")
    rows = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot(rows, "r", "context", args.plot, f"sparse decode ({args.device})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
