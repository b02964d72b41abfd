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


def _scalar(out: str, value: float, dtype: int) -> onnx.NodeProto:
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


def _reduce(op: str, x: str, axes: str, axis: int, out: str, opset: int) -> onnx.NodeProto:
    """ReduceMin/ReduceMax without keepdims; axes became an input in opset 18."""
    if opset >= 18:
        return helper.make_node(op, [x, axes], [out], keepdims=0)
    return helper.make_node(op, [x], [out], axes=[axis], keepdims=0)


def _page_topk(out: str, opset: int) -> list[onnx.NodeProto]:
    """`out` bool [B, KV, 1, 1, T]: slots of the pages a page_topk decode step reads (all slots when the
    layer has no page_topk, in prefill, or below dense_below). Same rule as kvconvert.kernels.selection:
    per-page key min/max over valid slots, score = max over the group's heads of sum_d max(q*kmin, q*kmax),
    pages kept k = min(n, max(ceil(budget/page) or ceil(keep*n), sink_pages + recent_pages)), rank key
    +inf for sink/recent pages, -inf past the last page or NaN, stable descending TopK.
    Needs T % page == 0 (checked at export)."""
    n = helper.make_node
    F, I = onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT
    return [
        _const_from_attr("pg", "policy_decode_page", I), _const_from_attr("pg_keep", "policy_decode_keep", F),
        _const_from_attr("pg_budget", "policy_decode_budget", I),
        _const_from_attr("pg_sink", "policy_decode_sink_pages", I),
        _const_from_attr("pg_recent", "policy_decode_recent_pages", I),
        _const_from_attr("pg_dense_below", "policy_decode_dense_below", I),
        _scalar("pg_inf", float("inf"), TensorProto.FLOAT), _scalar("pg_eps", 1e-9, TensorProto.DOUBLE),
        _ints("pg_axes3", [3]), _ints("pg_axes2", [2]), _ints("pg_axes_last", [-1]), _ints("pg_axes_1_2", [1, 2]),
        _ints("pg_axes_2_3", [2, 3]), _ints("one1", [1]), _ints("active5_shape", [-1, 1, 1, 1, 1]),
        n("Greater", ["pg", "i0"], ["pg_on"]), n("Where", ["pg_on", "pg", "T"], ["pg_size"]),
        n("Div", ["T", "pg_size"], ["P"]), n("Unsqueeze", ["P", "axes0"], ["P1"]),
        n("Unsqueeze", ["pg_size", "axes0"], ["pg_size1"]),
        # L = cache_length + S valid slots per row; n = ceil(L / page)
        n("Add", ["cache_length", "S"], ["L"]),
        n("Add", ["L", "pg_size"], ["L_plus"]), n("Sub", ["L_plus", "i1"], ["L_round"]),
        n("Div", ["L_round", "pg_size"], ["n_pages"]),
        # per-page key min / max over valid slots: [B, KV, P, D]
        n("Concat", ["zero1", "zero1", "P1", "pg_size1", "minus1"], ["k5_shape"], axis=0),
        n("Cast", ["present_key"], ["k_f"], to=TensorProto.FLOAT),
        n("Reshape", ["k_f", "k5_shape"], ["k5"]),
        n("Unsqueeze", ["L", "axes1"], ["L_b1"]), n("Less", ["arange_t", "L_b1"], ["slot_valid"]),
        n("Concat", ["zero1", "one1", "P1", "pg_size1", "one1"], ["valid5_shape"], axis=0),
        n("Reshape", ["slot_valid", "valid5_shape"], ["valid5"]),
        n("Neg", ["pg_inf"], ["pg_ninf"]),
        n("Where", ["valid5", "k5", "pg_inf"], ["k5_lo"]), n("Where", ["valid5", "k5", "pg_ninf"], ["k5_hi"]),
        _reduce("ReduceMin", "k5_lo", "pg_axes3", 3, "kmin", opset),
        _reduce("ReduceMax", "k5_hi", "pg_axes3", 3, "kmax", opset),
        # scores [B, KV, P] from the last query row
        n("Sub", ["S", "i1"], ["last_row"]), n("Gather", ["query", "last_row"], ["q_last"], axis=2),
        n("Cast", ["q_last"], ["q_last_f"], to=TensorProto.FLOAT),
        n("Shape", ["query"], ["D1"], start=3, end=4),
        n("Concat", ["zero1", "KV1", "minus1", "one1", "D1"], ["qg_shape"], axis=0),
        n("Reshape", ["q_last_f", "qg_shape"], ["qg"]),
        n("Unsqueeze", ["kmin", "pg_axes2"], ["kmin_g"]), n("Unsqueeze", ["kmax", "pg_axes2"], ["kmax_g"]),
        n("Mul", ["qg", "kmin_g"], ["q_lo"]), n("Mul", ["qg", "kmax_g"], ["q_hi"]),
        n("Max", ["q_lo", "q_hi"], ["q_bound"]),
        n("ReduceSum", ["q_bound", "pg_axes_last"], ["per_head"], keepdims=0),
        _reduce("ReduceMax", "per_head", "pg_axes2", 2, "page_score", opset),
        # pages kept per row
        n("Add", ["pg_budget", "pg_size"], ["b_plus"]), n("Sub", ["b_plus", "i1"], ["b_round"]),
        n("Div", ["b_round", "pg_size"], ["k_budget"]),
        n("Cast", ["n_pages"], ["n_d"], to=TensorProto.DOUBLE), n("Cast", ["pg_keep"], ["keep_d"], to=TensorProto.DOUBLE),
        n("Mul", ["n_d", "keep_d"], ["kn_d"]), n("Sub", ["kn_d", "pg_eps"], ["kn_eps"]), n("Ceil", ["kn_eps"], ["kn_ceil"]),
        n("Cast", ["kn_ceil"], ["k_keep"], to=TensorProto.INT64),
        n("Greater", ["pg_budget", "i0"], ["has_budget"]),
        n("Where", ["has_budget", "k_budget", "k_keep"], ["k_raw"]),
        n("Less", ["L", "pg_dense_below"], ["dense_row"]),
        n("Where", ["dense_row", "n_pages", "k_raw"], ["k_req"]),
        n("Add", ["pg_sink", "pg_recent"], ["forced_n"]), n("Max", ["k_req", "forced_n"], ["k_min"]),
        n("Min", ["k_min", "n_pages"], ["k_pages"]),
        # rank key and stable descending TopK over all P pages
        n("Range", ["i0", "P", "i1"], ["page_idx"]),
        n("Unsqueeze", ["n_pages", "pg_axes_1_2"], ["n_b11"]),
        n("Sub", ["n_b11", "pg_recent"], ["recent_start"]),
        n("Less", ["page_idx", "pg_sink"], ["is_sink"]), n("GreaterOrEqual", ["page_idx", "recent_start"], ["is_recent"]),
        n("Or", ["is_sink", "is_recent"], ["forced"]), n("GreaterOrEqual", ["page_idx", "n_b11"], ["beyond"]),
        n("IsNaN", ["page_score"], ["score_nan"]),
        n("Where", ["score_nan", "pg_ninf", "page_score"], ["key0"]),
        n("Where", ["forced", "pg_inf", "key0"], ["key1"]),
        n("Where", ["beyond", "pg_ninf", "key1"], ["rank_key"]),
        n("TopK", ["rank_key", "P1"], ["_topk_values", "order"], axis=-1, largest=1, sorted=1),
        n("Unsqueeze", ["k_pages", "pg_axes_1_2"], ["k_b11"]),
        n("Less", ["page_idx", "k_b11"], ["rank_kept"]),
        n("Shape", ["order"], ["order_shape"]), n("Expand", ["rank_kept", "order_shape"], ["rank_kept_full"]),
        n("Cast", ["rank_kept_full"], ["rank_kept_f"], to=TensorProto.FLOAT),
        n("ConstantOfShape", ["order_shape"], ["page_zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
        n("ScatterElements", ["page_zero", "order", "rank_kept_f"], ["page_kept_f"], axis=2),
        # page -> slots [B, KV, T]; gate: page_topk layer, decode step, row not dense
        n("Unsqueeze", ["page_kept_f", "pg_axes_last"], ["page_kept4"]),
        n("Shape", ["page_kept4"], ["pk4_shape"]), n("Slice", ["pk4_shape", "zero1", "minus1"], ["pk4_head"]),
        n("Concat", ["pk4_head", "pg_size1"], ["pk4_target"], axis=0),
        n("Expand", ["page_kept4", "pk4_target"], ["slots_kept4"]),
        n("Concat", ["zero1", "zero1", "T1"], ["slots_shape"], axis=0),
        n("Reshape", ["slots_kept4", "slots_shape"], ["slots_kept_f"]),
        n("Cast", ["slots_kept_f"], ["slots_kept"], to=TensorProto.BOOL),
        n("Unsqueeze", ["slots_kept", "pg_axes_2_3"], ["slots_kept5"]),
        n("Not", ["dense_row"], ["sparse_row"]),
        n("And", ["pg_on", "is_decode"], ["pg_step"]), n("And", ["pg_step", "sparse_row"], ["pg_active"]),
        n("Reshape", ["pg_active", "active5_shape"], ["pg_active5"]),
        n("Not", ["pg_active5"], ["pg_inactive5"]),
        n("Or", ["pg_inactive5", "slots_kept5"], [out]),
    ]


def kv_attention_function(attribute_names: list[str], opset: int, page_topk: bool = False) -> onnx.FunctionProto:
    """FunctionProto of KVAttention; `attribute_names` are all attributes the nodes carry; `page_topk` adds
    the page selection (only models exported with a page_topk policy pay for it)."""
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
        n("Unsqueeze", ["allowed", "axes_1_2"], ["allowed5" if not page_topk else "allowed5_base"]),
        *(_page_topk("page_ok5", opset) + [n("And", ["allowed5_base", "page_ok5"], ["allowed5"])]
          if page_topk else []),
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
