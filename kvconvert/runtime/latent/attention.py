"""One attention module for every GQA-capable architecture whose cache holds low-rank latents.

Per layer (x: the attention input, Tensor[batch, tokens, hidden]):
  separate: c_k = x @ k_latent.weight^T  [b, t, r_k],   c_v = x @ v_latent.weight^T  [b, t, r_v]
  joint:    c   = x @ kv_latent.weight^T [b, t, r],     c_k = c_v = c
The cache stores the pre-RoPE latents as Tensor[batch, 1, tokens, rank] (keys: c_k or c; values: c_v, or a
zero-width tensor in joint mode). At attention time, for all cached tokens,
  K = k_proj(c_k) (+ bias) -> [b, kv_heads, T, head_dim] -> k_norm (QK-norm models) -> RoPE at its position
  V = v_proj(c_v) (+ bias)
then the base architecture's own attention function runs (mask, scaling, sliding window, softcap as the
stock module). Queries use the stock q projection (+ q_norm) and are rotated with the same position table.

Single-token decode goes through the kernel entry point `kvconvert.kernels.latent_decode.latent_decode_step`
(the Triton kernel on CUDA, its eager reference on the CPU: values accumulated in latent space, v_up applied
once) whenever its semantics are the module's: the stock attention function (eager / sdpa: not a registered
one such as kvconvert.sparse's), no soft-capping, no sliding window, every cached slot visible
(no padding in the mask), slot j at position j, rotate-half RoPE, and k_norm (if any) an RMSNorm x / rms(x) * weight.
`LatentAttention.decode_kernel = False` turns it off (the rebuild-then-attend path above).
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


class RopeTable:
    """cos/sin of the model's own rotary embedding for positions [0, end), memoised for the current length."""

    def __init__(self, rotary_emb: nn.Module):
        self.rotary_emb = rotary_emb
        self._key: tuple | None = None
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None

    def upto(self, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each Tensor[1, end, rotary_dim] in `like`'s dtype/device."""
        key = (end, like.dtype, like.device)
        if key != self._key:
            pos = torch.arange(end, device=like.device).unsqueeze(0)
            self._value = self.rotary_emb(like, pos)
            self._key = key
        return self._value


STOCK_ATTENTION = ("eager", "sdpa")  # what the decode kernel replaces; a registered one (kvconvert.sparse) is kept


def _all_visible(mask, t: int) -> bool:
    """Whether a decode step's attention mask (None, bool, or additive float [b, 1, 1, >= t]) hides no slot < t."""
    if mask is None:
        return True
    if not torch.is_tensor(mask) or mask.dim() != 4 or mask.shape[-1] < t:
        return False
    m = mask[..., :t]
    return bool(m.all()) if m.dtype == torch.bool else bool((m == 0).all())


class LatentAttention(nn.Module):
    """Attention whose K/V come from cached latents; built from a stock attention module (see module doc)."""

    decode_kernel = True

    def __init__(self, stock: nn.Module, view, k_width: int, v_width: int, joint: bool, rope: RopeTable):
        super().__init__()
        config = stock.config
        self.config = config
        self.layer_idx = stock.layer_idx
        self.head_dim = view.head_dim
        self.num_heads = view.num_heads
        self.num_kv_heads = view.num_kv_heads
        self.num_key_value_groups = view.num_heads // view.num_kv_heads
        self.scaling = stock.scaling
        self.attention_dropout = getattr(stock, "attention_dropout", 0.0)
        self.is_causal = getattr(stock, "is_causal", True)
        self.sliding_window = (stock.sliding_window if hasattr(stock, "sliding_window")
                               else getattr(config, "sliding_window", None))
        self.softcap = getattr(stock, "attn_logit_softcapping", None)
        base_module = sys.modules[type(stock).__module__]
        self._eager = base_module.eager_attention_forward
        self._rotate = base_module.apply_rotary_pos_emb
        self._rope = [rope]  # shared, not a submodule
        self.joint = joint
        self._rotate_half = view.rope is not None and view.rope.layout == "rotate_half"
        dtype = stock.o_proj.weight.dtype
        device = stock.o_proj.weight.device
        hidden, kv_width = view.hidden_size, view.kv_width

        def linear(n_in, n_out, bias):
            return nn.Linear(n_in, n_out, bias=bias, dtype=dtype, device=device)

        self.q_proj = linear(hidden, view.q_width, view.q_bias)
        if joint:
            self.kv_latent = linear(hidden, k_width, False)
            self.k_proj = linear(k_width, kv_width, view.k_bias)
            self.v_proj = linear(k_width, kv_width, view.v_bias)
        else:
            self.k_latent = linear(hidden, k_width, False)
            self.v_latent = linear(hidden, v_width, False)
            self.k_proj = linear(k_width, kv_width, view.k_bias)
            self.v_proj = linear(v_width, kv_width, view.v_bias)
        self.o_proj = stock.o_proj
        self.q_norm = getattr(stock, "q_norm", None) if view.qk_norm else None
        self.k_norm = getattr(stock, "k_norm", None) if view.qk_norm else None

    def latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache stores for input x [b, s, hidden]: (c_k, c_v), each [b, 1, s, width]."""
        if self.joint:
            c = self.kv_latent(x).unsqueeze(1)
            return c, c[..., :0]
        return self.k_latent(x).unsqueeze(1), self.v_latent(x).unsqueeze(1)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """Queries before RoPE for input x [b, s, hidden]: [b, heads, s, head_dim] (q_proj, then q_norm)."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return q.transpose(1, 2)

    def _k_norm_eps(self) -> float | None:
        """k_norm's epsilon (0.0 without k_norm); None when k_norm is not x / rms(x) * weight (checked once)."""
        if not hasattr(self, "_k_norm_eps_value"):
            eps, norm = 0.0, self.k_norm
            if norm is not None:
                eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
                weight = getattr(norm, "weight", None)
                probe = torch.randn(3, self.head_dim, generator=torch.Generator().manual_seed(0)).to(self.o_proj.weight)
                with torch.no_grad():
                    want = None if eps is None or weight is None else (
                        weight * (probe.float() * torch.rsqrt(probe.float().pow(2).mean(-1, keepdim=True) + eps)))
                    ok = want is not None and torch.allclose(norm(probe).float(), want.float(), rtol=1e-3, atol=1e-5)
                eps = float(eps) if ok else None
            self._k_norm_eps_value = eps
        return self._k_norm_eps_value

    def _decode(self, q, c_k, c_v, cos, sin):
        """One token per sequence through `latent_decode_step`: q [b, H, 1, D] rotated, c_k / c_v the whole
        cache [b, 1, t, r] (slot j at position j) -> [b, 1, H*Dv]."""
        from ...kernels.latent_decode import LatentWeights, latent_decode_step

        b, t = q.shape[0], c_k.shape[2]
        eps = self._k_norm_eps()
        weights = LatentWeights(self.num_kv_heads, self.k_proj.weight.t(), self.v_proj.weight.t(), cos[0], sin[0],
                                self.k_proj.bias, self.v_proj.bias,
                                self.k_norm.weight if self.k_norm is not None else None, eps)
        lens = torch.full((b,), t, dtype=torch.int32, device=q.device)
        out = latent_decode_step(q[:, :, 0], c_k, c_v, lens, weights, scale=self.scaling)
        return out.reshape(b, 1, -1)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        """transformers >= 5.24 passes the cache as `cache` (earlier versions: `past_key_values`)."""
        cache = cache if cache is not None else past_key_values
        b, s, _ = hidden_states.shape
        d = self.head_dim
        q = self.queries(hidden_states)
        c_k, c_v = self.latents(hidden_states)
        seen = 0
        if cache is not None:
            seen = cache.get_seq_length(self.layer_idx)
            c_k, c_v = cache.update(c_k, c_v, self.layer_idx)
        if self.joint:
            c_v = c_k
        t = c_k.shape[-2]
        end = seen + s
        cos, sin = self._rope[0].upto(end, q)
        if (self.decode_kernel and self._rotate_half and s == 1
                and self.config._attn_implementation in STOCK_ATTENTION and cache is not None and t == end and self.softcap is None
                and self.sliding_window is None and not self.training and self._k_norm_eps() is not None
                and _all_visible(attention_mask, t)):
            q = self._rotate(q, q, cos[:, seen:end], sin[:, seen:end])[0]
            return self.o_proj(self._decode(q, c_k, c_v, cos, sin)), None
        k = self.k_proj(c_k[:, 0]).view(b, t, -1, d)
        if self.k_norm is not None:
            k = self.k_norm(k)
        k = k.transpose(1, 2)
        v = self.v_proj(c_v[:, 0]).view(b, t, -1, d).transpose(1, 2)
        q = self._rotate(q, q, cos[:, seen:end], sin[:, seen:end])[0]
        k = self._rotate(k, k, cos[:, end - t:end], sin[:, end - t:end])[0]

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager)
        extra = {}
        if self.sliding_window is not None:
            extra["sliding_window"] = self.sliding_window
        if self.softcap is not None:
            extra["softcap"] = self.softcap
        out, weights = attention(self, q, k, v, attention_mask,
                                 dropout=self.attention_dropout if self.training else 0.0,
                                 scaling=self.scaling, **extra, **kwargs)
        out = out.reshape(b, s, -1).contiguous()
        return self.o_proj(out), weights
