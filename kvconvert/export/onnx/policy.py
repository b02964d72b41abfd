"""Bind a sparse attention policy to the export: node attributes per layer and the PyTorch reference.

Exportable: `dense` and `sink_window` (either phase, per-layer overrides). The ONNX function body
reproduces the selection rule of `kvconvert.kernels` (key j visible from position t iff j <= t and
(j < sink or t - j < window)); layers with the model's own sliding window or soft-capping stay dense,
as in `kvconvert.sparse`. `page_topk` and `block_sparse_prefill` are refused with a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ...errors import UserError
from ...models import AttentionView

EXPORTABLE = ("dense", "sink_window")


@dataclass
class PolicyBinding:
    """`spec`: the policy as given (None = dense); `layer_attributes[i]`: node attributes for layer i
    (`policy`, `policy_{decode,prefill}`, `policy_{phase}_sink`, `policy_{phase}_window`); `context(model)`:
    a context manager under which the PyTorch model computes the same selection (None = stock attention)."""

    spec: str | None
    resolved: dict[str, Any] | None = None
    layer_attributes: list[dict[str, Any]] = field(default_factory=list)
    context: Callable[[Any], Any] | None = None

    def reference(self, model):
        if self.context is None:
            return None
        return lambda: self.context(model)


def _phase_attributes(phase: str, policy) -> dict[str, Any]:
    if policy.kind not in EXPORTABLE:
        raise UserError(f"policy '{policy.kind}' cannot be exported to ONNX yet (exportable: "
                        f"{', '.join(EXPORTABLE)}); export with --policy sink_window:... or without --policy")
    sink, window = (policy.sink, policy.window) if policy.kind == "sink_window" else (0, 0)
    return {phase: policy.kind, f"{phase}_sink": int(sink), f"{phase}_window": int(window)}


def bind_policy(spec: str | None, view: AttentionView) -> PolicyBinding:
    if not spec or spec == "dense":
        return PolicyBinding(None, None, [{} for _ in range(view.num_layers)])
    from ...runtime.sparse import parse_policy_spec, sparse

    policy = parse_policy_spec(spec)
    layers = []
    for i in range(view.num_layers):
        lp = policy.for_layer(i)
        layers.append({"kind": policy.name, **_phase_attributes("decode", lp.decode),
                       **_phase_attributes("prefill", lp.prefill)})
    return PolicyBinding(str(spec), policy.model_dump(), layers, lambda model: sparse(model, policy, use_kernels=False))
