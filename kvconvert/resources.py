"""This machine's resources that passes check before loading anything (a leaf: imports nothing of kvconvert).

Callers look `available_ram` up through this module at call time (`resources.available_ram()`), so one
monkeypatch of `kvconvert.resources.available_ram` reaches every check.
"""

from __future__ import annotations


def available_ram() -> int | None:
    """MemAvailable of this machine in bytes (None where /proc/meminfo does not exist)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
