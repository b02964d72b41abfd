"""kvconvert mha-to-gqa MODEL --groups G --out DIR: fewer KV heads, same architecture, stock-transformers loadable."""

from __future__ import annotations

import json

from ..options import add_calib_flags, add_output_flags, add_source_flags, open_source


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
                   help="calibrated only: which KV heads share a group (similarity: permute query heads)")
    add_output_flags(p)
    add_calib_flags(p)
    p.add_argument("--heal-steps", type=int, default=None, metavar="N", help="KD healing steps (0)")
    p.add_argument("--heal-lr", type=float, default=None, help="healing AdamW learning rate")
    p.add_argument("--heal-seqlen", type=int, default=None, help="tokens per healing sequence")
    p.add_argument("--heal-batch", type=int, default=None, help="sequences per healing step")
    p.add_argument("--heal-trainable", choices=["attention", "all"], default=None,
                   help="which parameters healing trains (attention)")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after perplexity measurement")
    p.add_argument("--eval-text", default=None, help="held-out evaluation text (builtin:gpl3)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...convert.gqa import GQAConfig, mha_to_gqa

    calib = {k: v for k, v in {"source": args.calib, "samples": args.calib_samples, "seqlen": args.calib_seqlen,
                                "seed": args.seed}.items() if v is not None}
    heal = {k: v for k, v in {"steps": args.heal_steps, "lr": args.heal_lr, "seqlen": args.heal_seqlen,
                               "batch": args.heal_batch, "trainable": args.heal_trainable,
                               "seed": args.seed}.items() if v is not None}
    if args.calib:
        heal["calib"] = {"source": args.calib}
    flags = {"groups": args.groups, "method": args.method, "grouping": args.grouping, "calib": calib, "heal": heal,
             "max_shard_size": args.max_shard_size, "evaluate": False if args.no_eval else None,
             "eval": {"text": args.eval_text} if args.eval_text else None}
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
    if "eval" in m:
        print(f"perplexity {m['baseline_eval']['perplexity']:.3f} -> {m['eval']['perplexity']:.3f} "
              f"(x{m['perplexity_ratio']:.3f}) on {m['eval']['eval_text']}")
    return 0
