"""`SparsePolicy`: a model's policy for decode and prefill, with per-layer overrides.

The `decode` / `prefill` fields accept every registered policy of that phase (a discriminated union on
`kind`, rebuilt from the registry whenever a policy is registered, so a new policy is valid in recipes,
YAML files and CLI specs at once).
"""

from __future__ import annotations

from typing import Optional, Union

from pydantic import Field, model_validator

from ....config import StrictConfig
from .dense import DensePolicy
from .registry import Policy, on_registry_change, phase_classes, phase_union


class LayerPolicy(StrictConfig):
    """What one layer runs: `decode` for one-token steps, `prefill` for several new tokens."""

    decode: phase_union("decode") = Field(default_factory=DensePolicy)
    prefill: phase_union("prefill") = Field(default_factory=DensePolicy)

    @model_validator(mode="after")
    def _check(self) -> LayerPolicy:
        for p in (self.decode, self.prefill):
            p.check_pair(self.decode, self.prefill)
        return self


class LayerOverride(StrictConfig):
    decode: Optional[phase_union("decode")] = None  # noqa: UP045 (built at run time from the registry)
    prefill: Optional[phase_union("prefill")] = None  # noqa: UP045


class SparsePolicy(StrictConfig):
    """A model's sparse attention: defaults for all layers + `layers: {index: {decode/prefill: ...}}`."""

    decode: phase_union("decode") = Field(default_factory=DensePolicy)
    prefill: phase_union("prefill") = Field(default_factory=DensePolicy)
    layers: dict[int, LayerOverride] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> SparsePolicy:
        LayerPolicy(decode=self.decode, prefill=self.prefill)
        for i in self.layers:
            self.for_layer(i)
        return self

    def for_layer(self, layer: int) -> LayerPolicy:
        """The layer's override (if any), then each phase policy's own per-layer rule (`dense_layers`)."""
        o = self.layers.get(layer)
        decode: Policy = o.decode if o and o.decode is not None else self.decode
        prefill: Policy = o.prefill if o and o.prefill is not None else self.prefill
        return LayerPolicy(decode=decode.at_layer(layer), prefill=prefill.at_layer(layer))

    def phase_policies(self) -> list[Policy]:
        """Every phase policy named anywhere (defaults and overrides)."""
        named = [self.decode, self.prefill, *[p for o in self.layers.values() for p in (o.decode, o.prefill)]]
        return [p for p in named if p is not None]

    @property
    def name(self) -> str:
        """Short label, e.g. `page_topk` or `page_topk+block_sparse_prefill`."""
        kinds = [self.decode.kind] + ([self.prefill.kind] if self.prefill.kind != self.decode.kind else [])
        kinds = [k for k in kinds if k != "dense"] or ["dense"]
        return "+".join(kinds)

    @property
    def is_dense(self) -> bool:
        return self.name == "dense" and not self.layers


def _rebuild() -> None:
    """Point the phase fields at the registry's current classes and rebuild the validators (inner first)."""
    for cls in (LayerPolicy, LayerOverride, SparsePolicy):
        for phase in ("decode", "prefill"):
            field = cls.model_fields[phase]
            if cls is LayerOverride:
                field.annotation = Optional[phase_union(phase)]  # noqa: UP045
            else:
                classes = phase_classes(phase)
                field.annotation = Union[classes]  # noqa: UP007 (a run-time tuple of classes)
                field.discriminator = "kind" if len(classes) > 1 else None
        cls.model_rebuild(force=True)


on_registry_change(_rebuild)
