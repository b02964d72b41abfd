"""kvconvert heal STUDENT --teacher SRC --out DIR (--steps N | --minutes M): distil a converted model back
towards the model it came from; writes a normal checkpoint with provenance."""

from __future__ import annotations

import json

from ..options import add_eval_flags, add_output_flags, add_source_flags, open_source


def register(sub, common) -> None:
    p = sub.add_parser(
        "heal", parents=[common], help="distil a converted model towards its source (after any conversion)",
        description="Knowledge-distillation healing: the student (STUDENT, e.g. an mha-to-gqa or fit-latent "
                    "output) is trained to match the teacher's next-token distributions (KL) and, with "
                    "--hidden-weight, every layer's hidden state. Only attention weights train unless "
                    "--trainable all. Stops after --steps or --minutes (whichever first when both are given).")
    add_source_flags(p)
    p.add_argument("--teacher", required=True, metavar="SRC", help="the model the student was converted from")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="optimizer steps")
    p.add_argument("--minutes", type=float, default=None, metavar="M", help="wall-time budget")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (5e-4)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per healing sequence (256)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (2)")
    p.add_argument("--trainable", choices=["attention", "all"], default=None, help="what trains (attention)")
    p.add_argument("--hidden-weight", type=float, default=None,
                   help="weight of the per-layer hidden-state matching beside the logit KL (0)")
    p.add_argument("--calib", metavar="SRC", default=None, help="healing text (builtin:pydoc-topics)")
    p.add_argument("--seed", type=int, default=None, help="window sampling seed (0)")
    p.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="save the resumable state (trainable weights, optimizer, data position) every N steps "
                        "in DIR.heal-state")
    p.add_argument("--resume", action="store_true", help="continue an interrupted heal from DIR.heal-state")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="where both models run (auto)")
    add_output_flags(p)
    add_eval_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ...convert.heal_pass import HealPassConfig, heal_model

    flags = {"teacher": args.teacher, "steps": args.steps, "minutes": args.minutes, "lr": args.lr,
             "seqlen": args.seqlen, "batch": args.batch, "trainable": args.trainable,
             "hidden_weight": args.hidden_weight, "seed": args.seed, "save_every": args.save_every,
             "device": args.device,
             "calib": {"source": args.calib} if args.calib else None, "max_shard_size": args.max_shard_size,
             "evaluate": False if args.no_eval else None, "eval": {"text": args.eval_text} if args.eval_text else None}
    cfg = HealPassConfig.parse({k: v for k, v in flags.items() if v is not None})
    result = heal_model(open_source(args), cfg, args.out, overwrite=args.overwrite, resume=args.resume,
                        progress=not getattr(args, "quiet", False))
    m = result.metrics
    if args.json:
        print(json.dumps({"out": str(result.out), **{k: v for k, v in m.items() if k != "losses"}}, indent=2,
                         default=str))
        return 0
    h = m["heal"]
    print(f"wrote {result.out}: {h['steps']} steps in {h['seconds']:.1f} s ({h['tokens_per_second']:,.0f} tokens/s), "
          f"loss {h['first_loss']:.4f} -> {h['last_loss']:.4f}")
    if "eval" in m:
        print(f"perplexity {m['eval']['perplexity']:.3f} vs teacher {m['baseline_eval']['perplexity']:.3f} "
              f"(x{m['perplexity_ratio']:.3f}) on {m['eval']['eval_text']}")
    return 0
