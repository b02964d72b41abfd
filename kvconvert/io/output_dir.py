"""Write outputs into a temporary folder beside the target and rename it into place at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError


def check_target(target: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse a non-empty target (unless `overwrite`) and any target that is or contains an input."""
    target = Path(target).resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        if target == inp or inp.is_relative_to(target) or target.is_relative_to(inp):
            raise UserError(f"output {target} overlaps the input {inp}; choose another --out folder")
    if target.exists():
        if not target.is_dir():
            raise UserError(f"output {target} exists and is a file; choose another --out folder")
        if any(target.iterdir()) and not overwrite:
            raise UserError(f"output folder {target} is not empty; choose another or pass --overwrite")


@contextmanager
def atomic_output_dir(target: str | os.PathLike, overwrite: bool = False,
                      inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `target`, on any error (Ctrl-C too) it vanishes."""
    target = Path(target).resolve()
    check_target(target, overwrite, inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.kvconvert-tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.kvconvert-old-", dir=target.parent))
            target.rename(trash / "old")
            tmp.rename(target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
