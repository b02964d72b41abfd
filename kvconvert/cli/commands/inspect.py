"""kvconvert inspect MODEL: attention view, parameter count, KV size and what-if tables."""

from __future__ import annotations

import json

from ..options import add_source_flags, open_source


def register(sub, common) -> None:
    p = sub.add_parser("inspect", parents=[common], help="show a model's attention layout and KV cache size",
                       description="Show the normalized attention view, parameter count, KV bytes per token, "
                                   "KV GiB at a context and batch, and what-if tables for GQA and latent KV.")
    add_source_flags(p)
    p.add_argument("--context", type=int, default=32768, help="context length for the GiB figures (32768)")
    p.add_argument("--batch", type=int, default=8, help="batch size for the GiB figures (8)")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16", "fp8"], help="KV cache dtype")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...errors import UserError
    from ...eval.inspect_report import format_inspect, inspect_source

    if args.context < 1 or args.batch < 1:
        raise UserError("--context and --batch must be positive")
    report = inspect_source(open_source(args), args.context, args.batch, args.dtype)
    print(json.dumps(report, indent=2) if args.json else format_inspect(report))
    return 0
