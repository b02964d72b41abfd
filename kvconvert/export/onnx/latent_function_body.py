"""The model-local ONNX function that defines `kvconvert::KVLatentAttention` with standard ops.

Latent cache update, then over the T = max(cache_length) + S filled slots only (`function_body.filled_length`):
  keys    K = RoPE(k_norm(c_k @ k_up_g + k_bias_g))   one broadcast MatMul [B, 1, T, Rk] x [KV, Rk, D] -> [B, KV, T, D]
          (no transpose), RoPE as x * C + swap(x) * S' with the tables widened to D (three elementwise passes)
  values  never rebuilt: with p the softmax weights, sum_j p_j (c_v[j] @ v_up_g + v_bias_g)
          = (sum_j p_j c_v[j]) @ v_up_g + v_bias_g, so one [B, 1, H*S, T] x [B, 1, T, Rv] product accumulates the
          value latents for every head and v_up is applied once per query head ([B, KV, G*S, Rv] x [KV, Rv, Dv]).
then the attention shared with KVAttention (`function_body.prelude` / `cache_update` / `attention`). Keys cannot
be absorbed into the query: RoPE's rotation depends on the slot and k_norm is not linear. Semantics:
`latent_op.kv_latent_attention_reference`; tests/test_export_onnx_latent_op.py compares the two.

An export carries one function overload per distinct `LatentLowering` of its layers (`attach_latent_functions`):
the soft-capping / window / sink nodes only where a layer uses them, the bias adds only where the layer's bias
initializers are not all zero, k_norm only for QK-norm layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .attention_op import DOMAIN
from .function_body import (Lowering, attention, attr_const, cache_update, filled, filled_length, int_const,
                            layer_lowering, prelude, reduce_op)
from .latent_op import LATENT_OP_TYPE, latent_io

INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class LatentLowering:
    """What one KVLatentAttention body computes: `k_norm` (QK-norm layers), `bias` (k_bias / v_bias added; False
    only when both inputs are all-zero initializers) and the attention parts of `function_body.Lowering`."""

    k_norm: bool = True
    bias: bool = True
    softcap: bool = True
    window: bool = True
    sink: bool = True
    selections: tuple[str, ...] = ()

    @property
    def attention(self) -> Lowering:
        return Lowering(softcap=self.softcap, window=self.window, sink=self.sink, selections=self.selections)

    @property
    def overload(self) -> str:
        flags = [name for name, on in (("knorm", self.k_norm), ("bias", self.bias)) if on]
        return "_".join(["latent", *flags, self.attention.overload])


def _heads(up: str, out: str, p: str) -> list[onnx.NodeProto]:
    """`out` [KV, R, D] = up [R, KV*D] split per KV head (a per-step copy of the weight, not of the cache)."""
    n = helper.make_node
    return [n("Concat", ["zero1", "lat_kv1", "minus1"], [f"{p}up_shape"], axis=0),
            n("Reshape", [up, f"{p}up_shape"], [f"{p}up3"]),
            n("Transpose", [f"{p}up3"], [out], perm=[1, 0, 2])]


def _bias_heads(bias: str, out: str, p: str) -> list[onnx.NodeProto]:
    """`out` [KV, 1, D] from bias [KV*D]."""
    n = helper.make_node
    return [n("Concat", ["lat_kv1", "lat_one1", "minus1"], [f"{p}bias_shape"], axis=0),
            n("Reshape", [bias, f"{p}bias_shape"], [out])]


def _rms_norm(x: str, weight: str, out: str, opset: int) -> list[onnx.NodeProto]:
    """`out` = x / sqrt(mean(x^2 over the last axis) + k_norm_eps) * weight, computed in fp32."""
    n = helper.make_node
    return [
        attr_const("rn_eps", "k_norm_eps", onnx.AttributeProto.FLOAT),
        n("Cast", [x], ["rn_xf"], to=TensorProto.FLOAT), n("Mul", ["rn_xf", "rn_xf"], ["rn_sq"]),
        reduce_op("ReduceMean", "rn_sq", "minus1", -1, "rn_mean", opset, keepdims=1),
        n("Add", ["rn_mean", "rn_eps"], ["rn_var"]), n("Sqrt", ["rn_var"], ["rn_rms"]),
        n("Div", ["rn_xf", "rn_rms"], ["rn_normed_f"]), n("CastLike", ["rn_normed_f", x], ["rn_normed"]),
        n("Mul", ["rn_normed", weight], [out]),
    ]


def _rope(x: str, cos: str, sin: str, out: str, p: str) -> list[onnx.NodeProto]:
    """Rotate-half RoPE of the first R = cos.shape[-1] dims of x [..., N, D]; cos/sin broadcast to [..., N, R].

    out = x * C + swap(x) * S', where swap exchanges the two halves of the first R dims and the tables are
    widened to D on the table's (small) shape: C = [cos, 1], S' = [-sin[:R/2], sin[R/2:], 0]. Exactly the
    reference's x_rot * cos + cat(-x2, x1) * sin on the rotated dims and x on the others; over x it costs the
    swap (two halves sliced, one concat) and three elementwise passes."""
    n = helper.make_node
    return [
        n("Shape", [cos], [f"{p}R1"], start=-1), n("Div", [f"{p}R1", "rope_two1"], [f"{p}half1"]),
        n("Shape", [x], [f"{p}D1"], start=-1), n("Sub", [f"{p}D1", f"{p}R1"], [f"{p}pass1"]),
        n("Shape", [cos], [f"{p}tab_shape"]), n("Slice", [f"{p}tab_shape", "zero1", "minus1"], [f"{p}tab_lead"]),
        n("Concat", [f"{p}tab_lead", f"{p}pass1"], [f"{p}pad_shape"], axis=0),
        n("ConstantOfShape", [f"{p}pad_shape"], [f"{p}ones_f"],
          value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
        n("CastLike", [f"{p}ones_f", cos], [f"{p}ones"]), n("Sub", [f"{p}ones", f"{p}ones"], [f"{p}zeros"]),
        n("Concat", [cos, f"{p}ones"], [f"{p}C"], axis=-1),
        n("Slice", [sin, "zero1", f"{p}half1", "minus1"], [f"{p}s1"]),
        n("Slice", [sin, f"{p}half1", f"{p}R1", "minus1"], [f"{p}s2"]),
        n("Neg", [f"{p}s1"], [f"{p}ns1"]),
        n("Concat", [f"{p}ns1", f"{p}s2", f"{p}zeros"], [f"{p}S"], axis=-1),
        n("Slice", [x, "zero1", f"{p}half1", "minus1"], [f"{p}x1"]),
        n("Slice", [x, f"{p}half1", f"{p}R1", "minus1"], [f"{p}x2"]),
        n("Slice", [x, f"{p}R1", "rope_end1", "minus1"], [f"{p}xp"]),
        n("Concat", [f"{p}x2", f"{p}x1", f"{p}xp"], [f"{p}swapped"], axis=-1),
        n("Mul", [x, f"{p}C"], [f"{p}a"]), n("Mul", [f"{p}swapped", f"{p}S"], [f"{p}b"]),
        n("Add", [f"{p}a", f"{p}b"], [out]),
    ]


def _latent_values(c_v: str, v_up: str, v_bias: str | None) -> list[onnx.NodeProto]:
    """`out_grouped` [B, KV, G*S, Dv] = (probs [B, KV, G*S, T] @ c_v [B, 1, T, Rv]) @ v_up_g (+ v_bias_g)."""
    n = helper.make_node
    nodes = [
        int_const("pv_flat_shape", [0, 1, -1, 0]), n("Reshape", ["probs", "pv_flat_shape"], ["pv_probs_flat"]),
        n("MatMul", ["pv_probs_flat", c_v], ["pv_lat_flat"]),                              # [B, 1, H*S, Rv]
        n("Concat", ["zero1", "lat_kv1", "minus1", "zero1"], ["pv_lat_shape"], axis=0),
        n("Reshape", ["pv_lat_flat", "pv_lat_shape"], ["pv_lat"]),                        # [B, KV, G*S, Rv]
        *_heads(v_up, "pv_up", "pv_"),
    ]
    if v_bias is None:
        return nodes + [n("MatMul", ["pv_lat", "pv_up"], ["out_grouped"])]
    return nodes + [n("MatMul", ["pv_lat", "pv_up"], ["pv_out"]), *_bias_heads(v_bias, "pv_bias", "pv_"),
                    n("Add", ["pv_out", "pv_bias"], ["out_grouped"])]


def kv_latent_attention_function(attribute_names: list[str], opset: int, joint: bool, k_norm: bool,
                                 page_topk: bool = False, block_sparse: bool = False,
                                 lowering: LatentLowering | None = None) -> onnx.FunctionProto:
    """FunctionProto of KVLatentAttention (separate or `joint` latents). Without `lowering` the general body
    (`k_norm` adds the key RMSNorm, `page_topk` / `block_sparse` the policy selections, as for KVAttention);
    with one, that lowering as the function overload `lowering.overload`."""
    n = helper.make_node
    low = lowering or LatentLowering(k_norm=k_norm, selections=tuple(
        name for name, on in (("page_topk", page_topk), ("block_sparse_prefill", block_sparse)) if on))
    inputs, outputs = latent_io(joint)
    if joint:
        writes = [("past_kv_latent", "kv_latent", "present_kv_latent")]
        c_k = c_v = "present_kv_latent"
    else:
        writes = [("past_key_latent", "key_latent", "present_key_latent"),
                  ("past_value_latent", "value_latent", "present_value_latent")]
        c_k, c_v = "present_key_latent", "present_value_latent"
    filled_k, filled_v = "ck_filled", ("ck_filled" if joint else "cv_filled")
    nodes = [
        *prelude(writes[0][0]),
        *filled_length(low.selections),
        *cache_update(opset, writes),
        # only the filled slots are read: T = max(cache_length) + S (see function_body.filled_length)
        filled(c_k, "ck_filled"), *([] if joint else [filled(c_v, "cv_filled")]),
        n("Slice", ["rope_cos", "zero1", "T1", "axes0"], ["rope_cos_filled"]),
        n("Slice", ["rope_sin", "zero1", "T1", "axes0"], ["rope_sin_filled"]),
        int_const("rope_two1", [2]), int_const("rope_end1", [INT64_MAX]), int_const("lat_one1", [1]),
        attr_const("lat_kv", "num_kv_heads", onnx.AttributeProto.INT),
        n("Unsqueeze", ["lat_kv", "axes0"], ["lat_kv1"]),
        # keys [B, KV, T, D]: [B, 1, T, Rk] x [KV, Rk, D] (broadcast over the KV heads, no copy of the latents)
        *_heads("k_up", "lk_up", "lk_"),
        n("MatMul", [filled_k, "lk_up"], ["lk_lin"]),
    ]
    if low.bias:
        nodes += [*_bias_heads("k_bias", "lk_bias", "lk_"), n("Add", ["lk_lin", "lk_bias"], ["lk_keys"])]
    else:
        nodes.append(n("Identity", ["lk_lin"], ["lk_keys"]))
    nodes += [
        *(_rms_norm("lk_keys", "k_norm_weight", "lk_normed", opset) if low.k_norm
          else [n("Identity", ["lk_keys"], ["lk_normed"])]),
        *_rope("lk_normed", "rope_cos_filled", "rope_sin_filled", "latent_keys", "rk_"),
        n("Gather", ["rope_cos", "pos"], ["rq_cos3"], axis=0), n("Unsqueeze", ["rq_cos3", "axes1"], ["rq_cos"]),
        n("Gather", ["rope_sin", "pos"], ["rq_sin3"], axis=0), n("Unsqueeze", ["rq_sin3", "axes1"], ["rq_sin"]),
        *_rope("query", "rq_cos", "rq_sin", "query_rotated", "rq_"),
        *attention("query_rotated", "latent_keys", "", opset, lowering=low.attention,
                   values=_latent_values(filled_v, "v_up", "v_bias" if low.bias else None)),
    ]
    fn = helper.make_function(DOMAIN, LATENT_OP_TYPE, inputs, outputs, nodes,
                              opset_imports=[helper.make_opsetid("", opset)], attributes=attribute_names)
    if lowering is not None:
        fn.overload = low.overload
    return fn


def _all_zero(model: onnx.ModelProto, name: str) -> bool:
    """Whether graph value `name` is an initializer or Constant of zeros only (False when unknown)."""
    for init in model.graph.initializer:
        if init.name == name:
            try:
                return not np.any(numpy_helper.to_array(init))
            except Exception:  # external data not loaded: keep the bias
                return False
    for node in model.graph.node:
        if node.op_type == "Constant" and list(node.output) == [name]:
            for a in node.attribute:
                if a.name == "value":
                    return not np.any(numpy_helper.to_array(a.t))
    return False


def latent_layer_lowering(model: onnx.ModelProto, node: onnx.NodeProto) -> LatentLowering:
    """The cheapest lowering with the semantics of KVLatentAttention `node` of `model`."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x = dict(zip(latent_io(bool(attrs["joint_kv"]))[0], node.input))
    low = layer_lowering(attrs, fused_ok=False)
    bias = not (_all_zero(model, x["k_bias"]) and _all_zero(model, x["v_bias"]))
    return LatentLowering(k_norm=attrs["k_norm_eps"] > 0, bias=bias, softcap=low.softcap, window=low.window,
                          sink=low.sink, selections=low.selections)


def attach_latent_functions(model: onnx.ModelProto, nodes: list[onnx.NodeProto], names: list[str], opset: int,
                            joint: bool) -> list[str]:
    """One KVLatentAttention function overload per distinct `latent_layer_lowering` of `nodes` (each node names
    its own); returns the overload of each node."""
    lowerings: dict[str, LatentLowering] = {}
    for node in nodes:
        low = latent_layer_lowering(model, node)
        lowerings.setdefault(low.overload, low)
        node.overload = low.overload
    for low in lowerings.values():
        model.functions.append(kv_latent_attention_function(names, opset, joint, low.k_norm, lowering=low))
    model.ir_version = max(model.ir_version, 10)  # FunctionProto / NodeProto `overload`
    return [node.overload for node in nodes]
