"""`kvconvert` command line: maps flags onto library calls; heavy modules are imported lazily.

Each subcommand is a module in `kvconvert/cli/commands/` with `register(subparsers, common)`.
Exit codes: 0 ok, 1 failed, 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import pkgutil
import sys
import traceback

from .._version import __version__
from ..errors import PassFailed, UserError

ORDER = ["inspect", "mha_to_gqa", "fit_latent", "eval", "export", "run"]
EXAMPLES = """examples:
  kvconvert inspect builtin:smollm2-135m --context 8192 --batch 4
  kvconvert mha-to-gqa ./Llama-2-7b-hf --groups 8 --out ./llama2-7b-gqa8
  kvconvert fit-latent ./llama2-7b-gqa8 --kv-ratio 0.5 --out ./llama2-7b-latent
  kvconvert eval ./llama2-7b-gqa8 --baseline ./Llama-2-7b-hf
  kvconvert run recipes/smollm2-demo.yaml --out runs/demo

MODEL is a Hugging Face folder, a .gguf file, a hub id, or builtin:smollm2-135m.
Exit codes: 0 ok, 1 failed, 2 bad input."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _commands():
    from . import commands

    names = [m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    return [importlib.import_module(f"{commands.__name__}.{n}") for n in names]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more logging; -vv also shows tracebacks of failures")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="only warnings and errors, no progress bars")
    parser = _Parser(prog="kvconvert", parents=[common],
                     description="Shrink an LLM's KV cache offline and ship it to TensorRT / Triton.",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kvconvert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in _commands():
        module.register(sub, common)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import warnings

        warnings.filterwarnings("ignore")


@functools.lru_cache(maxsize=1)
def _parser() -> argparse.ArgumentParser:
    """Built once per process (in-process callers such as tests run many commands)."""
    return build_parser()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    verbose, quiet = getattr(args, "verbose", 0), getattr(args, "quiet", False)
    _setup_logging(verbose, quiet)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        _say(f"kvconvert: error: {_one_line(exc)}")
        return 2
    except PassFailed as exc:
        _say(f"kvconvert: failed: {_one_line(exc)}")
        return 1
    except KeyboardInterrupt:
        _say("kvconvert: interrupted; nothing was written")
        return 1
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        _close_progress_bars()
        if verbose >= 2:
            traceback.print_exc()
        msg = (str(exc).splitlines() or [""])[0]
        _say(f"kvconvert: failed: {type(exc).__name__}: {msg} (run with -vv for the traceback)")
        return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _close_progress_bars() -> None:
    """Clear progress bars an exception left open, so the error starts a line of its own."""
    bars = set()
    for module in ("tqdm.std", "tqdm.auto", "tqdm.asyncio"):
        bars.update(getattr(getattr(sys.modules.get(module), "tqdm", None), "_instances", ()) or ())
    for bar in bars:
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a broken bar must not hide the error
            pass


def _say(line: str) -> None:
    _close_progress_bars()
    print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
