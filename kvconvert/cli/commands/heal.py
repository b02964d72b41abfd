"""kvconvert heal STUDENT --teacher SRC --out DIR (--steps N | --minutes M): distil a converted model back
towards the model it came from; writes a normal checkpoint with provenance. Runs unchanged under
`torchrun --nproc-per-node N -m kvconvert heal ...` (FSDP or DDP, --parallel); `--plan` prints the memory each
device will need (from config.json only) and exits."""

from __future__ import annotations

import json
import os

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
    p.add_argument("--parallel", choices=["auto", "none", "ddp", "fsdp"], default=None,
                   help="data parallelism under torchrun: fsdp shards student and teacher (FSDP2), ddp replicates "
                        "them; auto = fsdp when WORLD_SIZE > 1, else none")
    p.add_argument("--autocast", choices=["none", "bf16"], default=None,
                   help="bf16 autocast for both forwards, fp32 master weights and AdamW state (none)")
    p.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute each decoder layer in backward instead of keeping its activations")
    p.add_argument("--kd-chunk", type=int, default=None, metavar="T",
                   help="compute the KD loss T tokens at a time (fp32 log-probabilities for T tokens only; 0 = all)")
    p.add_argument("--plan", action="store_true",
                   help="print the per-device memory plan for these settings (from config.json) and exit")
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="with --plan: the number of processes to plan for (default WORLD_SIZE, else 1)")
    add_output_flags(p)
    add_eval_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ...convert.heal_pass import HealPassConfig, heal_model, heal_plan
    from ...errors import UserError

    flags = {"teacher": args.teacher, "steps": args.steps, "minutes": args.minutes, "lr": args.lr,
             "seqlen": args.seqlen, "batch": args.batch, "trainable": args.trainable,
             "hidden_weight": args.hidden_weight, "seed": args.seed, "save_every": args.save_every,
             "device": args.device, "parallel": args.parallel, "autocast": args.autocast,
             "activation_checkpointing": args.activation_checkpointing, "kd_chunk": args.kd_chunk,
             "calib": {"source": args.calib} if args.calib else None, "max_shard_size": args.max_shard_size,
             "evaluate": False if args.no_eval else None, "eval": {"text": args.eval_text} if args.eval_text else None}
    cfg = HealPassConfig.parse({k: v for k, v in flags.items() if v is not None})
    if args.plan:
        if args.world_size is not None and args.world_size < 1:
            raise UserError(f"--world-size {args.world_size}: must be at least 1")
        plan = heal_plan(args.model, cfg, args.world_size)  # config.json only: no weights needed
        print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.line())
        return 0
    if args.world_size is not None:
        raise UserError("--world-size is for --plan only; under torchrun the world size is WORLD_SIZE")
    result = heal_model(open_source(args), cfg, args.out, overwrite=args.overwrite, resume=args.resume,
                        progress=not getattr(args, "quiet", False))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 reports
        return 0
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
