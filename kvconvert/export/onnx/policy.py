"""Bind a sparse attention policy to the export: node attributes per layer and the PyTorch reference.

Every policy kind exports (`dense`, `sink_window`, `page_topk`, `block_sparse_prefill`), with per-layer
overrides. The ONNX function body reproduces the selection rules of `kvconvert.kernels` (sink_window: key j
visible from position t iff j <= t and (j < sink or t - j < window); page_topk: `select_pages` on per-page
key min/max; block_sparse_prefill: `block_importance` + `select_blocks`); layers with the model's own sliding
window or soft-capping stay dense, as in `kvconvert.sparse`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import UserError
from ...models import AttentionView

EXPORTABLE = ("dense", "sink_window", "page_topk", "block_sparse_prefill")


@dataclass
class PolicyBinding:
    """`spec`: the policy as given (None = dense); `layer_attributes[i]`: node attributes for layer i
    (`policy`, `policy_{decode,prefill}`, `policy_{phase}_sink`, `policy_{phase}_window`); `context(model)`:
    a context manager under which the PyTorch model computes the same selection (None = stock attention)."""

    spec: str | None
    resolved: dict[str, Any] | None = None
    layer_attributes: list[dict[str, Any]] = field(default_factory=list)
    context: Callable[[Any], Any] | None = None
    min_validate_len: int = 0

    @property
    def page_topk(self) -> bool:
        return any(a.get("decode_page", 0) > 0 for a in self.layer_attributes)

    @property
    def block_sparse(self) -> bool:
        return any(a.get("prefill_tile", 0) > 0 for a in self.layer_attributes)

    def reference(self, model):
        if self.context is None:
            return None
        return lambda: self.context(model)


def _phase_attributes(phase: str, policy) -> dict[str, Any]:
    if policy.kind not in EXPORTABLE:
        raise UserError(f"policy '{policy.kind}' cannot be exported to ONNX yet (exportable: "
                        f"{', '.join(EXPORTABLE)}); export with --policy sink_window:... or without --policy")
    sink, window = (policy.sink, policy.window) if policy.kind == "sink_window" else (0, 0)
    attrs = {phase: policy.kind, f"{phase}_sink": int(sink), f"{phase}_window": int(window)}
    if policy.kind == "page_topk":
        attrs.update({"decode_page": policy.page, "decode_keep": float(policy.keep),
                      "decode_budget": int(policy.budget or 0), "decode_sink_pages": policy.sink_pages,
                      "decode_recent_pages": policy.recent_pages, "decode_dense_below": policy.dense_below})
    if policy.kind == "block_sparse_prefill":
        attrs.update({"prefill_tile": policy.tile, "prefill_mass": float(policy.mass),
                      "prefill_density": float(policy.density or 0.0), "prefill_sink_blocks": policy.sink_blocks,
                      "prefill_local_blocks": policy.local_blocks, "prefill_dense_below": policy.dense_below})
    return attrs


def _min_validate_len(policy) -> int:
    """Prompt length at which validation exercises the policy (past the sink+window / dense_below)."""
    longest = 0
    for p in (policy.decode, policy.prefill, *[x for o in policy.layers.values() for x in (o.decode, o.prefill)]):
        if p is None:
            continue
        if p.kind == "sink_window":
            longest = max(longest, p.sink + p.window + 4)
        elif p.kind == "page_topk":
            longest = max(longest, p.dense_below + 2 * p.page)
        elif p.kind == "block_sparse_prefill":
            longest = max(longest, p.dense_below, 3 * p.tile)
    return longest


def bind_policy(spec: str | None, view: AttentionView, max_context: int) -> PolicyBinding:
    if not spec or spec == "dense":
        return PolicyBinding(None, None, [{} for _ in range(view.num_layers)])
    from ...runtime.sparse import parse_policy_spec, sparse

    policy = parse_policy_spec(spec)
    layers = []
    for i in range(view.num_layers):
        lp = policy.for_layer(i)
        layers.append({"kind": policy.name, **_phase_attributes("decode", lp.decode),
                       **_phase_attributes("prefill", lp.prefill)})
        for key, what in (("decode_page", "page_topk page size"), ("prefill_tile", "block_sparse_prefill tile")):
            size = layers[-1].get(key, 0)
            if size and max_context % size:
                raise UserError(f"--max-context {max_context} is not a multiple of the {what} {size}; "
                                f"use e.g. {-(-max_context // size) * size}")
    return PolicyBinding(str(spec), policy.model_dump(), layers, lambda model: sparse(model, policy, use_kernels=False),
                         _min_validate_len(policy))
