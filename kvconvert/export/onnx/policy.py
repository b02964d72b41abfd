"""Bind a sparse attention policy to the export: node attributes per layer and the PyTorch reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ...errors import UserError
from ...models import AttentionView


@dataclass
class PolicyBinding:
    """`spec`: the policy as given (None = dense); `layer_attributes[i]`: the policy's fields for layer i
    (become `policy` / `policy_<field>` node attributes); `reference(model)`: a context factory under which
    the PyTorch model computes the same selection (None = stock attention)."""

    spec: str | None
    layer_attributes: list[dict[str, Any]] = field(default_factory=list)
    context: Callable[[Any], Any] | None = None

    def reference(self, model):
        if self.context is None:
            return None
        return lambda: self.context(model)


def bind_policy(spec: str | None, view: AttentionView) -> PolicyBinding:
    if not spec or spec == "dense":
        return PolicyBinding(None, [{} for _ in range(view.num_layers)])
    try:
        from ...runtime.sparse import policies  # noqa: F401
    except ImportError:
        raise UserError("sparse policies need kvconvert.runtime.sparse, which this build does not have; "
                        "export without --policy") from None
    raise UserError(f"policy '{spec}' cannot be exported to ONNX yet; export without --policy")
