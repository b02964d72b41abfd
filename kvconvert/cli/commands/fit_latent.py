"""kvconvert fit-latent MODEL --out DIR (--rank R | --kv-ratio F): low-rank latent K/V, cache stores the latent."""

from __future__ import annotations

from ..options import add_pass_flags, add_source_flags, pass_config, run_pass


def register(sub, common) -> None:
    p = sub.add_parser(
        "fit-latent", parents=[common], help="low-rank latent K/V fitted on calibration text (cache holds latents)",
        description="Factor each layer's K and V projections as latent-down x up with small inner ranks, fitted "
                    "on calibration activations (attention-weighted PCA of K/V, exact at full rank), ranks "
                    "allocated from one global budget by measured sensitivity. The output loads with "
                    "kvconvert.load_latent() or AutoModelForCausalLM after `import kvconvert`; its cache stores "
                    "the pre-RoPE latents.")
    add_source_flags(p)
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, metavar="R", help="latent width per K and per V (joint: of the KV latent)")
    size.add_argument("--kv-ratio", type=float, metavar="F", help="cached KV elements / the input's, in (0, 1]")
    p.add_argument("--joint-kv", action="store_true", default=None, help="one latent per layer for both K and V")
    p.add_argument("--allocation", choices=["uniform", "sensitivity"], default=None,
                   help="how ranks are spread across layers (sensitivity)")
    p.add_argument("--metric", choices=["fisher", "attention", "none"], default=None,
                   help="error the fit minimises: loss-weighted per layer (fisher, default), attention-logit/"
                        "output weighted (attention) or plain K/V (none)")
    p.add_argument("--keep-full-layers", type=int, nargs="+", default=None, metavar="L",
                   help="layers kept at full width (negative counts from the end, e.g. 0 -1)")
    add_pass_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ...convert.latent import LatentConfig, fit_latent

    cfg = pass_config(LatentConfig, args, rank=args.rank, kv_ratio=args.kv_ratio, joint_kv=args.joint_kv,
                      allocation=args.allocation, metric=args.metric, keep_full_layers=args.keep_full_layers)
    result = run_pass(fit_latent, cfg, args)
    if result is None:
        return 0
    m = result.metrics
    print(f"wrote {result.out}: KV cache x{m['kv_fraction']:.3f} "
          f"({m['kv_bytes_per_token'][0]:,} -> {m['kv_bytes_per_token'][1]:,} bytes/token bf16), "
          f"calibration {m['calibration_seconds']:.1f}s")
    if "eval" in m:
        print(f"perplexity {m['baseline_eval']['perplexity']:.3f} -> {m['eval']['perplexity']:.3f} "
              f"on {m['eval']['eval_text']}")
    return 0
