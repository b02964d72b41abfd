"""What every pass's library call returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PassResult:
    """`out`: the finished output folder; `metrics`: measured figures (also in its kvconvert.json)."""

    out: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
