"""Latent-KV attention from standard ONNX ops (`--attention standard` on a fit-latent model), opset >= 24.

Every traced `kvconvert::KVLatentAttention` node is replaced by (per layer; see latent_op.py for the inputs):
  present_*_latent = TensorScatter(past_*_latent, new latent, cache_length, axis=2)   the latent buffers, in place
  c    = Slice(present, slots [0, N))         N = max(cache_length) + S: only the filled part of the buffer
  K    = RotaryEmbedding(RMSNormalization(c_k @ k_up_g + k_bias_g), slot positions)   [B, KV, N, D]
         (one MatMul [B, 1, N, Rk] x [KV, Rk, D] broadcast over the KV heads: no transpose of the keys)
  q    = RotaryEmbedding(query, positions cache_length + s)
  y    = Attention(q, K, Expand(c_v to KV heads) [B, KV, N, Rv], mask [B, 1, S, N], scale, softcap)  [B, H, S, Rv]
  output = Transpose(y @ v_up_g + v_bias_g) [B, S, H, Dv]
(RMSNormalization only for k_norm models; the bias adds only where the layer's bias initializers are not all
zero). Values are never rebuilt: the softmax weights sum to 1, so sum_j p_j (c_v[j] @ v_up + v_bias) =
(sum_j p_j c_v[j]) @ v_up + v_bias: Attention accumulates the value latents and v_up is applied once per head.
The mask is `standard_attention`'s rule (causal on slot index, the model's sliding window, a sink_window
policy) over the N filled slots, built once and shared by layers.
Cost: each step rebuilds the keys of the N filled slots, N x Rk x KV x D multiply-adds per layer (plus RMSNorm
and RoPE), which a dense cache does not pay, and copies the value latents once per KV head (Expand); the bytes
kept and read between steps are the latents only. page_topk / block_sparse_prefill policies are refused (they
need the KVLatentAttention node).
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper

from .latent_function_body import _all_zero as all_zero
from .latent_op import LATENT_OP_TYPE, latent_io
from .standard_attention import _const, position_nodes, rewrite_attention

RECORD = {"domain": "ai.onnx", "op_type": "Attention", "cache_update": "TensorScatter",
          "latent_rebuild": "MatMul+RMSNormalization+RotaryEmbedding", "latent_values": "absorbed"}


def _base_nodes() -> list[onnx.NodeProto]:
    """lat_n (filled slots N, [1]), lat_kpos [B, N] slot positions, lat_qpos [B, S], and the names
    `standard_attention._mask_nodes` reads (std_arange_t over the N slots, std_pos4, std_causal, std_is_decode)."""
    n = helper.make_node
    return [
        _const("std_i0", [0], True), _const("std_i1", [1], True), _const("std_axes0", [0]),
        _const("std_axes1", [1]), _const("std_axes_1_3", [1, 3]), _const("lat_axes2", [2]), _const("lat_zero1", [0]),
        n("Shape", ["input_ids"], ["std_S1"], name="std_S1", start=1, end=2),
        n("Shape", ["input_ids"], ["lat_B1"], name="lat_B1", start=0, end=1),
        n("Squeeze", ["std_S1", "std_axes0"], ["std_S"], name="std_S"),
        n("ReduceMax", ["cache_length"], ["lat_cl_max"], name="lat_cl_max", keepdims=0),
        n("Add", ["lat_cl_max", "std_S"], ["lat_n"], name="lat_n"),
        n("Unsqueeze", ["lat_n", "std_axes0"], ["lat_n1"], name="lat_n1"),
        *position_nodes("lat_n", "lat_qpos"),
        n("Unsqueeze", ["std_arange_t", "std_axes0"], ["lat_kpos1"], name="lat_kpos1"),
        n("Concat", ["lat_B1", "lat_n1"], ["lat_kpos_shape"], name="lat_kpos_shape", axis=0),
        n("Expand", ["lat_kpos1", "lat_kpos_shape"], ["lat_kpos"], name="lat_kpos"),
    ]


def _half_table(table: str, rotary_dim: int) -> tuple[str, list[onnx.NodeProto]]:
    """RotaryEmbedding's cache [T, R/2]: the first half of our duplicated [T, R] table."""
    out = f"{table}_half"
    return out, [_const(f"{out}_end", [rotary_dim // 2]), _const(f"{out}_axis", [1]),
                 helper.make_node("Slice", [table, "lat_zero1", f"{out}_end", f"{out}_axis"], [out], name=out)]


def _per_head(p: str, weight: str, kv: int, out: str) -> list[onnx.NodeProto]:
    """`out` [KV, R, D] from an up projection [R, KV*D] (constant-folded by ONNX Runtime: the inputs are
    initializers)."""
    n = helper.make_node
    return [_const(f"{p}up_shape", [0, kv, -1]),
            n("Reshape", [weight, f"{p}up_shape"], [f"{p}up3"], name=f"{p}up3"),
            n("Transpose", [f"{p}up3"], [out], name=f"{p}up_heads", perm=[1, 0, 2])]


def _add_bias(p: str, x: str, bias: str | None, kv: int, out: str) -> list[onnx.NodeProto]:
    """`out` = x [.., KV, N, D] + bias [KV*D] per head (Identity when `bias` is None)."""
    n = helper.make_node
    if bias is None:
        return [n("Identity", [x], [out], name=f"{p}nobias")]
    return [_const(f"{p}bias_shape", [kv, 1, -1]),
            n("Reshape", [bias, f"{p}bias_shape"], [f"{p}bias_heads"], name=f"{p}bias_heads"),
            n("Add", [x, f"{p}bias_heads"], [out], name=f"{p}biased")]


def _rebuild(p: str, latent: str, up: str, bias: str | None, kv: int, out: str) -> list[onnx.NodeProto]:
    """`out` [B, KV, N, D] = Slice(latent [B, 1, T, R] to N slots) @ up_g + bias_g."""
    n = helper.make_node
    return [
        n("Slice", [latent, "lat_zero1", "lat_n1", "lat_axes2"], [f"{p}filled"], name=f"{p}filled"),
        *_per_head(p, up, kv, f"{p}up_heads"),
        n("MatMul", [f"{p}filled", f"{p}up_heads"], [f"{p}lin"], name=f"{p}lin"),
        *_add_bias(p, f"{p}lin", bias, kv, out),
    ]


def _all_zero(model: onnx.ModelProto | None, name: str) -> bool:
    return model is not None and all_zero(model, name)


def _rows(model: onnx.ModelProto | None, name: str) -> int | None:
    """First dim of initializer `name` (None when it is not one)."""
    for init in (model.graph.initializer if model is not None else []):
        if init.name == name:
            return int(init.dims[0])
    return None


def _layer_nodes(node: onnx.NodeProto, attrs: dict[str, Any], mask: str, rotary_dim: int,
                 tables: dict[str, str], model: onnx.ModelProto | None = None) -> list[onnx.NodeProto]:
    n = helper.make_node
    joint = bool(attrs["joint_kv"])
    x = dict(zip(latent_io(joint)[0], node.input))
    outs = dict(zip(latent_io(joint)[1], node.output))
    p = f"{node.name}_"
    kv = int(attrs["num_kv_heads"])
    if joint:
        nodes = [n("TensorScatter", [x["past_kv_latent"], x["kv_latent"], x["cache_length"]],
                   [outs["present_kv_latent"]], name=f"{p}update", axis=2)]
        c_k = c_v = outs["present_kv_latent"]
    else:
        nodes = [n("TensorScatter", [x["past_key_latent"], x["key_latent"], x["cache_length"]],
                   [outs["present_key_latent"]], name=f"{p}key_update", axis=2),
                 n("TensorScatter", [x["past_value_latent"], x["value_latent"], x["cache_length"]],
                   [outs["present_value_latent"]], name=f"{p}value_update", axis=2)]
        c_k, c_v = outs["present_key_latent"], outs["present_value_latent"]
    for table in (x["rope_cos"], x["rope_sin"]):
        if table not in tables:
            tables[table], made = _half_table(table, rotary_dim)
            nodes += made
    cos, sin = tables[x["rope_cos"]], tables[x["rope_sin"]]
    rope = {"interleaved": 0, **({"rotary_embedding_dim": rotary_dim} if rotary_dim < int(attrs["head_dim"]) else {})}
    has_bias = not (_all_zero(model, x["k_bias"]) and _all_zero(model, x["v_bias"]))
    nodes += _rebuild(f"{p}k_", c_k, x["k_up"], x["k_bias"] if has_bias else None, kv, f"{p}k_heads")
    keys = f"{p}k_heads"
    if attrs["k_norm_eps"] > 0:
        nodes.append(n("RMSNormalization", [keys, x["k_norm_weight"]], [f"{p}k_normed"], name=f"{p}k_norm",
                       axis=-1, epsilon=float(attrs["k_norm_eps"]), stash_type=1))
        keys = f"{p}k_normed"
    extra = {"softcap": float(attrs["softcap"])} if attrs["softcap"] > 0 else {}
    nodes += [
        n("RotaryEmbedding", [keys, cos, sin, "lat_kpos"], [f"{p}keys"], name=f"{p}k_rope", **rope),
        n("RotaryEmbedding", [x["query"], cos, sin, "lat_qpos"], [f"{p}query"], name=f"{p}q_rope", **rope),
    ]
    rv = _rows(model, x["v_up"])
    if rv is None or rv > int(attrs["head_dim"]):  # Attention (TensorRT's too) wants V's head size = D: rebuild
        nodes += [*_rebuild(f"{p}v_", c_v, x["v_up"], x["v_bias"] if has_bias else None, kv, f"{p}values"),
                  n("Attention", [f"{p}query", f"{p}keys", f"{p}values", mask], [f"{p}y"], name=f"{p}attention",
                    scale=float(attrs["scale"]), **extra)]
    else:
        # values absorbed: Attention over the value latents (zero-padded to D, once per KV head), then
        # [B, H, S, Rv] -> [B, KV, G*S, Rv] @ [KV, Rv, Dv] (+ bias) -> [B, H, S, Dv]
        nodes += [
            n("Slice", [c_v, "lat_zero1", "lat_n1", "lat_axes2"], [f"{p}v_filled"], name=f"{p}v_filled"),
            _const(f"{p}v_pads", [0, 0, 0, 0, 0, 0, 0, int(attrs["head_dim"]) - rv]),
            n("Pad", [f"{p}v_filled", f"{p}v_pads"], [f"{p}v_padded"], name=f"{p}v_padded"),
            _const(f"{p}v_expand", [1, kv, 1, 1]),
            n("Expand", [f"{p}v_padded", f"{p}v_expand"], [f"{p}v_latents"], name=f"{p}v_latents"),
            n("Attention", [f"{p}query", f"{p}keys", f"{p}v_latents", mask], [f"{p}y_pad"], name=f"{p}attention",
              scale=float(attrs["scale"]), **extra),
            _const(f"{p}y_rv", [rv]), _const(f"{p}y_axis", [3]),
            n("Slice", [f"{p}y_pad", "lat_zero1", f"{p}y_rv", f"{p}y_axis"], [f"{p}y_lat"], name=f"{p}y_lat"),
            _const(f"{p}y_grouped_shape", [0, kv, -1, 0]),
            n("Reshape", [f"{p}y_lat", f"{p}y_grouped_shape"], [f"{p}y_grouped"], name=f"{p}y_grouped"),
            *_per_head(f"{p}v_", x["v_up"], kv, f"{p}v_up_heads"),
            n("MatMul", [f"{p}y_grouped", f"{p}v_up_heads"], [f"{p}y_lin"], name=f"{p}y_lin"),
            *_add_bias(f"{p}v_", f"{p}y_lin", x["v_bias"] if has_bias else None, kv, f"{p}y_out"),
            _const(f"{p}y_shape", [0, int(attrs["num_heads"]), -1, 0]),
            n("Reshape", [f"{p}y_out", f"{p}y_shape"], [f"{p}y"], name=f"{p}y_heads"),
        ]
    nodes.append(n("Transpose", [f"{p}y"], [outs["output"]], name=f"{p}output", perm=[0, 2, 1, 3]))
    return nodes


def lower_latent_to_standard(model: onnx.ModelProto, rotary_dim: int) -> int:
    """Rewrite every KVLatentAttention node of `model` (opset >= 24) in place (RoPE on the first `rotary_dim`
    dims of each head); drops the function and the `kvconvert` domain. Returns the number of distinct masks."""
    tables: dict[str, str] = {}  # rope table -> its half, made once for all layers
    return rewrite_attention(model, LATENT_OP_TYPE, _base_nodes(),
                             lambda node, attrs, mask: _layer_nodes(node, attrs, mask, rotary_dim, tables, model))
