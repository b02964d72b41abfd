"""The model-local ONNX function that defines `kvconvert::KVAttention` with standard ops.

ONNX Runtime inlines it, so the exported graph runs anywhere as the reference; an engine binds its own
plugin to the node instead (attributes `plugin_namespace` / `plugin_version`). Semantics: see
`attention_op.kv_attention_reference`; the two are kept equal by the export validation and by
tests/test_export_onnx_op.py.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def attr_const(out: str, attr: str, kind: int) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [out])
    field = {onnx.AttributeProto.FLOAT: "value_float", onnx.AttributeProto.INT: "value_int"}[kind]
    node.attribute.append(_ref_attr(field, attr, kind))
    return node


def int_const(out: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [out], value=helper.make_tensor(out, TensorProto.INT64,
                                                                           [len(values)], values))


def _scalar(out: str, value: float, dtype: int) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [out], value=helper.make_tensor(out, dtype, [], [value]))


TENSOR_SCATTER_OPSET = 24


def cache_update(opset: int, writes: list[tuple[str, str, str]]) -> list[onnx.NodeProto]:
    """Each (past, new, present): present = past [B, X, T, W] with new [B, X, S, W] written at slots
    cache_length + s (needs `pos` and `axes_1_3` from `prelude`).

    Opset >= 24: `TensorScatter` (ONNX's KV-cache update op; ONNX Runtime updates in place when the present
    output is bound to the past input's buffer). Older opsets: `ScatterElements`, always a copy of the buffer.
    """
    n = helper.make_node
    if opset >= TENSOR_SCATTER_OPSET:
        return [n("TensorScatter", [past, new, "cache_length"], [present], axis=2) for past, new, present in writes]
    nodes = [n("Unsqueeze", ["pos", "axes_1_3"], ["pos4"])]
    for past, new, present in writes:
        nodes += [n("Shape", [new], [f"{new}_shape"]), n("Expand", ["pos4", f"{new}_shape"], [f"{new}_idx"]),
                  n("ScatterElements", [past, f"{new}_idx", new], [present], axis=2)]
    return nodes


def reduce_op(op: str, x: str, axes: str, axis: int, out: str, opset: int, keepdims: int = 0) -> onnx.NodeProto:
    """ReduceMin/Max/Mean (axes became an input in opset 18; ReduceSum takes the input form always)."""
    if opset >= 18 or op == "ReduceSum":
        return helper.make_node(op, [x, axes], [out], keepdims=keepdims)
    return helper.make_node(op, [x], [out], axes=[axis], keepdims=keepdims)


def _block_sparse(out: str, opset: int, q: str, k: str) -> list[onnx.NodeProto]:
    """`out` bool [B, KV, 1, S, T]: slots of the key blocks a block_sparse_prefill step reads (all slots when
    the layer has no such policy, in decode, or when S < dense_below). Same rule as
    kvconvert.kernels.selection.block_importance + select_blocks, per row with L = cache_length + S keys.
    Needs T % tile == 0 (checked at export)."""
    n = helper.make_node
    F, I = onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT
    r = lambda op, x, ax, axis, o, keep=0: reduce_op(op, x, ax, axis, o, opset, keep)
    return [
        attr_const("bs_tile_attr", "policy_prefill_tile", I), attr_const("bs_mass", "policy_prefill_mass", F),
        attr_const("bs_density", "policy_prefill_density", F),
        attr_const("bs_sink", "policy_prefill_sink_blocks", I),
        attr_const("bs_local", "policy_prefill_local_blocks", I),
        attr_const("bs_dense_below", "policy_prefill_dense_below", I),
        _scalar("bs_inf", float("inf"), TensorProto.FLOAT), _scalar("bs_f0", 0.0, TensorProto.FLOAT),
        _scalar("bs_f1", 1.0, TensorProto.FLOAT), _scalar("bs_eps", 1e-9, TensorProto.DOUBLE),
        int_const("bs_ax1", [1]), int_const("bs_ax2", [2]), int_const("bs_ax3", [3]), int_const("bs_ax_last", [-1]),
        int_const("bs_ax_0_1", [0, 1]), int_const("bs_ax_3_5", [3, 5]), int_const("bs_one1", [1]), int_const("bs_zero1", [0]),
        n("Neg", ["bs_inf"], ["bs_ninf"]),
        n("Greater", ["bs_tile_attr", "i0"], ["bs_on"]), n("Where", ["bs_on", "bs_tile_attr", "T"], ["bs_tile"]),
        n("Unsqueeze", ["bs_tile", "axes0"], ["bs_tile1"]),
        n("Div", ["T", "bs_tile"], ["bs_NK"]), n("Unsqueeze", ["bs_NK", "axes0"], ["bs_NK1"]),
        n("Add", ["S", "bs_tile"], ["bs_s_plus"]), n("Sub", ["bs_s_plus", "i1"], ["bs_s_round"]),
        n("Div", ["bs_s_round", "bs_tile"], ["bs_NQ"]), n("Unsqueeze", ["bs_NQ", "axes0"], ["bs_NQ1"]),
        n("Mul", ["bs_NQ", "bs_tile"], ["bs_SP"]), n("Unsqueeze", ["bs_SP", "axes0"], ["bs_SP1"]),
        n("Add", ["cache_length", "S"], ["bs_L"]),
        # pooled keys kbar [B, KV, NK, D]: mean over each block's valid slots (< L)
        n("Cast", [k], ["bs_kf"], to=TensorProto.FLOAT),
        n("Concat", ["zero1", "zero1", "bs_NK1", "bs_tile1", "minus1"], ["bs_k5_shape"], axis=0),
        n("Reshape", ["bs_kf", "bs_k5_shape"], ["bs_k5"]),
        n("Unsqueeze", ["bs_L", "axes1"], ["bs_L_b1"]), n("Less", ["arange_t", "bs_L_b1"], ["bs_slot_valid"]),
        n("Concat", ["zero1", "bs_one1", "bs_NK1", "bs_tile1", "bs_one1"], ["bs_valid5_shape"], axis=0),
        n("Reshape", ["bs_slot_valid", "bs_valid5_shape"], ["bs_valid5"]),
        n("Where", ["bs_valid5", "bs_k5", "bs_f0"], ["bs_k5_valid"]),
        r("ReduceSum", "bs_k5_valid", "bs_ax3", 3, "bs_ksum"),
        n("Cast", ["bs_valid5"], ["bs_valid5_f"], to=TensorProto.FLOAT),
        r("ReduceSum", "bs_valid5_f", "bs_ax3", 3, "bs_kcount"),
        n("Max", ["bs_kcount", "bs_f1"], ["bs_kcount1"]), n("Div", ["bs_ksum", "bs_kcount1"], ["bs_kbar"]),
        # pooled queries qbar [B, H, NQ, D]: mean over each block's rows (< S)
        n("Cast", [q], ["bs_qf"], to=TensorProto.FLOAT),
        n("Sub", ["bs_SP", "S"], ["bs_pad_rows"]), n("Unsqueeze", ["bs_pad_rows", "axes0"], ["bs_pad_rows1"]),
        n("Concat", ["bs_zero1", "bs_zero1", "bs_zero1", "bs_zero1", "bs_zero1", "bs_zero1", "bs_pad_rows1",
                     "bs_zero1"], ["bs_pads"], axis=0),
        n("Pad", ["bs_qf", "bs_pads"], ["bs_q_padded"]),
        n("Concat", ["zero1", "zero1", "bs_NQ1", "bs_tile1", "minus1"], ["bs_q5_shape"], axis=0),
        n("Reshape", ["bs_q_padded", "bs_q5_shape"], ["bs_q5"]),
        r("ReduceSum", "bs_q5", "bs_ax3", 3, "bs_qsum"),
        n("Range", ["i0", "bs_SP", "i1"], ["bs_rows"]), n("Less", ["bs_rows", "S"], ["bs_row_valid"]),
        n("Concat", ["bs_NQ1", "bs_tile1"], ["bs_rows_shape"], axis=0),
        n("Cast", ["bs_row_valid"], ["bs_row_valid_f"], to=TensorProto.FLOAT),
        n("Reshape", ["bs_row_valid_f", "bs_rows_shape"], ["bs_rows2"]),
        r("ReduceSum", "bs_rows2", "bs_ax_last", -1, "bs_qcount", 1),
        n("Div", ["bs_qsum", "bs_qcount"], ["bs_qbar"]),
        # importance [B, KV, NQ, NK]: softmax over causal key blocks of qbar.kbar*scale, mean over the group
        n("Shape", [q], ["bs_D1"], start=3, end=4),
        n("Concat", ["zero1", "KV1", "minus1", "bs_NQ1", "bs_D1"], ["bs_qg_shape"], axis=0),
        n("Reshape", ["bs_qbar", "bs_qg_shape"], ["bs_qg"]),
        n("Transpose", ["bs_kbar"], ["bs_kbar_t"], perm=[0, 1, 3, 2]),
        n("Unsqueeze", ["bs_kbar_t", "bs_ax2"], ["bs_kbar_g"]),
        n("MatMul", ["bs_qg", "bs_kbar_g"], ["bs_logits_raw"]),
        n("Mul", ["bs_logits_raw", "scale_f"], ["bs_logits"]),
        n("Range", ["i0", "bs_NQ", "i1"], ["bs_qblocks"]), n("Add", ["bs_qblocks", "i1"], ["bs_qb1"]),
        n("Mul", ["bs_qb1", "bs_tile"], ["bs_qend"]), n("Min", ["bs_qend", "S"], ["bs_qend_c"]),
        n("Sub", ["bs_qend_c", "i1"], ["bs_last_row"]),
        n("Sub", ["bs_L", "S"], ["bs_offset"]), n("Unsqueeze", ["bs_offset", "axes1"], ["bs_offset_b1"]),
        n("Add", ["bs_offset_b1", "bs_last_row"], ["bs_last_key"]), n("Div", ["bs_last_key", "bs_tile"], ["bs_diag"]),
        n("Unsqueeze", ["bs_diag", "bs_ax_last"], ["bs_diag3"]), n("Unsqueeze", ["bs_diag3", "bs_ax1"], ["bs_diag4"]),
        n("Range", ["i0", "bs_NK", "i1"], ["bs_kblocks"]),
        n("LessOrEqual", ["bs_kblocks", "bs_diag4"], ["bs_allowed"]),
        n("Unsqueeze", ["bs_allowed", "bs_ax2"], ["bs_allowed5"]),
        n("Where", ["bs_allowed5", "bs_logits", "bs_ninf"], ["bs_logits_masked"]),
        n("Softmax", ["bs_logits_masked"], ["bs_probs_g"], axis=-1),
        r("ReduceMean", "bs_probs_g", "bs_ax2", 2, "bs_probs"),
        # forced: sink and local blocks; candidates ranked by a stable descending TopK
        n("Less", ["bs_kblocks", "bs_sink"], ["bs_is_sink"]), n("Sub", ["bs_diag4", "bs_local"], ["bs_local_start"]),
        n("Greater", ["bs_kblocks", "bs_local_start"], ["bs_is_local"]),
        n("Or", ["bs_is_sink", "bs_is_local"], ["bs_sink_or_local"]),
        n("And", ["bs_allowed", "bs_sink_or_local"], ["bs_forced"]),
        n("Not", ["bs_forced"], ["bs_not_forced"]), n("And", ["bs_allowed", "bs_not_forced"], ["bs_cand"]),
        n("IsNaN", ["bs_probs"], ["bs_nan"]), n("Where", ["bs_nan", "bs_f0", "bs_probs"], ["bs_probs0"]),
        n("Where", ["bs_cand", "bs_probs0", "bs_ninf"], ["bs_key"]),
        n("TopK", ["bs_key", "bs_NK1"], ["bs_sorted_vals", "bs_order"], axis=-1, largest=1, sorted=1),
        n("Cast", ["bs_cand"], ["bs_cand_i"], to=TensorProto.INT64),
        r("ReduceSum", "bs_cand_i", "bs_ax_last", -1, "bs_n_cand", 1),
        n("Unsqueeze", ["bs_kblocks", "bs_ax_0_1"], ["bs_rank"]),
        n("Unsqueeze", ["bs_rank", "bs_ax1"], ["bs_rank4"]),
        n("Less", ["bs_rank4", "bs_n_cand"], ["bs_rank_in_cand"]),
        # density: the first max(0, ceil(density * allowed) - forced) candidates
        n("Cast", ["bs_allowed"], ["bs_allowed_i"], to=TensorProto.INT64),
        r("ReduceSum", "bs_allowed_i", "bs_ax_last", -1, "bs_n_allowed", 1),
        n("Cast", ["bs_forced"], ["bs_forced_i"], to=TensorProto.INT64),
        r("ReduceSum", "bs_forced_i", "bs_ax_last", -1, "bs_n_forced", 1),
        n("Cast", ["bs_n_allowed"], ["bs_n_allowed_d"], to=TensorProto.DOUBLE),
        n("Cast", ["bs_density"], ["bs_density_d"], to=TensorProto.DOUBLE),
        n("Mul", ["bs_n_allowed_d", "bs_density_d"], ["bs_target_d"]), n("Sub", ["bs_target_d", "bs_eps"], ["bs_t_eps"]),
        n("Ceil", ["bs_t_eps"], ["bs_t_ceil"]), n("Cast", ["bs_t_ceil"], ["bs_target"], to=TensorProto.INT64),
        n("Sub", ["bs_target", "bs_n_forced"], ["bs_take_raw"]), n("Max", ["bs_take_raw", "i0"], ["bs_take0"]),
        n("Min", ["bs_take0", "bs_n_cand"], ["bs_take"]),
        n("Less", ["bs_rank4", "bs_take"], ["bs_take_density"]),
        # mass: candidate at rank r kept iff forced mass + (cumsum - self) < mass
        n("Where", ["bs_forced", "bs_probs", "bs_f0"], ["bs_forced_p"]),
        r("ReduceSum", "bs_forced_p", "bs_ax_last", -1, "bs_fm", 1),
        n("IsInf", ["bs_sorted_vals"], ["bs_vals_inf"]), n("Where", ["bs_vals_inf", "bs_f0", "bs_sorted_vals"], ["bs_vals"]),
        _scalar("bs_last_axis", -1, TensorProto.INT64), n("CumSum", ["bs_vals", "bs_last_axis"], ["bs_cum"]), n("Sub", ["bs_cum", "bs_vals"], ["bs_before"]),
        n("Add", ["bs_fm", "bs_before"], ["bs_mass_before"]), n("Less", ["bs_mass_before", "bs_mass"], ["bs_under"]),
        n("And", ["bs_under", "bs_rank_in_cand"], ["bs_take_mass"]),
        n("Greater", ["bs_density", "bs_f0"], ["bs_use_density"]),
        n("Not", ["bs_use_density"], ["bs_use_mass"]),
        n("And", ["bs_use_density", "bs_take_density"], ["bs_by_density"]),
        n("And", ["bs_use_mass", "bs_take_mass"], ["bs_by_mass"]),
        n("Or", ["bs_by_density", "bs_by_mass"], ["bs_take_rank"]),
        n("Shape", ["bs_order"], ["bs_order_shape"]),
        n("Expand", ["bs_take_rank", "bs_order_shape"], ["bs_take_full"]),
        n("Cast", ["bs_take_full"], ["bs_take_f"], to=TensorProto.FLOAT),
        n("ConstantOfShape", ["bs_order_shape"], ["bs_zero_blocks"],
          value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
        n("ScatterElements", ["bs_zero_blocks", "bs_order", "bs_take_f"], ["bs_kept_cand_f"], axis=3),
        n("Cast", ["bs_kept_cand_f"], ["bs_kept_cand"], to=TensorProto.BOOL),
        n("Or", ["bs_forced", "bs_kept_cand"], ["bs_kept"]),
        # blocks -> slots [B, KV, 1, S, T]
        n("Cast", ["bs_kept"], ["bs_kept_f"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["bs_kept_f", "bs_ax_3_5"], ["bs_kept6"]),
        n("Shape", ["bs_kept_f"], ["bs_kept_shape"]),
        n("Slice", ["bs_kept_shape", "bs_zero1", "bs_ax3"], ["bs_b_kv_nq"]),
        n("Concat", ["bs_b_kv_nq", "bs_tile1", "bs_NK1", "bs_tile1"], ["bs_kept6_target"], axis=0),
        n("Expand", ["bs_kept6", "bs_kept6_target"], ["bs_kept6_full"]),
        n("Concat", ["zero1", "zero1", "bs_SP1", "T1"], ["bs_slots_shape"], axis=0),
        n("Reshape", ["bs_kept6_full", "bs_slots_shape"], ["bs_slots_padded"]),
        n("Slice", ["bs_slots_padded", "bs_zero1", "S1", "bs_ax2"], ["bs_slots_f"]),
        n("Cast", ["bs_slots_f"], ["bs_slots"], to=TensorProto.BOOL),
        n("Unsqueeze", ["bs_slots", "bs_ax2"], ["bs_slots5"]),
        n("Not", ["is_decode"], ["bs_prefill"]), n("GreaterOrEqual", ["S", "bs_dense_below"], ["bs_long"]),
        n("And", ["bs_on", "bs_prefill"], ["bs_step"]), n("And", ["bs_step", "bs_long"], ["bs_active"]),
        n("Not", ["bs_active"], ["bs_inactive"]),
        n("Or", ["bs_inactive", "bs_slots5"], [out]),
    ]


def _page_topk(out: str, opset: int, q: str, k: str) -> list[onnx.NodeProto]:
    """`out` bool [B, KV, 1, 1, T]: slots of the pages a page_topk decode step reads (all slots when the
    layer has no page_topk, in prefill, or below dense_below). Same rule as kvconvert.kernels.selection:
    per-page key min/max over valid slots, score = max over the group's heads of sum_d max(q*kmin, q*kmax),
    pages kept k = min(n, max(ceil(budget/page) or ceil(keep*n), sink_pages + recent_pages)), rank key
    +inf for sink/recent pages, -inf past the last page or NaN, stable descending TopK.
    Needs T % page == 0 (checked at export)."""
    n = helper.make_node
    F, I = onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT
    return [
        attr_const("pg", "policy_decode_page", I), attr_const("pg_keep", "policy_decode_keep", F),
        attr_const("pg_budget", "policy_decode_budget", I),
        attr_const("pg_sink", "policy_decode_sink_pages", I),
        attr_const("pg_recent", "policy_decode_recent_pages", I),
        attr_const("pg_dense_below", "policy_decode_dense_below", I),
        _scalar("pg_inf", float("inf"), TensorProto.FLOAT), _scalar("pg_eps", 1e-9, TensorProto.DOUBLE),
        int_const("pg_axes3", [3]), int_const("pg_axes2", [2]), int_const("pg_axes_last", [-1]), int_const("pg_axes_1_2", [1, 2]),
        int_const("pg_axes_2_3", [2, 3]), int_const("one1", [1]), int_const("active5_shape", [-1, 1, 1, 1, 1]),
        n("Greater", ["pg", "i0"], ["pg_on"]), n("Where", ["pg_on", "pg", "T"], ["pg_size"]),
        n("Div", ["T", "pg_size"], ["P"]), n("Unsqueeze", ["P", "axes0"], ["P1"]),
        n("Unsqueeze", ["pg_size", "axes0"], ["pg_size1"]),
        # L = cache_length + S valid slots per row; n = ceil(L / page)
        n("Add", ["cache_length", "S"], ["L"]),
        n("Add", ["L", "pg_size"], ["L_plus"]), n("Sub", ["L_plus", "i1"], ["L_round"]),
        n("Div", ["L_round", "pg_size"], ["n_pages"]),
        # per-page key min / max over valid slots: [B, KV, P, D]
        n("Concat", ["zero1", "zero1", "P1", "pg_size1", "minus1"], ["k5_shape"], axis=0),
        n("Cast", [k], ["k_f"], to=TensorProto.FLOAT),
        n("Reshape", ["k_f", "k5_shape"], ["k5"]),
        n("Unsqueeze", ["L", "axes1"], ["L_b1"]), n("Less", ["arange_t", "L_b1"], ["slot_valid"]),
        n("Concat", ["zero1", "one1", "P1", "pg_size1", "one1"], ["valid5_shape"], axis=0),
        n("Reshape", ["slot_valid", "valid5_shape"], ["valid5"]),
        n("Neg", ["pg_inf"], ["pg_ninf"]),
        n("Where", ["valid5", "k5", "pg_inf"], ["k5_lo"]), n("Where", ["valid5", "k5", "pg_ninf"], ["k5_hi"]),
        reduce_op("ReduceMin", "k5_lo", "pg_axes3", 3, "kmin", opset),
        reduce_op("ReduceMax", "k5_hi", "pg_axes3", 3, "kmax", opset),
        # scores [B, KV, P] from the last query row
        n("Sub", ["S", "i1"], ["last_row"]), n("Gather", [q, "last_row"], ["q_last"], axis=2),
        n("Cast", ["q_last"], ["q_last_f"], to=TensorProto.FLOAT),
        n("Shape", [q], ["D1"], start=3, end=4),
        n("Concat", ["zero1", "KV1", "minus1", "one1", "D1"], ["qg_shape"], axis=0),
        n("Reshape", ["q_last_f", "qg_shape"], ["qg"]),
        n("Unsqueeze", ["kmin", "pg_axes2"], ["kmin_g"]), n("Unsqueeze", ["kmax", "pg_axes2"], ["kmax_g"]),
        n("Mul", ["qg", "kmin_g"], ["q_lo"]), n("Mul", ["qg", "kmax_g"], ["q_hi"]),
        n("Max", ["q_lo", "q_hi"], ["q_bound"]),
        n("ReduceSum", ["q_bound", "pg_axes_last"], ["per_head"], keepdims=0),
        reduce_op("ReduceMax", "per_head", "pg_axes2", 2, "page_score", opset),
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
        n("Or", ["is_sink", "is_recent"], ["pg_forced"]), n("GreaterOrEqual", ["page_idx", "n_b11"], ["beyond"]),
        n("IsNaN", ["page_score"], ["score_nan"]),
        n("Where", ["score_nan", "pg_ninf", "page_score"], ["key0"]),
        n("Where", ["pg_forced", "pg_inf", "key0"], ["key1"]),
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


def _combine_masks(parts: list[str]) -> list[onnx.NodeProto]:
    n = helper.make_node
    nodes, current = [], parts[0]
    for i, part in enumerate(parts[1:]):
        nodes.append(n("And", [current, part], [f"allowed5_{i}"]))
        current = f"allowed5_{i}"
    nodes.append(n("Identity", [current], ["allowed5"]))
    return nodes


SELECTIONS = {"page_topk": ("page_ok5", _page_topk), "block_sparse_prefill": ("block_ok5", _block_sparse)}
"""Per policy name: (mask name, lowering(out, opset, q, k) -> nodes) of the slots its selection keeps."""


@dataclass(frozen=True)
class Lowering:
    """What one KVAttention function body computes. A graph carries one function overload per distinct lowering
    of its layers (`overload`), so a layer pays only for what it uses; `Lowering()` is the general body (every
    attribute read at run time) that the op-level tests and a plain node without overload get.

    `fused`: ONNX Runtime's `com.microsoft::GroupQueryAttention` (dense layers: causal, the model's sliding
    window `local_window`, soft-capping by attribute; cache update in the op, in place when present is bound to
    past). Otherwise standard ops over the filled slots with the soft-capping (`softcap`), model-window
    (`window`) and sink_window (`sink`) nodes emitted only when set, and the `selections` of those policies.
    """

    fused: bool = False
    local_window: int = 0
    softcap: bool = True
    window: bool = True
    sink: bool = True
    selections: tuple[str, ...] = ()

    @property
    def overload(self) -> str:
        if self.fused:
            return f"gqa_w{self.local_window}"
        flags = [name for name, on in (("softcap", self.softcap), ("window", self.window), ("sink", self.sink)) if on]
        return "_".join(["masked", *flags, *self.selections])


def layer_lowering(attrs: dict, fused_ok: bool) -> Lowering:
    """The cheapest lowering with the semantics of a node carrying `attrs` (`fused_ok`: the graph targets ONNX
    Runtime and values have the keys' head size)."""
    sink = attrs["policy_decode_window"] > 0 or attrs["policy_prefill_window"] > 0
    selections = tuple(name for name, on in (("page_topk", attrs["policy_decode_page"] > 0),
                                             ("block_sparse_prefill", attrs["policy_prefill_tile"] > 0)) if on)
    if fused_ok and not sink and not selections:
        return Lowering(fused=True, local_window=int(attrs["sliding_window"]))
    return Lowering(softcap=attrs["softcap"] > 0, window=attrs["sliding_window"] > 0, sink=sink, selections=selections)


def prelude(past: str) -> list[onnx.NodeProto]:
    """Constants, attribute values and sizes every kvconvert attention body starts with: `S`/`S1` (new
    tokens, from `query`), `Tcap`/`Tcap1` (capacity, axis 2 of `past`), `pos` [B, S] = cache_length + s."""
    n = helper.make_node
    F = onnx.AttributeProto.FLOAT
    return [
        int_const("axes0", [0]), int_const("axes1", [1]), int_const("axes2", [2]), int_const("axes_1_3", [1, 3]),
        int_const("axes_1_2", [1, 2]), int_const("zero1", [0]), int_const("minus1", [-1]),
        _scalar("i0", 0, TensorProto.INT64), _scalar("i1", 1, TensorProto.INT64),
        _scalar("neg_inf", float("-inf"), TensorProto.FLOAT),
        attr_const("scale_f", "scale", F),
        n("Shape", ["query"], ["S1"], start=2, end=3), n("Shape", [past], ["Tcap1"], start=2, end=3),
        n("Squeeze", ["S1", "axes0"], ["S"]), n("Squeeze", ["Tcap1", "axes0"], ["Tcap"]),
        n("Range", ["i0", "S", "i1"], ["arange_s"]),
        n("Unsqueeze", ["cache_length", "axes1"], ["cl_b1"]), n("Unsqueeze", ["arange_s", "axes0"], ["ar_1s"]),
        n("Add", ["cl_b1", "ar_1s"], ["pos"]),
    ]


def filled_length(selections: tuple[str, ...] = ()) -> list[onnx.NodeProto]:
    """`T`/`T1`: the slots attention reads, max(cache_length) + S of the batch (rounded up to the policies'
    page / tile so their selections see whole pages, at most the capacity `Tcap`)."""
    n = helper.make_node
    I = onnx.AttributeProto.INT
    nodes = [n("ReduceMax", ["cache_length"], ["cl_max1"], keepdims=1), n("Add", ["cl_max1", "S1"], ["need1"])]
    if selections:
        nodes += [attr_const("unit_page", "policy_decode_page", I), attr_const("unit_tile", "policy_prefill_tile", I),
                  n("Max", ["unit_page", "unit_tile", "i1"], ["unit"]), n("Add", ["need1", "unit"], ["need_up"]),
                  n("Sub", ["need_up", "i1"], ["need_up1"]), n("Div", ["need_up1", "unit"], ["need_units"]),
                  n("Mul", ["need_units", "unit"], ["need_r"])]
    else:
        nodes.append(n("Identity", ["need1"], ["need_r"]))
    return nodes + [n("Min", ["need_r", "Tcap1"], ["T1"]), n("Squeeze", ["T1", "axes0"], ["T"])]


def filled(buffer: str, out: str) -> onnx.NodeProto:
    """`out` = buffer[:, :, :T] (after `filled_length`)."""
    return helper.make_node("Slice", [buffer, "zero1", "T1", "axes2"], [out])


def attention(q: str, k: str, v: str, opset: int, page_topk: bool = False, block_sparse: bool = False,
              lowering: Lowering | None = None, values: list[onnx.NodeProto] | None = None) -> list[onnx.NodeProto]:
    """`output` [B, S, H, Dv] from q [B, H, S, D] and the filled slots k [B, KV, T, D], v [B, KV, T, Dv]
    (after `prelude` and `filled_length`): scale, soft-capping, the causal / sliding-window / policy mask, fp32
    softmax. `lowering` says which optional parts are emitted (None: all, plus the selections asked for).
    `values`: nodes computing `out_grouped` [B, KV, G*S, Dv] from `probs` [B, KV, G*S, T] in place of
    `probs @ v` (the latent body accumulates value latents instead)."""
    n = helper.make_node
    F, I = onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT
    low = lowering or Lowering(selections=tuple(name for name, on in (("page_topk", page_topk),
                                                                       ("block_sparse_prefill", block_sparse)) if on))
    nodes = [
        # GQA without repeating the cache: q [B, H, S, D] -> [B, KV, G*S, D]
        n("Shape", [k], ["KV1"], start=1, end=2),
        n("Concat", ["zero1", "KV1", "minus1", "zero1"], ["q_grouped_shape"], axis=0),
        n("Reshape", [q, "q_grouped_shape"], ["q_grouped"]),
        n("Transpose", [k], ["key_t"], perm=[0, 1, 3, 2]),
        n("MatMul", ["q_grouped", "key_t"], ["scores_raw"]),
        n("CastLike", ["scale_f", q], ["scale_q"]),
        n("Mul", ["scores_raw", "scale_q"], ["scores_scaled"]),
    ]
    if low.softcap:  # tanh soft-capping when softcap > 0
        nodes += [attr_const("softcap_f", "softcap", F), n("CastLike", ["softcap_f", q], ["softcap_q"]),
                  n("Div", ["scores_scaled", "softcap_q"], ["sc_div"]), n("Tanh", ["sc_div"], ["sc_tanh"]),
                  n("Mul", ["sc_tanh", "softcap_q"], ["sc_capped"]),
                  _scalar("f0", 0.0, TensorProto.FLOAT), n("Greater", ["softcap_f", "f0"], ["use_softcap"]),
                  n("Where", ["use_softcap", "sc_capped", "scores_scaled"], ["scores"])]
    else:
        nodes.append(n("Identity", ["scores_scaled"], ["scores"]))
    nodes += [
        # [B, KV, G, S, T]
        n("Concat", ["zero1", "zero1", "minus1", "S1", "T1"], ["scores5_shape"], axis=0),
        n("Reshape", ["scores", "scores5_shape"], ["scores5"]),
        # mask: slot j allowed for query s iff j <= pos, (window <= 0 or j > pos - window), the policy's rule
        n("Range", ["i0", "T", "i1"], ["arange_t"]),
        n("Unsqueeze", ["pos", "minus1"], ["pos_bs1"]),
        n("LessOrEqual", ["arange_t", "pos_bs1"], ["causal"]),
        n("Equal", ["S", "i1"], ["is_decode"]),
    ]
    current = "causal"
    if low.window:
        nodes += [attr_const("window", "sliding_window", I),
                  n("Sub", ["pos_bs1", "window"], ["win_start"]), n("Greater", ["arange_t", "win_start"], ["in_window"]),
                  n("LessOrEqual", ["window", "i0"], ["no_window"]),
                  n("Or", ["in_window", "no_window"], ["window_ok"]), n("And", [current, "window_ok"], ["model_ok"])]
        current = "model_ok"
    if low.sink:  # sink_window policy of this phase (decode: S == 1): j < sink or j > pos - window (window 0 = off)
        nodes += [attr_const("decode_sink", "policy_decode_sink", I),
                  attr_const("decode_window", "policy_decode_window", I),
                  attr_const("prefill_sink", "policy_prefill_sink", I),
                  attr_const("prefill_window", "policy_prefill_window", I),
                  n("Where", ["is_decode", "decode_sink", "prefill_sink"], ["p_sink"]),
                  n("Where", ["is_decode", "decode_window", "prefill_window"], ["p_window"]),
                  n("Less", ["arange_t", "p_sink"], ["in_sink"]),
                  n("Sub", ["pos_bs1", "p_window"], ["p_start"]), n("Greater", ["arange_t", "p_start"], ["in_recent"]),
                  n("LessOrEqual", ["p_window", "i0"], ["no_policy"]),
                  n("Or", ["in_sink", "in_recent"], ["policy_keep"]), n("Or", ["policy_keep", "no_policy"], ["policy_ok"]),
                  n("And", [current, "policy_ok"], ["allowed"])]
        current = "allowed"
    nodes.append(n("Unsqueeze", [current, "axes_1_2"], ["allowed5_causal"]))
    parts = ["allowed5_causal"]
    for name in low.selections:
        mask, lower = SELECTIONS[name]
        nodes += lower(mask, opset, q, k)
        parts.append(mask)
    return nodes + [
        *_combine_masks(parts),
        n("Cast", ["scores5"], ["scores5_f"], to=TensorProto.FLOAT),
        n("Where", ["allowed5", "scores5_f", "neg_inf"], ["masked"]),
        n("Softmax", ["masked"], ["probs_f"], axis=-1),
        n("CastLike", ["probs_f", q], ["probs5"]),
        n("Concat", ["zero1", "zero1", "minus1", "T1"], ["probs4_shape"], axis=0),
        n("Reshape", ["probs5", "probs4_shape"], ["probs"]),
        *(values if values is not None else [n("MatMul", ["probs", v], ["out_grouped"])]),
        # [B, KV, G*S, Dv] -> [B, H, S, Dv] -> [B, S, H, Dv]
        n("Concat", ["zero1", "minus1", "S1", "zero1"], ["out_shape"], axis=0),
        n("Reshape", ["out_grouped", "out_shape"], ["out_heads"]),
        n("Transpose", ["out_heads"], ["output"], perm=[0, 2, 1, 3]),
    ]


ORT_DOMAIN = "com.microsoft"


def fused_attention(local_window: int) -> list[onnx.NodeProto]:
    """The whole KVAttention of a dense layer as one `com.microsoft::GroupQueryAttention`:
    packed [B, S, H*D] query / new key / new value, `seqlens_k = cache_length + S - 1`, `total_sequence_length =
    max(cache_length) + S`, `query_seqlens = S` per row (batched chunks over a ragged cache), the past buffers as
    the op's past/present (shared when bound to one buffer: the update is then in place)."""
    n = helper.make_node
    ref = lambda name, attr, kind: _ref_attr(name, attr, kind)
    F, I = onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT
    gqa = n("GroupQueryAttention", ["q_packed", "k_packed", "v_packed", "past_key", "past_value", "seqlens_k",
                                    "total_len", *[""] * 9, "query_lens"],
            ["out_packed", "present_key", "present_value"], domain=ORT_DOMAIN, local_window_size=local_window or -1)
    gqa.attribute.extend([ref("num_heads", "num_heads", I), ref("kv_num_heads", "num_kv_heads", I),
                          ref("scale", "scale", F), ref("softcap", "softcap", F)])
    nodes = [int_const("packed3", [0, 0, -1]), int_const("zero1", [0]), int_const("minus1", [-1]),
             n("Shape", ["query"], ["S1"], start=2, end=3)]
    for x in ("q", "k", "v"):
        src = {"q": "query", "k": "key", "v": "value"}[x]
        nodes += [n("Transpose", [src], [f"{x}_bshd"], perm=[0, 2, 1, 3]), n("Reshape", [f"{x}_bshd", "packed3"],
                                                                            [f"{x}_packed"])]
    return nodes + [
        n("Cast", ["S1"], ["S1_i32"], to=TensorProto.INT32), n("Cast", ["cache_length"], ["cl_i32"], to=TensorProto.INT32),
        n("Add", ["cl_i32", "S1_i32"], ["total_b"]), _scalar("one_i32", 1, TensorProto.INT32),
        n("Sub", ["total_b", "one_i32"], ["seqlens_k"]), n("ReduceMax", ["total_b"], ["total_len"], keepdims=0),
        n("Shape", ["cache_length"], ["B1"]), n("Expand", ["S1_i32", "B1"], ["query_lens"]),
        gqa,
        n("Shape", ["value"], ["Dv1"], start=3, end=4),
        n("Concat", ["zero1", "zero1", "minus1", "Dv1"], ["out_shape"], axis=0),
        n("Reshape", ["out_packed", "out_shape"], ["output"]),
    ]


def kv_attention_function(attribute_names: list[str], opset: int, page_topk: bool = False,
                          block_sparse: bool = False, lowering: Lowering | None = None) -> onnx.FunctionProto:
    """FunctionProto of KVAttention; `attribute_names` are all attributes the nodes carry. Without `lowering`
    the general body (`page_topk` / `block_sparse` add the selections); with one, that lowering as the
    function overload `lowering.overload`."""
    low = lowering or Lowering(selections=tuple(name for name, on in (("page_topk", page_topk),
                                                                       ("block_sparse_prefill", block_sparse)) if on))
    imports = [helper.make_opsetid("", opset)]
    if low.fused:
        nodes = fused_attention(low.local_window)
        imports.append(helper.make_opsetid(ORT_DOMAIN, 1))
    else:
        nodes = [*prelude("past_key"), *filled_length(low.selections),
                 *cache_update(opset, [("past_key", "key", "present_key"), ("past_value", "value", "present_value")]),
                 filled("present_key", "key_filled"), filled("present_value", "value_filled"),
                 *attention("query", "key_filled", "value_filled", opset, lowering=low)]
    fn = helper.make_function(DOMAIN, OP_TYPE, INPUTS, OUTPUTS, nodes, opset_imports=imports,
                              attributes=attribute_names)
    if lowering is not None:
        fn.overload = low.overload
    return fn
