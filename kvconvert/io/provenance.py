"""`kvconvert.json`: what an output folder is, where it came from and what was measured on it."""

from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any

from .._version import __version__
from .json_file import write_json

FILENAME = "kvconvert.json"


def read(folder: Path) -> dict[str, Any] | None:
    f = Path(folder) / FILENAME
    return json.loads(f.read_text()) if f.is_file() else None


def new_record(source: dict[str, Any], parent: dict[str, Any] | None = None) -> dict[str, Any]:
    """A record for an output derived from `source`; passes of a kvconvert-made input are inherited."""
    return {
        "tool": "kvconvert",
        "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "platform": platform.platform()},
        "source": source,
        "passes": list(parent.get("passes", [])) if parent else [],
        "metrics": {},
    }


def add_pass(record: dict[str, Any], name: str, params: dict[str, Any], seconds: float,
             metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    record["passes"].append({"pass": name, "params": params, "seconds": round(seconds, 3),
                             "metrics": metrics or {}})
    if metrics:
        record["metrics"].update(metrics)
    return record


def write(folder: Path, record: dict[str, Any]) -> Path:
    return write_json(Path(folder) / FILENAME, record)


def update_metrics(folder: Path, metrics: dict[str, Any]) -> None:
    """Merge measured figures into an existing folder's record (used by `eval`)."""
    record = read(folder)
    if record is None:
        return
    record.setdefault("metrics", {}).update(metrics)
    write(folder, record)
