"""The model-local ONNX function that defines `kvconvert::KVAttention` with standard ops.

ONNX Runtime inlines it, so the exported graph runs anywhere as the reference; an engine binds its own
plugin to the node instead (attributes `plugin_namespace` / `plugin_version`). Semantics: see
`attention_op.kv_attention_reference`; the two are kept equal by the export validation and by
tests/test_export_onnx_op.py.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from .attention_op import DOMAIN, OP_TYPE

INPUTS = ["query", "key", "value", "past_key", "past_value", "cache_length"]
OUTPUTS = ["output", "present_key", "present_value"]


def _ref_attr(name: str, ref: str, kind: int) -> onnx.AttributeProto:
    attr = onnx.AttributeProto()
    attr.name = name
    attr.ref_attr_name = ref
    attr.type = kind
    return attr


def _const_from_attr(out: str, attr: str, kind: int) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [out])
    field = {onnx.AttributeProto.FLOAT: "value_float", onnx.AttributeProto.INT: "value_int"}[kind]
    node.attribute.append(_ref_attr(field, attr, kind))
    return node


def _ints(out: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [out], value=helper.make_tensor(out, TensorProto.INT64,
                                                                           [len(values)], values))


def _scalar(out: str, value: float | int, dtype: int) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [out], value=helper.make_tensor(out, dtype, [], [value]))


TENSOR_SCATTER_OPSET = 24


def _cache_update(opset: int) -> list[onnx.NodeProto]:
    """present = past with the new K/V written at slots cache_length + s.

    Opset >= 24: `TensorScatter` (ONNX's KV-cache update op; ONNX Runtime updates in place when the present
    output is bound to the past input's buffer). Older opsets: `ScatterElements`, always a copy of the buffer.
    """
    n = helper.make_node
    if opset >= TENSOR_SCATTER_OPSET:
        return [n("TensorScatter", ["past_key", "key", "cache_length"], ["present_key"], axis=2),
                n("TensorScatter", ["past_value", "value", "cache_length"], ["present_value"], axis=2)]
    return [
        n("Unsqueeze", ["pos", "axes_1_3"], ["pos4"]),
        n("Shape", ["key"], ["key_shape"]), n("Shape", ["value"], ["value_shape"]),
        n("Expand", ["pos4", "key_shape"], ["idx_k"]), n("Expand", ["pos4", "value_shape"], ["idx_v"]),
        n("ScatterElements", ["past_key", "idx_k", "key"], ["present_key"], axis=2),
        n("ScatterElements", ["past_value", "idx_v", "value"], ["present_value"], axis=2),
    ]


def kv_attention_function(attribute_names: list[str], opset: int) -> onnx.FunctionProto:
    """FunctionProto of KVAttention; `attribute_names` are all attributes the nodes carry."""
    n = helper.make_node
    F, I = onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT
    nodes = [
        _ints("axes0", [0]), _ints("axes1", [1]), _ints("axes_1_3", [1, 3]), _ints("axes_1_2", [1, 2]),
        _ints("zero1", [0]), _ints("minus1", [-1]),
        _scalar("i0", 0, TensorProto.INT64), _scalar("i1", 1, TensorProto.INT64),
        _scalar("neg_inf", float("-inf"), TensorProto.FLOAT),
        _const_from_attr("scale_f", "scale", F), _const_from_attr("softcap_f", "softcap", F),
        _const_from_attr("window", "sliding_window", I),
        _const_from_attr("decode_sink", "policy_decode_sink", I),
        _const_from_attr("decode_window", "policy_decode_window", I),
        _const_from_attr("prefill_sink", "policy_prefill_sink", I),
        _const_from_attr("prefill_window", "policy_prefill_window", I),
        # sizes
        n("Shape", ["query"], ["S1"], start=2, end=3), n("Shape", ["past_key"], ["T1"], start=2, end=3),
        n("Squeeze", ["S1", "axes0"], ["S"]), n("Squeeze", ["T1", "axes0"], ["T"]),
        # absolute slot of every new token: pos [B, S]
        n("Range", ["i0", "S", "i1"], ["arange_s"]),
        n("Unsqueeze", ["cache_length", "axes1"], ["cl_b1"]), n("Unsqueeze", ["arange_s", "axes0"], ["ar_1s"]),
        n("Add", ["cl_b1", "ar_1s"], ["pos"]),
        *_cache_update(opset),
        # GQA without repeating the cache: q [B, H, S, D] -> [B, KV, G*S, D]
        n("Shape", ["past_key"], ["KV1"], start=1, end=2),
        n("Concat", ["zero1", "KV1", "minus1", "zero1"], ["q_grouped_shape"], axis=0),
        n("Reshape", ["query", "q_grouped_shape"], ["q_grouped"]),
        n("Transpose", ["present_key"], ["key_t"], perm=[0, 1, 3, 2]),
        n("MatMul", ["q_grouped", "key_t"], ["scores_raw"]),
        n("CastLike", ["scale_f", "query"], ["scale_q"]),
        n("Mul", ["scores_raw", "scale_q"], ["scores_scaled"]),
        # optional tanh soft-capping (softcap > 0)
        n("CastLike", ["softcap_f", "query"], ["softcap_q"]),
        n("Div", ["scores_scaled", "softcap_q"], ["sc_div"]), n("Tanh", ["sc_div"], ["sc_tanh"]),
        n("Mul", ["sc_tanh", "softcap_q"], ["sc_capped"]),
        _scalar("f0", 0.0, TensorProto.FLOAT), n("Greater", ["softcap_f", "f0"], ["use_softcap"]),
        n("Where", ["use_softcap", "sc_capped", "scores_scaled"], ["scores"]),
        # [B, KV, G, S, T]
        n("Concat", ["zero1", "zero1", "minus1", "S1", "T1"], ["scores5_shape"], axis=0),
        n("Reshape", ["scores", "scores5_shape"], ["scores5"]),
        # mask: slot j allowed for query s iff j <= pos and (window <= 0 or j > pos - window) and policy
        n("Range", ["i0", "T", "i1"], ["arange_t"]),
        n("Unsqueeze", ["pos", "minus1"], ["pos_bs1"]),
        n("LessOrEqual", ["arange_t", "pos_bs1"], ["causal"]),
        n("Sub", ["pos_bs1", "window"], ["win_start"]), n("Greater", ["arange_t", "win_start"], ["in_window"]),
        n("LessOrEqual", ["window", "i0"], ["no_window"]),
        n("Or", ["in_window", "no_window"], ["window_ok"]),
        # sink_window policy of this phase (decode: S == 1): j < sink or j > pos - window (window 0 = off)
        n("Equal", ["S", "i1"], ["is_decode"]),
        n("Where", ["is_decode", "decode_sink", "prefill_sink"], ["p_sink"]),
        n("Where", ["is_decode", "decode_window", "prefill_window"], ["p_window"]),
        n("Less", ["arange_t", "p_sink"], ["in_sink"]),
        n("Sub", ["pos_bs1", "p_window"], ["p_start"]), n("Greater", ["arange_t", "p_start"], ["in_recent"]),
        n("LessOrEqual", ["p_window", "i0"], ["no_policy"]),
        n("Or", ["in_sink", "in_recent"], ["policy_keep"]), n("Or", ["policy_keep", "no_policy"], ["policy_ok"]),
        n("And", ["causal", "window_ok"], ["model_ok"]),
        n("And", ["model_ok", "policy_ok"], ["allowed"]),
        n("Unsqueeze", ["allowed", "axes_1_2"], ["allowed5"]),
        n("Cast", ["scores5"], ["scores5_f"], to=TensorProto.FLOAT),
        n("Where", ["allowed5", "scores5_f", "neg_inf"], ["masked"]),
        n("Softmax", ["masked"], ["probs_f"], axis=-1),
        n("CastLike", ["probs_f", "query"], ["probs5"]),
        n("Concat", ["zero1", "zero1", "minus1", "T1"], ["probs4_shape"], axis=0),
        n("Reshape", ["probs5", "probs4_shape"], ["probs"]),
        n("MatMul", ["probs", "present_value"], ["out_grouped"]),
        # [B, KV, G*S, Dv] -> [B, H, S, Dv] -> [B, S, H, Dv]
        n("Concat", ["zero1", "minus1", "S1", "zero1"], ["out_shape"], axis=0),
        n("Reshape", ["out_grouped", "out_shape"], ["out_heads"]),
        n("Transpose", ["out_heads"], ["output"], perm=[0, 2, 1, 3]),
    ]
    return helper.make_function(DOMAIN, OP_TYPE, INPUTS, OUTPUTS, nodes,
                                opset_imports=[helper.make_opsetid("", opset)], attributes=attribute_names)
