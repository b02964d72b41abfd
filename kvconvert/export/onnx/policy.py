"""Bind a sparse attention policy to the export: node attributes per layer and the PyTorch reference.

Every registered policy whose class names an `onnx_lowering` exports (built in: `dense`, `sink_window`,
`page_topk`, `block_sparse_prefill`), with per-layer overrides. Each policy gives its own node attributes
(`Policy.onnx_attributes`); the ONNX function body reproduces the selection rules of `kvconvert.kernels`
(sink_window: key j visible from position t iff j <= t and (j < sink or t - j < window); page_topk:
`select_pages` on per-page key min/max; block_sparse_prefill: `block_importance` + `select_blocks`); layers
with the model's own sliding window or soft-capping stay dense, as in `kvconvert.sparse`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import UserError
from ...models import AttentionView


@dataclass
class PolicyBinding:
    """`spec`: the policy as given (None = dense); `layer_attributes[i]`: node attributes for layer i
    (`policy`, `policy_{decode,prefill}`, `policy_{phase}_sink`, `policy_{phase}_window`, ...); `lowerings`: the
    `onnx_lowering` names the layers' policies need in the function body; `context(model)`: a context manager
    under which the PyTorch model computes the same selection (None = stock attention)."""

    spec: str | None
    resolved: dict[str, Any] | None = None
    layer_attributes: list[dict[str, Any]] = field(default_factory=list)
    context: Callable[[Any], Any] | None = None
    min_validate_len: int = 0
    lowerings: frozenset[str] = frozenset()

    @property
    def page_topk(self) -> bool:
        return "page_topk" in self.lowerings

    @property
    def block_sparse(self) -> bool:
        return "block_sparse_prefill" in self.lowerings

    def reference(self, model):
        if self.context is None:
            return None
        return lambda: self.context(model)


def phase_attributes(phase: str, policy) -> dict[str, Any]:
    """The node attributes (without the `policy_` prefix) of `policy` run in `phase`."""
    if policy.onnx_lowering is None:
        from ...runtime.sparse.policies import exportable_kinds

        raise UserError(f"policy '{policy.kind}' cannot be exported to ONNX yet (exportable: "
                        f"{', '.join(exportable_kinds())}); export with --policy sink_window:... or without --policy")
    return policy.onnx_attributes(phase)


def bind_policy(spec: str | None, view: AttentionView, max_context: int) -> PolicyBinding:
    if not spec or spec == "dense":
        return PolicyBinding(None, None, [{} for _ in range(view.num_layers)])
    from ...runtime.sparse import parse_policy_spec, sparse

    policy = parse_policy_spec(spec)
    layers, lowerings = [], set()
    for i in range(view.num_layers):
        lp = policy.for_layer(i)
        layers.append({"kind": policy.name, **phase_attributes("decode", lp.decode),
                       **phase_attributes("prefill", lp.prefill)})
        for p in (lp.decode, lp.prefill):
            lowerings.add(p.onnx_lowering)
            size = p.onnx_context_multiple()
            if max_context % size:
                raise UserError(f"--max-context {max_context} is not a multiple of the "
                                f"{p.context_multiple_label} {size}; use e.g. {-(-max_context // size) * size}")
    longest = max(p.validate_length() for p in policy.phase_policies())
    return PolicyBinding(str(spec), policy.model_dump(), layers,
                         lambda model: sparse(model, policy, use_kernels=False), longest, frozenset(lowerings))
