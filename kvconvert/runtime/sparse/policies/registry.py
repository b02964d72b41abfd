"""The one registry of sparse-attention policies, and the class every policy derives from.

A policy is one `Policy` subclass in one file of this package, decorated with `@register_policy`: its
fields (typed, strict, with the `kind` discriminator used in YAML and CLI specs), its selection (calling
`kvconvert.kernels`), its KV-read formula and its ONNX node attributes. The runtime
(`runtime/sparse/execute.py`), the recipe layer (`recipe/sparse_read.py`, the `sparse_policy` step) and the
ONNX exporter (`export/onnx/policy.py`) only call the methods below, and the discriminated unions that
`SparsePolicy` validates against are rebuilt from this registry whenever a policy is (un)registered.

Tensor shapes: q [B, H, S, D] (post-RoPE), k/v [B, Hkv, L, D] (the whole cache, the S new tokens last);
decode receives the single query q1 [B, H, D] and returns [B, H, D].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, TypeVar, Union

from pydantic import Field

from ....config import StrictConfig

PHASES = ("decode", "prefill")
_POLICIES: dict[str, type[Policy]] = {}
_ON_CHANGE: list[Callable[[], None]] = []
P = TypeVar("P", bound="type[Policy]")


class Policy(StrictConfig):
    """One sparse-attention policy. Subclasses declare `kind: Literal["<name>"] = "<name>"` and their fields.

    Class attributes: `phases` (which of decode / prefill it may run), `onnx_lowering` (the name of the ONNX
    function-body lowering its node attributes need, looked up by name in `export/onnx/function_body.py`;
    None = not exportable), `context_multiple_label` (what `onnx_context_multiple` counts, for errors).
    """

    phases: ClassVar[tuple[str, ...]] = PHASES
    onnx_lowering: ClassVar[str | None] = None
    context_multiple_label: ClassVar[str] = ""
    kind: str

    @classmethod
    def policy_kind(cls) -> str:
        return cls.model_fields["kind"].default

    def at_layer(self, layer: int) -> Policy:
        """The policy layer `layer` runs (dense for the layers in `dense_layers`, if the policy has them)."""
        if layer in getattr(self, "dense_layers", ()):
            return policy_class("dense")()
        return self

    def check_pair(self, decode: Policy, prefill: Policy) -> None:
        """Raise ValueError when this policy cannot run beside the other phase's policy (default: it can)."""

    def key_summary_page(self) -> int | None:
        """Page size of the per-page key min/max summaries a decode step needs (None: none)."""
        return None

    def decode_read(self, context: int) -> int:
        """Cached tokens one decode step reads at a context of `context` tokens (the KV-read formula)."""
        return context

    def decode(self, q1, k, v, seq_lens, scale: float, pages, use_kernels: bool):
        """One decode step: q1 [B, H, D], seq_lens int32 [B], pages (kmin, kmax) [B, Hkv, P, D] or None
        -> [B, H, D]."""
        raise NotImplementedError(f"policy '{self.kind}' has no decode phase")

    def prefill(self, q, k, v, scale: float, use_kernels: bool):
        """S > 1 new tokens, causal: q [B, H, S, D] -> (out [B, H, S, D], read, total) where read / total is
        the share of the causal attention this step computed (in the policy's own unit)."""
        raise NotImplementedError(f"policy '{self.kind}' has no prefill phase")

    def onnx_attributes(self, phase: str) -> dict[str, Any]:
        """KVAttention node attributes of this policy in `phase`, without the `policy_` prefix."""
        return {phase: self.kind, f"{phase}_sink": 0, f"{phase}_window": 0}

    def onnx_context_multiple(self) -> int:
        """The exported `max_context` must be a multiple of this (1: no constraint)."""
        return 1

    def validate_length(self) -> int:
        """Prompt length at which the export's validation exercises the policy."""
        return 0


def register_policy(cls: P) -> P:
    """Class decorator: make `cls` a known policy (specs, YAML, recipes, the runtime and the exporter)."""
    kind = cls.policy_kind()
    if not kind or kind in _POLICIES:
        raise RuntimeError(f"sparse policy kind {kind!r} registered twice or without a name")
    unknown = set(cls.phases) - set(PHASES)
    if unknown or not cls.phases:
        raise RuntimeError(f"sparse policy '{kind}': phases must be a non-empty subset of {PHASES}")
    _POLICIES[kind] = cls
    _changed()
    return cls


def unregister_policy(kind: str) -> None:
    """Forget a registered policy (tests register toy policies and remove them again)."""
    del _POLICIES[kind]
    _changed()


def on_registry_change(callback: Callable[[], None]) -> None:
    """Call `callback` after every (un)registration (the container configs rebuild their unions)."""
    _ON_CHANGE.append(callback)


def _changed() -> None:
    for callback in _ON_CHANGE:
        callback()


def policy_kinds(phase: str | None = None) -> list[str]:
    return [k for k, c in _POLICIES.items() if phase is None or phase in c.phases]


def policy_class(kind: str) -> type[Policy]:
    return _POLICIES[kind]


def exportable_kinds() -> list[str]:
    return [k for k, c in _POLICIES.items() if c.onnx_lowering is not None]


def phase_classes(phase: str) -> tuple[type[Policy], ...]:
    return tuple(_POLICIES[k] for k in policy_kinds(phase))


def phase_union(phase: str) -> Any:
    """The pydantic type of one phase's policy: the registered classes of that phase, discriminated on kind."""
    classes = phase_classes(phase)
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[classes], Field(discriminator="kind")]  # noqa: UP007 (a runtime tuple of classes)
