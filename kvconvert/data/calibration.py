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
    """The whole text of `source`; `UserError` unless it is readable UTF-8 text (`check_text`)."""
    if source == "builtin:pydoc-topics":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    if source == "builtin:gpl3":
        return (TEXTS / "gpl-3.0.txt").read_text()
    if source.startswith("hf:"):
        return check_text(_hub_dataset(source[3:]), source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"text source not found: {source} (a .txt/.jsonl/.parquet file, hf:NAME, "
                        "builtin:pydoc-topics or builtin:gpl3)")
    if path.suffix == ".jsonl":
        return check_text("\n\n".join(_jsonl_texts(path)), source)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("reading .parquet needs pyarrow: pip install pyarrow") from None
        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types for damaged files
            raise UserError(f"{source} is not a readable parquet file ({str(exc).splitlines()[0][:120]})") from None
        if "text" not in table.column_names:
            raise UserError(f"{source}: no 'text' column (columns: {', '.join(table.column_names)})")
        return check_text("\n\n".join(str(t) for t in table.column("text").to_pylist()), source)
    return check_text(decode_text(path.read_bytes(), source), source)


def decode_text(raw: bytes, where: str) -> str:
    """Strict UTF-8 (a BOM is dropped); `UserError` naming the line of the first byte that is not text."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UserError(f"{where} is not UTF-8 text (byte {exc.start}, line {line}); calibration and evaluation "
                        "need plain text: pass a .txt/.jsonl/.parquet file of text") from None


def check_text(text: str, where: str) -> str:
    """`text` itself; `UserError` if it is empty or looks binary (NUL bytes or over 1% control characters)."""
    if not text.strip():
        raise UserError(f"{where} holds no text; pass a file with some text in it")
    control = sum(1 for c in text if (c < " " and c not in "\n\r\t\f\v") or c == "\x7f")
    if "\x00" in text or control > 0.01 * len(text):
        raise UserError(f"{where} looks binary ({control} control characters in {len(text)}), not text; "
                        "pass a .txt/.jsonl/.parquet file of text")
    return text


def _jsonl_texts(path: Path) -> list[str]:
    """The `text` field of every line; `UserError` naming file:line of the first bad one."""
    texts = []
    for n, line in enumerate(decode_text(path.read_bytes(), str(path)).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: not valid JSON ({exc.msg}, column {exc.colno}); each line of a .jsonl "
                            "file is one object with a 'text' field") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f"{path}:{n}: needs a 'text' field holding a string, e.g. {{\"text\": \"...\"}}")
        texts.append(row["text"])
    return texts


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
