"""JSON files kvconvert writes (config.json, kvconvert.json, eval.json ...): one format for all of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: Any) -> Path:
    """`data` as indented JSON (non-JSON values as their str) with a final newline; parent folders made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path
