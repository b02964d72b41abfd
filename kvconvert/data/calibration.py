"""Calibration and evaluation text: local files, hub datasets, or built-in offline texts.

Sources (`CalibConfig.source` / `--calib` / `--text`):
- `builtin:pydoc-topics`: the English help topics in the standard library's `pydoc_data.topics`
  (calibration default; every Python has it).
- `builtin:gpl3`: the GPL-3 licence text shipped in the package (held-out evaluation default).
- a `.txt` file, a `.jsonl` file (field `text`), a `.parquet` file (column `text`).
- `hf:NAME[:CONFIG][:SPLIT]`: a Hugging Face dataset (needs `datasets` and a reachable hub).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from pydantic import Field

from ..config import StrictConfig
from ..errors import UserError

TEXTS = Path(__file__).parent / "texts"
DEFAULT_CALIB = "builtin:pydoc-topics"
DEFAULT_EVAL = "builtin:gpl3"


class CalibConfig(StrictConfig):
    """Which text to calibrate on and how much of it (samples x seqlen tokens, seeded)."""

    source: str = DEFAULT_CALIB
    samples: int = Field(8, ge=1)
    seqlen: int = Field(512, ge=8)
    seed: int = 0


def load_text(source: str) -> str:
    if source == "builtin:pydoc-topics":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    if source == "builtin:gpl3":
        return (TEXTS / "gpl-3.0.txt").read_text()
    if source.startswith("hf:"):
        return _hub_dataset(source[3:])
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"text source not found: {source} (a .txt/.jsonl/.parquet file, hf:NAME, "
                        "builtin:pydoc-topics or builtin:gpl3)")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        try:
            return "\n\n".join(r["text"] for r in rows)
        except (KeyError, TypeError):
            raise UserError(f"{source}: every JSONL line needs a 'text' field") from None
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("reading .parquet needs pyarrow: pip install pyarrow") from None
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise UserError(f"{source}: no 'text' column (columns: {', '.join(table.column_names)})")
        return "\n\n".join(str(t) for t in table.column("text").to_pylist())
    return path.read_text(errors="replace")


def _hub_dataset(spec: str) -> str:
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        import datasets
    except ImportError:
        raise UserError("hf: text sources need the datasets package: pip install 'kvconvert[data]'") from None
    try:
        ds = datasets.load_dataset(name, config, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - offline/not found look the same to the user
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"could not load dataset '{name}' from the hub ({first}); "
                        "use a local .txt/.jsonl/.parquet file or builtin:pydoc-topics") from None
    return "\n\n".join(t for t in ds["text"] if t)


def token_stream(tokenizer, text: str) -> torch.Tensor:
    """All of `text` as one 1-D LongTensor of token ids (no special tokens)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_batches(tokenizer, cfg: CalibConfig) -> list[torch.Tensor]:
    """`cfg.samples` windows of `cfg.seqlen` tokens from `cfg.source`, each a LongTensor[1, seqlen].

    Windows are non-overlapping and picked with `random.Random(cfg.seed)`, so calibration is reproducible.
    """
    ids = token_stream(tokenizer, load_text(cfg.source))
    n_windows = ids.numel() // cfg.seqlen
    if n_windows < cfg.samples:
        raise UserError(f"calibration text {cfg.source} has {ids.numel()} tokens, fewer than "
                        f"samples x seqlen = {cfg.samples} x {cfg.seqlen}; lower them or use more text")
    starts = sorted(random.Random(cfg.seed).sample(range(n_windows), cfg.samples))
    return [ids[s * cfg.seqlen:(s + 1) * cfg.seqlen].unsqueeze(0) for s in starts]


CalibrationData = Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]]


def iterate(calib: CalibrationData) -> Iterable[torch.Tensor]:
    """Calibration data may be an iterable of LongTensor[1, S] or a callable returning one."""
    return calib() if callable(calib) else calib
