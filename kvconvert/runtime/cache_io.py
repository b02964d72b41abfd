"""Passing a KV cache into a transformers model and reading it back, across the 5.24 rename to `cache`."""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.lru_cache(maxsize=None)
def _cache_kwarg(forward_type: type) -> str:
    params = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def with_cache(model, cache) -> dict[str, Any]:
    """Keyword arguments that hand `cache` to `model(...)`: `cache=` (transformers >= 5.24) or `past_key_values=`."""
    return {_cache_kwarg(type(model)): cache}


def cache_of(output) -> Any:
    """The cache a model call returned (`output.cache`, or `output.past_key_values` before 5.24)."""
    return output["cache"] if "cache" in output.keys() else output.past_key_values
