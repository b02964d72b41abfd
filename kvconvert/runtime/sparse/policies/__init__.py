"""Sparse-attention policies: one module per policy, all registered in `registry` (see docs/architecture.md
"Adding a sparse policy"). Every module of this package other than the infrastructure below is imported
here, so a new policy file registers itself without an edit anywhere else.
"""

import importlib
import pkgutil

from .registry import (
    Policy,
    exportable_kinds,
    on_registry_change,
    phase_union,
    policy_class,
    policy_kinds,
    register_policy,
    unregister_policy,
)

_INFRASTRUCTURE = {"registry", "layered", "spec"}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _INFRASTRUCTURE:
        importlib.import_module(f".{_module}", __name__)

from .block_sparse_prefill import BlockSparsePrefillPolicy  # noqa: E402
from .dense import DensePolicy  # noqa: E402
from .layered import LayerOverride, LayerPolicy, SparsePolicy  # noqa: E402
from .page_topk import PageTopKPolicy  # noqa: E402
from .sink_window import SinkWindowPolicy  # noqa: E402
from .spec import parse_policy_spec  # noqa: E402

__all__ = ["BlockSparsePrefillPolicy", "DensePolicy", "LayerOverride", "LayerPolicy", "PageTopKPolicy", "Policy",
           "SinkWindowPolicy", "SparsePolicy", "exportable_kinds", "on_registry_change", "parse_policy_spec",
           "phase_union", "policy_class", "policy_kinds", "register_policy", "unregister_policy"]
