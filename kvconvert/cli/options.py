"""Flags shared by several subcommands, so every command spells them the same way."""

from __future__ import annotations

import argparse


def add_source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="HF folder, .gguf file, hub id, or builtin:smollm2-135m")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin pickle weights (loaded with weights_only=True)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")


def add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
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
