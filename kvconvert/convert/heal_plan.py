"""The memory a heal needs per device, from config.json alone (arithmetic, no weights): `heal_memory_plan`.

Terms, per device, for world size W:
- params: the student in fp32 (master weights; bf16 autocast keeps them fp32), / W under FSDP;
- grads: fp32 gradients of the trainable parameters, / W under FSDP (reduce-scattered);
- optimizer: AdamW's two fp32 moments of the trainable parameters, / W under FSDP;
- teacher: its weights (bf16 on CUDA, fp32 on CPU, as the pass loads it), / W under FSDP;
- activations: an estimate for the rank's B / W sequences: per decoder layer the tensors autograd keeps
  (~10 x hidden + 4 x intermediate elements per token; only the layer input with activation checkpointing, plus
  one layer recomputed), the student's logits and their gradient, the teacher's logits, and the fp32 log-softmax
  of the KD loss for `kd_chunk` tokens at a time (all tokens when 0). FSDP adds one all-gathered layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import UserError

GB = 1e9
NON_GATED = {"gpt2", "opt", "gpt_neox"}  # two-matrix MLP with biases, LayerNorm with bias


def _get(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return default


def parameter_counts(config: dict[str, Any]) -> dict[str, int]:
    """{"total", "attention", "layer", "embedding"} parameter counts of a decoder from its config.json dict."""
    from ..models import describe

    view = describe(config)
    h, layers, mt = view.hidden_size, view.num_layers, config.get("model_type")
    vocab = _get(config, "vocab_size")
    inter = _get(config, "intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * h
    if not vocab:
        raise UserError("config.json has no vocab_size; cannot plan the heal's memory")
    if view.kv_widths or mt == "kvconvert_latent":  # latent: down (hidden -> width) and up (width -> kv) factors
        kv = sum(h * (k + v) + (k + v) * view.kv_width for k, v in view.widths()) // layers
    else:
        kv = 2 * h * view.kv_width
    attn = h * view.q_width + kv + view.q_width * h
    attn += view.q_width * view.q_bias + view.kv_width * (view.k_bias + view.v_bias) + h * view.o_bias
    attn += 2 * view.head_dim * view.qk_norm
    gated = mt not in NON_GATED
    mlp = (3 if gated else 2) * h * inter + (0 if gated else inter + h)
    norms = (4 if not gated or mt == "gemma2" else 2) * h
    emb = vocab * h
    head = 0 if config.get("tie_word_embeddings", mt in NON_GATED) else vocab * h
    if mt in ("gpt2", "opt"):
        emb += (_get(config, "n_positions", "max_position_embeddings", default=0) + 2 * (mt == "opt")) * h
    layer = attn + mlp + norms
    return {"total": emb + head + layers * layer + (2 if not gated else 1) * h, "attention": layers * attn,
            "layer": layer, "embedding": emb + head}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device for each term (see the module docstring) and the settings they were computed for."""

    parameters: int
    trainable: int
    world_size: int
    parallel: str
    params: float
    grads: float
    optimizer: float
    teacher: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.teacher + self.activations

    def line(self) -> str:
        gb = lambda x: f"{x / GB:.2f} GB"  # noqa: E731
        return (f"heal memory plan: {self.parameters / 1e9:.2f}B parameters ({self.trainable / 1e9:.3f}B trainable), "
                f"{self.world_size} x {self.parallel}, per device: params {gb(self.params)} + grads "
                f"{gb(self.grads)} + AdamW {gb(self.optimizer)} + teacher {gb(self.teacher)} + activations "
                f"~{gb(self.activations)} = {gb(self.total)}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def heal_memory_plan(config: dict[str, Any], world_size: int = 1, parallel: str = "none", *,
                     trainable: str = "attention", batch: int = 2, seqlen: int = 256, autocast: str = "none",
                     activation_checkpointing: bool = False, kd_chunk: int = 0, device: str = "cuda",
                     hidden_weight: float = 0.0, teacher: dict[str, Any] | None = None) -> MemoryPlan:
    """Per-device memory of a heal of the model `config` (a config.json dict) with these settings; `teacher`:
    the teacher's config.json (default: the same size as the student)."""
    if world_size < 1:
        raise UserError(f"world size {world_size}: must be at least 1")
    if parallel not in ("none", "ddp", "fsdp"):
        raise UserError(f"parallel '{parallel}': use none, ddp or fsdp")
    counts = parameter_counts(config)
    t_counts = parameter_counts(teacher) if teacher is not None else counts
    n, n_train = counts["total"], counts["total"] if trainable == "all" else counts["attention"]
    shard = world_size if parallel == "fsdp" else 1
    teacher_bytes = 2 if device.startswith("cuda") else 4
    act_bytes = 2 if autocast == "bf16" else 4
    h = int(_get(config, "hidden_size", "n_embd", "d_model"))
    inter = _get(config, "intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * h
    layers = int(_get(config, "num_hidden_layers", "n_layer", "num_layers"))
    vocab = int(config["vocab_size"])
    tokens = max(batch // world_size, 1) * seqlen
    per_layer = tokens * (10 * h + 4 * inter) * act_bytes
    kept = layers * tokens * h * act_bytes + per_layer if activation_checkpointing else layers * per_layer
    if hidden_weight > 0:
        kept += (layers + 1) * tokens * h * teacher_bytes  # the teacher's hidden states
    logits = tokens * vocab * (2 * act_bytes + teacher_bytes)
    kd = (min(kd_chunk, tokens) if kd_chunk > 0 else tokens) * vocab * 4 * 3
    gathered = (counts["layer"] * 4 + t_counts["layer"] * teacher_bytes) if parallel == "fsdp" and world_size > 1 else 0
    return MemoryPlan(parameters=n, trainable=n_train, world_size=world_size, parallel=parallel,
                      params=4 * n / shard, grads=4 * n_train / shard, optimizer=8 * n_train / shard,
                      teacher=teacher_bytes * t_counts["total"] / shard, activations=float(kept + logits + kd + gathered))
