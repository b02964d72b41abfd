"""kvconvert mha-to-gqa MODEL --groups G --out DIR: fewer KV heads, same architecture, stock-transformers loadable."""

from __future__ import annotations

import json

from ..options import (
    add_calib_flags,
    add_device_flags,
    add_eval_flags,
    add_heal_flags,
    add_output_flags,
    add_placement_flags,
    add_source_flags,
    open_source,
    pass_fields,
    placement_fields,
)


def register(sub, common) -> None:
    p = sub.add_parser(
        "mha-to-gqa", parents=[common], help="merge KV heads (MHA -> GQA/MQA), optionally calibrated and healed",
        description="Convert a checkpoint to G KV heads. 'mean' (default) averages each group's K/V projections "
                    "and streams shard by shard; 'calibrated' fits shared K/V per group in closed form on "
                    "calibration text and folds compensation into q_proj/o_proj; --heal-steps N then distils "
                    "the result against the original. The output records perplexity before/after.")
    add_source_flags(p)
    p.add_argument("--groups", type=int, required=True, metavar="G", help="KV heads of the output")
    p.add_argument("--method", choices=["mean", "calibrated"], default=None, help="conversion method (mean)")
    p.add_argument("--grouping", choices=["consecutive", "similarity"], default=None,
                   help="which KV heads share a group (similarity, default: chosen from the weights (mean) or "
                        "calibration statistics (calibrated), realised by permuting query heads)")
    p.add_argument("--no-align", dest="align", action="store_false", default=None,
                   help="mean: average heads as they are (default: rotate each onto its group per RoPE pair first)")
    add_output_flags(p)
    add_calib_flags(p)
    add_heal_flags(p)
    add_placement_flags(p)
    add_device_flags(p)
    add_eval_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ...convert.gqa import GQAConfig, mha_to_gqa

    flags = {"groups": args.groups, "method": args.method, "grouping": args.grouping, "align": args.align,
             "device": args.device, **pass_fields(args),
             "placement": placement_fields(args) or None}
    cfg = GQAConfig.parse({k: v for k, v in flags.items() if v is not None})
    source = open_source(args)
    result = mha_to_gqa(source, cfg, args.out, overwrite=args.overwrite, progress=not getattr(args, "quiet", False))
    m = result.metrics
    if args.json:
        print(json.dumps({"out": str(result.out), **m}, indent=2, default=str))
        return 0
    kv = m["kv_bytes_per_token"]
    print(f"wrote {result.out}: {m['kv_heads'][0]} -> {m['kv_heads'][1]} KV heads ({cfg.method}), "
          f"KV {kv[0]:,} -> {kv[1]:,} bytes/token")
    if "eval" in m and "baseline_eval" in m:
        print(f"perplexity {m['baseline_eval']['perplexity']:.3f} -> {m['eval']['perplexity']:.3f} "
              f"(x{m['perplexity_ratio']:.3f}) on {m['eval']['eval_text']}")
    return 0
