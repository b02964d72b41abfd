"""Architecture adapters: describe models, never act on them."""

from . import adapters  # noqa: F401  (registers the built-in adapters)
from .registry import (
    ArchitectureAdapter,
    describe,
    get_adapter,
    gqa_capable_model_types,
    register,
    registered_model_types,
)
from .view import AttentionView, ProjectionNames, RopeSpec, dtype_bytes

__all__ = [
    "ArchitectureAdapter",
    "AttentionView",
    "ProjectionNames",
    "RopeSpec",
    "describe",
    "dtype_bytes",
    "get_adapter",
    "gqa_capable_model_types",
    "register",
    "registered_model_types",
]
