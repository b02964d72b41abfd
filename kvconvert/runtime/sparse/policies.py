"""Sparse-attention policies: typed configs (pydantic discriminated union on `kind`), per-layer overrides.

A `SparsePolicy` holds one policy for decode steps (one new query token) and one for prefill
(several new query tokens), plus per-layer overrides. `parse_policy_spec` reads the CLI/recipe
spelling `page_topk:page=16,keep=0.25` (several joined with `+`) or a YAML file.
How each policy turns into a selection is described in docs/architecture.md
("Sparse attention and kernels") and implemented in `kvconvert.kernels.selection`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, TypeAdapter, ValidationError, model_validator

from ...config import StrictConfig, closest, describe_validation_error
from ...errors import UserError


def _power_of_two(name: str, value: int) -> None:
    if value & (value - 1):
        raise ValueError(f"{name}={value} must be a power of two (the kernels tile by it)")


class DensePolicy(StrictConfig):
    """Every token attends to every earlier token (the model's own attention)."""

    kind: Literal["dense"] = "dense"


class SinkWindowPolicy(StrictConfig):
    """StreamingLLM: each query sees the first `sink` tokens and the last `window` tokens (itself included)."""

    kind: Literal["sink_window"] = "sink_window"
    sink: int = Field(4, ge=0)
    window: int = Field(1024, ge=1)


class PageTopKPolicy(StrictConfig):
    """Quest-style decode selection over pages of `page` tokens.

    Per (sequence, KV head, page) the cache keeps the element-wise min and max of the page's keys.
    The query scores each page by `sum_d max(q_d*kmin_d, q_d*kmax_d)` (max over the query heads of
    the group), the top pages are read. `sink_pages` first and `recent_pages` last pages are always
    kept. Pages kept = `ceil(budget/page)` if `budget` (tokens) is given, else `ceil(keep * pages)`.
    Contexts shorter than `dense_below` tokens and the layers in `dense_layers` stay dense.
    """

    kind: Literal["page_topk"] = "page_topk"
    page: int = Field(32, ge=16, le=64)
    keep: float = Field(0.25, gt=0.0, le=1.0)
    budget: int | None = Field(None, ge=1)
    sink_pages: int = Field(1, ge=0)
    recent_pages: int = Field(1, ge=1)
    dense_below: int = Field(512, ge=0)
    dense_layers: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> PageTopKPolicy:
        if self.page % 8:
            raise ValueError(f"page={self.page} must be a multiple of 8 tokens")
        if self.budget is not None and self.budget > self.dense_below:
            raise ValueError(
                f"budget={self.budget} tokens is larger than the shortest sparse context dense_below="
                f"{self.dense_below}: raise dense_below to at least the budget or lower the budget")
        if self.budget is not None and math.ceil(self.budget / self.page) < self.sink_pages + self.recent_pages:
            raise ValueError(f"budget={self.budget} tokens is fewer than sink_pages+recent_pages pages "
                             f"of {self.page} tokens")
        return self

    def pages_kept(self, context: int) -> int:
        """Pages read for a context of `context` tokens (all of them when dense)."""
        pages = math.ceil(context / self.page)
        if context < self.dense_below:
            return pages
        if self.budget is not None:
            if self.budget > context:
                raise UserError(f"page_topk.budget={self.budget} tokens is larger than the context "
                                f"({context} tokens); lower budget")
            k = math.ceil(self.budget / self.page)
        else:
            k = math.ceil(self.keep * pages - 1e-9)
        return min(pages, max(k, self.sink_pages + self.recent_pages))


class BlockSparsePrefillPolicy(StrictConfig):
    """Block-sparse causal prefill over tiles of `tile` query x `tile` key tokens.

    Block importance = softmax over the causal key blocks of (mean-pooled query block . mean-pooled
    key block) * scale, averaged over the query heads of a KV group. The `sink_blocks` first key
    blocks and the `local_blocks` blocks ending at the diagonal are always kept; then blocks in
    descending importance until the kept mass reaches `mass` (or, if `density` is given, until
    `ceil(density * causal blocks)` are kept). Prompts shorter than `dense_below` stay dense.
    """

    kind: Literal["block_sparse_prefill"] = "block_sparse_prefill"
    tile: int = Field(64, ge=64, le=128)
    mass: float = Field(0.95, gt=0.0, le=1.0)
    density: float | None = Field(None, gt=0.0, le=1.0)
    sink_blocks: int = Field(1, ge=0)
    local_blocks: int = Field(1, ge=1)
    dense_below: int = Field(1024, ge=0)
    dense_layers: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> BlockSparsePrefillPolicy:
        _power_of_two("tile", self.tile)
        return self


DecodePolicy = Annotated[DensePolicy | SinkWindowPolicy | PageTopKPolicy, Field(discriminator="kind")]
PrefillPolicy = Annotated[DensePolicy | SinkWindowPolicy | BlockSparsePrefillPolicy,
                          Field(discriminator="kind")]
AnyPolicy = Union[DensePolicy, SinkWindowPolicy, PageTopKPolicy, BlockSparsePrefillPolicy]
POLICY_CLASSES: dict[str, type[StrictConfig]] = {
    c.model_fields["kind"].default: c
    for c in (DensePolicy, SinkWindowPolicy, PageTopKPolicy, BlockSparsePrefillPolicy)
}


class LayerPolicy(StrictConfig):
    """What one layer runs: `decode` for one-token steps, `prefill` for several new tokens."""

    decode: DecodePolicy = Field(default_factory=DensePolicy)
    prefill: PrefillPolicy = Field(default_factory=DensePolicy)

    @model_validator(mode="after")
    def _check(self) -> LayerPolicy:
        d, p = self.decode, self.prefill
        if isinstance(d, PageTopKPolicy) and isinstance(p, BlockSparsePrefillPolicy) and p.tile % d.page:
            raise ValueError(f"page={d.page} must divide the prefill tile={p.tile} "
                             "(page summaries are built from prefill tiles)")
        return self


class LayerOverride(StrictConfig):
    decode: DecodePolicy | None = None
    prefill: PrefillPolicy | None = None


class SparsePolicy(StrictConfig):
    """A model's sparse attention: defaults for all layers + `layers: {index: {decode/prefill: ...}}`."""

    decode: DecodePolicy = Field(default_factory=DensePolicy)
    prefill: PrefillPolicy = Field(default_factory=DensePolicy)
    layers: dict[int, LayerOverride] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> SparsePolicy:
        LayerPolicy(decode=self.decode, prefill=self.prefill)
        for i in self.layers:
            self.for_layer(i)
        return self

    def for_layer(self, layer: int) -> LayerPolicy:
        o = self.layers.get(layer)
        decode = o.decode if o and o.decode is not None else self.decode
        prefill = o.prefill if o and o.prefill is not None else self.prefill
        if isinstance(decode, PageTopKPolicy) and layer in decode.dense_layers:
            decode = DensePolicy()
        if isinstance(prefill, BlockSparsePrefillPolicy) and layer in prefill.dense_layers:
            prefill = DensePolicy()
        return LayerPolicy(decode=decode, prefill=prefill)

    @property
    def name(self) -> str:
        """Short label, e.g. `page_topk` or `page_topk+block_sparse_prefill`."""
        kinds = [self.decode.kind] + ([self.prefill.kind] if self.prefill.kind != self.decode.kind else [])
        kinds = [k for k in kinds if k != "dense"] or ["dense"]
        return "+".join(kinds)

    @property
    def is_dense(self) -> bool:
        return self.name == "dense" and not self.layers


def _coerce(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text else text
    except yaml.YAMLError:
        return text


def _one_policy(spec: str) -> AnyPolicy:
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in POLICY_CLASSES:
        hint = closest(name, list(POLICY_CLASSES))
        raise UserError(f"unknown policy '{name}'" + (f" (did you mean '{hint}'?)" if hint else "")
                        + f"; known: {', '.join(POLICY_CLASSES)}")
    fields: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in _split_fields(rest))):
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"policy field '{item}' in '{spec}' needs the form key=value")
        fields[key.strip()] = _coerce(value.strip())
    return POLICY_CLASSES[name].parse(fields, where=name)


