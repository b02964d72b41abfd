"""kvconvert eval MODEL: held-out perplexity, KV bytes/token, parameters; beside a baseline if given."""

from __future__ import annotations

import json

from ..options import add_source_flags, open_source


def register(sub, common) -> None:
    p = sub.add_parser("eval", parents=[common], help="perplexity and KV size, optionally against a baseline",
                       description="Perplexity on held-out text (default: the GPL-3 text, first 2048 tokens in "
                                   "chunks of 512), KV bytes/token and parameter count.")
    add_source_flags(p)
    p.add_argument("--baseline", metavar="MODEL", help="a second model to compare against")
    p.add_argument("--text", default=None, help="evaluation text source (default builtin:gpl3)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens scored (2048)")
    p.add_argument("--chunk", type=int, default=None, help="tokens per independently scored chunk (512)")
    p.add_argument("--kv-dtype", default=None, choices=["fp32", "fp16", "bf16", "fp8"])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...eval.evaluate import EvalConfig, evaluate_source, format_eval
    from ...io import provenance, resolve_source

    cfg = EvalConfig().merged({"text": args.text, "max_tokens": args.max_tokens, "chunk": args.chunk,
                               "kv_dtype": args.kv_dtype})
    source = open_source(args)
    progress = not getattr(args, "quiet", False)
    rows = [evaluate_source(source, cfg, progress)]
    if args.baseline:
        base = resolve_source(args.baseline, allow_pickle=args.allow_pickle,
                              trust_remote_code=args.trust_remote_code)
        rows.append(evaluate_source(base, cfg, progress))
    if source.kind == "folder":
        provenance.update_metrics(source.path, {"eval": rows[0]})
    print(json.dumps(rows if args.baseline else rows[0], indent=2) if args.json else format_eval(rows))
    return 0
