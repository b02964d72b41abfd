"""The normalized attention view every pass works on, whatever the architecture."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2, "fp8": 1, "int8": 1}


def dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[name.lower()]
    except KeyError:
        from ..errors import UserError

        raise UserError(f"unknown dtype '{name}'; use one of fp32, fp16, bf16, fp8") from None


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding as the model applies it.

    `rotary_dim` leading dims of each head are rotated (rotate-half layout: pair i is (i, i + rotary_dim/2));
    `scaling` is the transformers `rope_parameters` dict minus theta (None for default RoPE).
    """

    theta: float
    rotary_dim: int
    scaling: dict[str, Any] | None = None
    layout: str = "rotate_half"


@dataclass(frozen=True)
class ProjectionNames:
    """Parameter names inside one attention block, relative to `attn_prefix`.

    Fused-QKV models set `qkv` (rows: all q heads, then k heads, then v heads) and leave q/k/v None.
    """

    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None


@dataclass(frozen=True)
class AttentionView:
    """Normalized description of a decoder's attention.

    Per token and layer the cache holds `kv_widths[layer] = (k_width, v_width)` elements; for a standard
    model both widths are `num_kv_heads * head_dim`, latent models store narrower latents.
    """

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeSpec | None
    names: ProjectionNames
    attn_prefix: str
    q_bias: bool = False
    k_bias: bool = False
    v_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    supports_gqa: bool = True
    gqa_note: str = ""
    sliding_window: int | None = None
    max_position_embeddings: int | None = None
    kv_widths: tuple[tuple[int, int], ...] = field(default=())

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def q_width(self) -> int:
        """Rows of the query projection: num_heads * head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Rows of the key (and of the value) projection: num_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def fused_qkv(self) -> bool:
        return self.names.qkv is not None

    def layer_prefix(self, layer: int) -> str:
        return self.attn_prefix.format(layer=layer)

    def widths(self) -> tuple[tuple[int, int], ...]:
        if self.kv_widths:
            return self.kv_widths
        return tuple((self.kv_width, self.kv_width) for _ in range(self.num_layers))

    def kv_elements_per_token(self) -> int:
        return sum(k + v for k, v in self.widths())

    def kv_bytes_per_token(self, dtype: str = "bf16") -> int:
        """2 x layers x kv_heads x head_dim x dtype bytes for a standard model."""
        return self.kv_elements_per_token() * dtype_bytes(dtype)

    def kv_gib(self, context: int, batch: int, dtype: str = "bf16") -> float:
        return self.kv_bytes_per_token(dtype) * context * batch / 2**30

    def valid_group_counts(self) -> list[int]:
        """GQA group counts G reachable by merging KV heads (divisors of the KV head count)."""
        return [g for g in range(1, self.num_kv_heads + 1) if self.num_kv_heads % g == 0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kv_widths"] = [list(w) for w in self.widths()]
        return d
