"""The model-local ONNX function that defines `kvconvert::KVLatentAttention` with standard ops.

Latent cache update, key/value rebuild (up-projection + bias, k_norm, RoPE at slot positions), then the
attention shared with KVAttention (`function_body.prelude` / `cache_update` / `attention`). Semantics:
`latent_op.kv_latent_attention_reference`; tests/test_export_onnx_latent.py compares the two.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from .attention_op import DOMAIN
from .function_body import (Lowering, attention, attr_const, cache_update, filled, filled_length, int_const, prelude,
                            reduce_op)
from .latent_op import LATENT_OP_TYPE, latent_io

INT64_MAX = 2**63 - 1


def _expand(latent: str, up: str, bias: str, out: str, p: str) -> list[onnx.NodeProto]:
    """`out` [B, KV, T, D] = latent [B, 1, T, R] @ up [R, KV*D] + bias."""
    n = helper.make_node
    return [
        n("Squeeze", [latent, "axes1"], [f"{p}c"]), n("MatMul", [f"{p}c", up], [f"{p}lin"]),
        n("Add", [f"{p}lin", bias], [f"{p}biased"]),
        n("Concat", ["zero1", "zero1", "lat_kv1", "minus1"], [f"{p}shape"], axis=0),
        n("Reshape", [f"{p}biased", f"{p}shape"], [f"{p}heads"]),
        n("Transpose", [f"{p}heads"], [out], perm=[0, 2, 1, 3]),
    ]


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
    """Rotate-half RoPE of the first R = cos.shape[-1] dims of x [..., N, D]; cos/sin broadcast to [..., N, R]."""
    n = helper.make_node
    return [
        n("Shape", [cos], [f"{p}R1"], start=-1), n("Div", [f"{p}R1", "rope_two1"], [f"{p}half1"]),
        n("Slice", [x, "zero1", f"{p}R1", "minus1"], [f"{p}rot"]),
        n("Slice", [x, f"{p}R1", "rope_end1", "minus1"], [f"{p}pass"]),
        n("Slice", [f"{p}rot", "zero1", f"{p}half1", "minus1"], [f"{p}x1"]),
        n("Slice", [f"{p}rot", f"{p}half1", f"{p}R1", "minus1"], [f"{p}x2"]),
        n("Neg", [f"{p}x2"], [f"{p}nx2"]), n("Concat", [f"{p}nx2", f"{p}x1"], [f"{p}halves"], axis=-1),
        n("Mul", [f"{p}rot", cos], [f"{p}a"]), n("Mul", [f"{p}halves", sin], [f"{p}b"]),
        n("Add", [f"{p}a", f"{p}b"], [f"{p}rotated"]),
        n("Concat", [f"{p}rotated", f"{p}pass"], [out], axis=-1),
    ]


def kv_latent_attention_function(attribute_names: list[str], opset: int, joint: bool, k_norm: bool,
                                 page_topk: bool = False, block_sparse: bool = False) -> onnx.FunctionProto:
    """FunctionProto of KVLatentAttention (separate or `joint` latents); `k_norm` adds the key RMSNorm
    (QK-norm models), `page_topk` / `block_sparse` the policy selections, as for KVAttention."""
    n = helper.make_node
    inputs, outputs = latent_io(joint)
    if joint:
        writes = [("past_kv_latent", "kv_latent", "present_kv_latent")]
        c_k = c_v = "present_kv_latent"
    else:
        writes = [("past_key_latent", "key_latent", "present_key_latent"),
                  ("past_value_latent", "value_latent", "present_value_latent")]
        c_k, c_v = "present_key_latent", "present_value_latent"
    selections = tuple(name for name, on in (("page_topk", page_topk), ("block_sparse_prefill", block_sparse)) if on)
    filled_k, filled_v = "ck_filled", ("ck_filled" if joint else "cv_filled")
    nodes = [
        *prelude(writes[0][0]),
        *filled_length(selections),
        *cache_update(opset, writes),
        # only the filled slots are rebuilt: T = max(cache_length) + S (see function_body.filled_length)
        filled(c_k, "ck_filled"), *([] if joint else [filled(c_v, "cv_filled")]),
        n("Slice", ["rope_cos", "zero1", "T1", "axes0"], ["rope_cos_filled"]),
        n("Slice", ["rope_sin", "zero1", "T1", "axes0"], ["rope_sin_filled"]),
        int_const("rope_two1", [2]), int_const("rope_end1", [INT64_MAX]),
        attr_const("lat_kv", "num_kv_heads", onnx.AttributeProto.INT),
        n("Unsqueeze", ["lat_kv", "axes0"], ["lat_kv1"]),
        *_expand(filled_k, "k_up", "k_bias", "lk_keys", "lk_"),
        *(_rms_norm("lk_keys", "k_norm_weight", "lk_normed", opset) if k_norm
          else [n("Identity", ["lk_keys"], ["lk_normed"])]),
        *_rope("lk_normed", "rope_cos_filled", "rope_sin_filled", "latent_keys", "rk_"),
        *_expand(filled_v, "v_up", "v_bias", "latent_values", "lv_"),
        n("Gather", ["rope_cos", "pos"], ["rq_cos3"], axis=0), n("Unsqueeze", ["rq_cos3", "axes1"], ["rq_cos"]),
        n("Gather", ["rope_sin", "pos"], ["rq_sin3"], axis=0), n("Unsqueeze", ["rq_sin3", "axes1"], ["rq_sin"]),
        *_rope("query", "rq_cos", "rq_sin", "query_rotated", "rq_"),
        *attention("query_rotated", "latent_keys", "latent_values", opset, lowering=Lowering(selections=selections)),
    ]
    return helper.make_function(DOMAIN, LATENT_OP_TYPE, inputs, outputs, nodes,
                                opset_imports=[helper.make_opsetid("", opset)], attributes=attribute_names)
