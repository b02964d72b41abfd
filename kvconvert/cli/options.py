"""Flags shared by several subcommands, so every command spells them the same way."""

from __future__ import annotations

import argparse


def add_source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="HF folder, .gguf file, hub id, or builtin:smollm2-135m")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin pickle weights (loaded with weights_only=True)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")


class _Overwrite(argparse.Action):
    """--overwrite (True) and --overwrite-foreign ("foreign") share `args.overwrite`; the stronger one wins."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, False) != "foreign":
            setattr(namespace, self.dest, self.const)


def _out_folder(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty (an unset shell variable?); name the output folder")
    return text


def add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", type=_out_folder,
                   help="output folder (must be empty or absent)")
    p.add_argument("--overwrite", action=_Overwrite, nargs=0, const=True, default=False,
                   help="replace an output folder holding a previous kvconvert output of the same kind (the "
                        "files removed are listed); refused if it holds files kvconvert did not write")
    p.add_argument("--overwrite-foreign", dest="overwrite", action=_Overwrite, nargs=0, const="foreign",
                   help="like --overwrite, and also delete files kvconvert did not write in that folder (never "
                        "the current or home folder)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")


def add_calib_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", metavar="SRC", default=None,
                   help="calibration text: .txt/.jsonl/.parquet, hf:NAME[:CONFIG][:SPLIT], "
                        "builtin:pydoc-topics (default)")
    p.add_argument("--calib-samples", type=int, default=None, help="number of calibration sequences (8)")
    p.add_argument("--calib-seqlen", type=int, default=None, help="tokens per calibration sequence (512)")
    p.add_argument("--seed", type=int, default=None, help="calibration sampling seed (0)")


def open_source(args: argparse.Namespace):
    from ..io import resolve_source

    return resolve_source(args.model, allow_pickle=getattr(args, "allow_pickle", False),
                          trust_remote_code=getattr(args, "trust_remote_code", False))


def add_heal_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heal-steps", type=int, default=None, metavar="N", help="KD healing steps (0)")
    p.add_argument("--heal-lr", type=float, default=None, help="healing AdamW learning rate")
    p.add_argument("--heal-seqlen", type=int, default=None, help="tokens per healing sequence")
    p.add_argument("--heal-batch", type=int, default=None, help="sequences per healing step")
    p.add_argument("--heal-trainable", choices=["attention", "all"], default=None,
                   help="which parameters healing trains (attention)")


def add_placement_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device-map", choices=["auto", "balanced", "balanced_low_0", "sequential"], default=None,
                   help="spread the reference model over GPUs, CPU RAM and disk with accelerate (models larger "
                        "than memory)")
    p.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="with --device-map: memory per device, e.g. 0=70GiB,cpu=16GiB")
    p.add_argument("--offload-folder", default=None, help="with --device-map: where weights that fit nowhere go "
                                                          "(default: a temporary folder)")
    p.add_argument("--reference-dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="precision of the reference model in memory (fp32)")


def placement_fields(args: argparse.Namespace) -> dict:
    """The `placement` mapping of a pass config from the placement flags (unset flags omitted)."""
    from ..errors import UserError

    memory = None
    if args.max_memory:
        try:
            memory = dict(item.split("=", 1) for item in args.max_memory.split(","))
        except ValueError:
            raise UserError(f"--max-memory '{args.max_memory}' is not DEV=SIZE,...; e.g. 0=70GiB,cpu=16GiB") from None
    fields = {"device_map": args.device_map, "max_memory": memory, "offload_folder": args.offload_folder,
              "dtype": args.reference_dtype}
    return {k: v for k, v in fields.items() if v is not None}


def add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default=None,
                   help="where the layer-by-layer passes run (auto: cuda when present)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer folder for a checkpoint that has none (evaluation and calibration)")


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-eval", action="store_true", help="skip the before/after perplexity measurement")
    p.add_argument("--eval-text", default=None, help="held-out evaluation text (builtin:gpl3)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def pass_fields(args: argparse.Namespace) -> dict:
    """The calibration, healing, output and evaluation fields every calibrated pass config shares.

    Flags left unset are omitted so the config's defaults (or a recipe's values) stay in force.
    """
    calib = {k: v for k, v in {"source": args.calib, "samples": args.calib_samples, "seqlen": args.calib_seqlen,
                                "seed": args.seed}.items() if v is not None}
    heal = {k: v for k, v in {"steps": args.heal_steps, "lr": args.heal_lr, "seqlen": args.heal_seqlen,
                               "batch": args.heal_batch, "trainable": args.heal_trainable,
                               "seed": args.seed}.items() if v is not None}
    if args.calib:
        heal["calib"] = {"source": args.calib}
    fields = {"calib": calib, "heal": heal, "max_shard_size": args.max_shard_size,
              "evaluate": False if args.no_eval else None,
              "eval": {k: v for k, v in {"text": args.eval_text, "device": getattr(args, "device", None),
                                         "tokenizer": getattr(args, "tokenizer", None)}.items() if v} or None}
    return {k: v for k, v in fields.items() if v is not None}


def add_pass_flags(p: argparse.ArgumentParser, placement: bool = False) -> None:
    """The flags a calibrated conversion pass takes beside its own: output, calibration, healing, (reference
    placement), device and evaluation, in that order in --help."""
    add_output_flags(p)
    add_calib_flags(p)
    add_heal_flags(p)
    if placement:
        add_placement_flags(p)
    add_device_flags(p)
    add_eval_flags(p)


def pass_config(cls, args: argparse.Namespace, **own):
    """`cls` (a pass's StrictConfig) from the pass's `own` fields and the shared flags (`pass_fields`, --device);
    unset flags (None) are omitted so the config's defaults stay in force."""
    flags = {**own, "device": args.device, **pass_fields(args)}
    return cls.parse({k: v for k, v in flags.items() if v is not None})


def run_pass(call, cfg, args: argparse.Namespace):
    """`call(MODEL, cfg, --out, overwrite=..., progress=...)`, the library pass; with --json the result's
    metrics are printed as JSON and None is returned, else the PassResult (the command prints its summary)."""
    import json

    result = call(open_source(args), cfg, args.out, overwrite=args.overwrite,
                  progress=not getattr(args, "quiet", False))
    if args.json:
        print(json.dumps({"out": str(result.out), **result.metrics}, indent=2, default=str))
        return None
    return result
