"""kvconvert mha-to-gqa MODEL --groups G --out DIR: fewer KV heads, same architecture, stock-transformers loadable."""

from __future__ import annotations

from ..options import add_pass_flags, add_source_flags, pass_config, placement_fields, run_pass


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
    add_pass_flags(p, placement=True)
    p.set_defaults(func=run)


def run(args) -> int:
    from ...convert.gqa import GQAConfig, mha_to_gqa

    cfg = pass_config(GQAConfig, args, groups=args.groups, method=args.method, grouping=args.grouping,
                      align=args.align, placement=placement_fields(args) or None)
    result = run_pass(mha_to_gqa, cfg, args)
    if result is None:
        return 0
    m = result.metrics
    kv = m["kv_bytes_per_token"]
    print(f"wrote {result.out}: {m['kv_heads'][0]} -> {m['kv_heads'][1]} KV heads ({cfg.method}), "
          f"KV {kv[0]:,} -> {kv[1]:,} bytes/token")
    if "eval" in m and "baseline_eval" in m:
        print(f"perplexity {m['baseline_eval']['perplexity']:.3f} -> {m['eval']['perplexity']:.3f} "
              f"(x{m['perplexity_ratio']:.3f}) on {m['eval']['eval_text']}")
    return 0