def _split_fields(text: str) -> list[str]:
    """Split on commas outside [...] (lists are written `dense_layers=[0,1]`)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def _from_policies(parts: list[AnyPolicy]) -> SparsePolicy:
    decode: Any = None
    prefill: Any = None
    for p in parts:
        if isinstance(p, PageTopKPolicy):
            decode = p
        elif isinstance(p, BlockSparsePrefillPolicy):
            prefill = p
        else:
            decode = p if decode is None else decode
            prefill = p if prefill is None else prefill
    data = {"decode": (decode or DensePolicy()).model_dump(), "prefill": (prefill or DensePolicy()).model_dump()}
    return SparsePolicy.parse(data, where="policy")


def parse_policy_spec(spec: str | Path | SparsePolicy | dict) -> SparsePolicy:
    """`SparsePolicy` from `page_topk:page=16,keep=0.25`, `a+b`, a YAML file path, a dict or a policy.

    A single policy name sets the phase it belongs to: `page_topk` -> decode, `block_sparse_prefill`
    -> prefill, `sink_window` and `dense` -> both (unless the other phase is named too).
    A YAML file holds either a SparsePolicy mapping (`decode:`, `prefill:`, `layers:`) or one policy
    mapping with `kind:`.
    """
    if isinstance(spec, SparsePolicy):
        return spec
    if isinstance(spec, dict):
        return _from_mapping(spec, "policy")
    text = str(spec).strip()
    if text.endswith((".yaml", ".yml")) or (Path(text).is_file() and ":" not in text):
        path = Path(text)
        if not path.is_file():
            raise UserError(f"policy file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise UserError(f"policy file {path} must hold a mapping")
        return _from_mapping(data, str(path))
    if not text:
        raise UserError("empty policy spec; e.g. page_topk:page=16,keep=0.25")
    return _from_policies([_one_policy(part) for part in text.split("+")])


def _from_mapping(data: dict, where: str) -> SparsePolicy:
    if "kind" in data:
        kind = data["kind"]
        if kind not in POLICY_CLASSES:
            raise UserError(f"unknown policy kind '{kind}' in {where}; known: {', '.join(POLICY_CLASSES)}")
        return _from_policies([POLICY_CLASSES[kind].parse(data, where=str(kind))])
    try:
        return SparsePolicy.model_validate(data)
    except ValidationError as exc:
        raise UserError(describe_validation_error(SparsePolicy, exc, where)) from None


policy_adapter = TypeAdapter(AnyPolicy)
