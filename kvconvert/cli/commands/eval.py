"""kvconvert eval MODEL: held-out perplexity, KV bytes/token, parameters; beside a baseline if given."""

from __future__ import annotations

import json

from ..options import add_device_flags, add_source_flags, open_source


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
    p.add_argument("--out", default=None, metavar="DIR", help="write eval.json (metrics + provenance) here; the "
                                                               "input folder is never written to")
    add_device_flags(p)
    g = p.add_argument_group("needle in a haystack (sparse attention)")
    g.add_argument("--needle", action="store_true",
                   help="passkey retrieval at several lengths/depths, dense and each --policy (instead of perplexity)")
    g.add_argument("--policy", action="append", default=[], metavar="SPEC",
                   help="sparse policy, e.g. page_topk:page=16,keep=0.25 or sink_window:sink=4,window=256, "
                        "or a YAML file (repeatable)")
    g.add_argument("--lengths", default=None, help="comma-separated prompt lengths in tokens (1024,2048,4096)")
    g.add_argument("--depths", default=None, help="comma-separated needle depths in [0,1] (0.1,0.3,0.5,0.7,0.9)")
    g.add_argument("--trials", type=int, default=None, help="passkeys per cell (1)")
    g.add_argument("--plot", default="needle.png", metavar="PNG", help="heatmap path (needle.png)")
    p.set_defaults(func=run)


def _numbers(text, cast, flag):
    from ...errors import UserError

    if text is None:
        return None
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated numbers, got '{text}'") from None


def run_needle_command(args) -> int:
    from ...eval.needle import NeedleConfig, check_needle_fits, format_needle, plot_needle, run_needle
    from ...io import provenance

    cfg = NeedleConfig().merged({"lengths": _numbers(args.lengths, int, "--lengths"),
                                 "depths": _numbers(args.depths, float, "--depths"), "trials": args.trials})
    source = open_source(args)
    check_needle_fits(source, cfg)
    progress = not getattr(args, "quiet", False)
    model = source.load_model()
    result = run_needle(model, source.load_tokenizer(), cfg, args.policy, progress)
    result["model"] = source.spec
    if args.plot:
        result["plot"] = str(plot_needle(result, args.plot))
    if source.kind == "folder":
        provenance.update_metrics(source.path, {"needle": {k: result[k] for k in
                                                           ("lengths", "depths", "scores", "retrieval",
                                                            "kv_read_fraction", "specs")}})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_needle(result))
        if args.plot:
            print(f"heatmap: {result['plot']}")
    return 0


def run(args) -> int:
    if args.needle:
        return run_needle_command(args)
    if args.policy:
        from ...errors import UserError

        raise UserError("--policy applies to --needle; add --needle")
    from ...eval.evaluate import EvalConfig, evaluate, evaluate_source, format_eval
    from ...io import resolve_source

    cfg = EvalConfig().merged({"text": args.text, "max_tokens": args.max_tokens, "chunk": args.chunk,
                               "kv_dtype": args.kv_dtype, "device": args.device, "tokenizer": args.tokenizer})
    source = open_source(args)
    progress = not getattr(args, "quiet", False)
    rows = [evaluate(source, cfg, args.out, progress=progress).metrics["eval"]]
    if args.baseline:
        base = resolve_source(args.baseline, allow_pickle=args.allow_pickle,
                              trust_remote_code=args.trust_remote_code)
        rows.append(evaluate_source(base, cfg, progress))
    print(json.dumps(rows if args.baseline else rows[0], indent=2) if args.json else format_eval(rows))
    return 0
