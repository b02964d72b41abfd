"""Attention from standard ONNX ops (`OnnxExportConfig.attention = "standard"`).

Every traced `kvconvert::KVAttention` node is replaced by ONNX ops (opset >= 24), so the graph has no custom
domain and a TensorRT engine needs no plugin. Per layer, with the node's inputs query [B,H,S,D],
key/value [B,KV,S,D], past_key/past_value [B,KV,T,D] and cache_length [B]:
  present_key   = TensorScatter(past_key, key, cache_length, axis=2)      linear mode: slots cache_length[b] + s
  present_value = TensorScatter(past_value, value, cache_length, axis=2)
  y [B,H,S,Dv]  = Attention(query, present_key[:, :, :L], present_value[:, :, :L], mask)
                                          the filled slots L = max(cache_length) + S; GQA from H vs KV heads
  output        = Transpose(y) [B,S,H,Dv]                                 attributes scale, softcap (when > 0)
mask bool [B,1,S,L]: slot j is visible to query s (position t = cache_length[b] + s) iff j <= t, and
j > t - sliding_window when the layer has the model's window, and (j < sink or j > t - window) under a
sink_window policy of the phase (decode: S == 1). One mask per distinct rule, built once and shared by layers.
These are the semantics of `attention_op.kv_attention_reference` for dense and sink_window layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx
from onnx import TensorProto, helper

from ...errors import UserError
from .attention_op import DOMAIN, OP_TYPE

STANDARD_OPSET = 24  # TensorScatter; Attention itself is opset 23
RECORD = {"domain": "ai.onnx", "op_type": "Attention", "cache_update": "TensorScatter"}
MASK_KEYS = ("sliding_window", "policy_decode_sink", "policy_decode_window", "policy_prefill_sink",
             "policy_prefill_window")


def check_standard(opset: int, page_topk: bool, block_sparse: bool, latent: bool = False) -> None:
    """UserError when a standard-op graph cannot express the request."""
    if latent:
        raise UserError("--attention standard caches full K/V; a latent-KV model exports with --attention kvconvert "
                        "(the KVLatentAttention node, which keeps the latent cache)")
    if opset < STANDARD_OPSET:
        raise UserError(f"--attention standard needs --opset {STANDARD_OPSET} or newer (TensorScatter), got {opset}")
    if page_topk or block_sparse:
        kind = "page_topk" if page_topk else "block_sparse_prefill"
        raise UserError(f"--attention standard exports dense and sink_window attention only; a {kind} policy needs "
                        "--attention kvconvert (the KVAttention node)")


def _const(name: str, values: list[int], scalar: bool = False) -> onnx.NodeProto:
    dims = [] if scalar else [len(values)]
    return helper.make_node("Constant", [], [name], name=name,
                            value=helper.make_tensor(name, TensorProto.INT64, dims, values))


def _base_nodes() -> list[onnx.NodeProto]:
    """std_L1 [1] (filled slots: max(cache_length) + S), std_causal bool [B,1,S,L] (j <= t), std_pos4 int64
    [B,1,S,1] (t), std_arange_t [L], std_is_decode."""
    n = helper.make_node
    return [
        _const("std_i0", [0], True), _const("std_i1", [1], True), _const("std_zero1", [0]), _const("std_axes2", [2]),
        _const("std_axes0", [0]), _const("std_axes1", [1]), _const("std_axes_1_3", [1, 3]),
        n("Shape", ["input_ids"], ["std_S1"], name="std_S1", start=1, end=2),
        n("Squeeze", ["std_S1", "std_axes0"], ["std_S"], name="std_S"),
        n("ReduceMax", ["cache_length"], ["std_cl_max1"], name="std_cl_max1", keepdims=1),
        n("Add", ["std_cl_max1", "std_S1"], ["std_L1"], name="std_L1"),
        n("Squeeze", ["std_L1", "std_axes0"], ["std_L"], name="std_L"),
        *position_nodes("std_L", "std_pos"),
    ]


def position_nodes(filled: str, pos: str) -> list[onnx.NodeProto]:
    """What `_mask_nodes` reads, from `filled` (int64 scalar, the L filled slots): std_arange_t [L], `pos` [B,S]
    (t = cache_length[b] + s), std_pos4 [B,1,S,1], std_causal bool [B,1,S,L] (j <= t), std_is_decode (S == 1).
    Reads std_S, std_i0, std_i1, std_axes1, std_axes_1_3 and cache_length."""
    n = helper.make_node
    return [
        n("Range", ["std_i0", filled, "std_i1"], ["std_arange_t"], name="std_arange_t"),
        n("Range", ["std_i0", "std_S", "std_i1"], ["std_arange_s"], name="std_arange_s"),
        n("Unsqueeze", ["cache_length", "std_axes1"], ["std_cl"], name="std_cl"),
        n("Add", ["std_cl", "std_arange_s"], [pos], name=pos),
        n("Unsqueeze", [pos, "std_axes_1_3"], ["std_pos4"], name="std_pos4"),
        n("LessOrEqual", ["std_arange_t", "std_pos4"], ["std_causal"], name="std_causal"),
        n("Equal", ["std_S", "std_i1"], ["std_is_decode"], name="std_is_decode"),
    ]


def _mask_nodes(key: tuple[int, ...], out: str) -> list[onnx.NodeProto]:
    """`out` bool [B,1,S,T] for (sliding_window, decode sink, decode window, prefill sink, prefill window)."""
    n = helper.make_node
    window, d_sink, d_window, p_sink, p_window = key
    nodes, current = [], "std_causal"
    if window > 0:
        nodes += [_const(f"{out}_sw", [window], True),
                  n("Sub", ["std_pos4", f"{out}_sw"], [f"{out}_sw_start"], name=f"{out}_sw_start"),
                  n("Greater", ["std_arange_t", f"{out}_sw_start"], [f"{out}_in_sw"], name=f"{out}_in_sw"),
                  n("And", [current, f"{out}_in_sw"], [f"{out}_model"], name=f"{out}_model")]
        current = f"{out}_model"
    if d_window > 0 or p_window > 0:
        nodes += [_const(f"{out}_d_sink", [d_sink], True), _const(f"{out}_p_sink", [p_sink], True),
                  _const(f"{out}_d_window", [d_window], True), _const(f"{out}_p_window", [p_window], True),
                  n("Where", ["std_is_decode", f"{out}_d_sink", f"{out}_p_sink"], [f"{out}_sink"], name=f"{out}_sink"),
                  n("Where", ["std_is_decode", f"{out}_d_window", f"{out}_p_window"], [f"{out}_window"],
                    name=f"{out}_window"),
                  n("Less", ["std_arange_t", f"{out}_sink"], [f"{out}_in_sink"], name=f"{out}_in_sink"),
                  n("Sub", ["std_pos4", f"{out}_window"], [f"{out}_start"], name=f"{out}_start"),
                  n("Greater", ["std_arange_t", f"{out}_start"], [f"{out}_recent"], name=f"{out}_recent"),
                  n("Or", [f"{out}_in_sink", f"{out}_recent"], [f"{out}_kept"], name=f"{out}_kept"),
                  n("LessOrEqual", [f"{out}_window", "std_i0"], [f"{out}_off"], name=f"{out}_off"),
                  n("Or", [f"{out}_kept", f"{out}_off"], [f"{out}_policy"], name=f"{out}_policy"),
                  n("And", [current, f"{out}_policy"], [f"{out}_all"], name=f"{out}_all")]
        current = f"{out}_all"
    return nodes + [helper.make_node("Identity", [current], [out], name=out)]


def _attention_nodes(node: onnx.NodeProto, attrs: dict[str, Any], mask: str) -> list[onnx.NodeProto]:
    n = helper.make_node
    query, key, value, past_key, past_value, cache_length = node.input
    output, present_key, present_value = node.output
    extra = {"softcap": float(attrs["softcap"])} if attrs["softcap"] > 0 else {}
    return [
        n("TensorScatter", [past_key, key, cache_length], [present_key], name=f"{node.name}_key_update", axis=2),
        n("TensorScatter", [past_value, value, cache_length], [present_value], name=f"{node.name}_value_update",
          axis=2),
        n("Slice", [present_key, "std_zero1", "std_L1", "std_axes2"], [f"{node.name}_key_filled"],
          name=f"{node.name}_key_filled"),
        n("Slice", [present_value, "std_zero1", "std_L1", "std_axes2"], [f"{node.name}_value_filled"],
          name=f"{node.name}_value_filled"),
        n("Attention", [query, f"{node.name}_key_filled", f"{node.name}_value_filled", mask], [f"{node.name}_y"],
          name=f"{node.name}_attention", scale=float(attrs["scale"]), **extra),
        n("Transpose", [f"{node.name}_y"], [output], name=f"{node.name}_output", perm=[0, 2, 1, 3]),
    ]


def lower_to_standard(model: onnx.ModelProto, max_context: int | None = None) -> int:
    """Rewrite every KVAttention node of `model` (opset >= 24) in place; drops the KVAttention function and the
    `kvconvert` domain. The graph must have the `input_ids` [B, S] and `cache_length` [B] inputs (S and the
    slots of the masks come from them). Returns the number of distinct masks built."""
    return rewrite_attention(model, OP_TYPE, _base_nodes(), _attention_nodes)


def rewrite_attention(model: onnx.ModelProto, op_type: str, base: list[onnx.NodeProto],
                      layer: Callable[[onnx.NodeProto, dict[str, Any], str], list[onnx.NodeProto]]) -> int:
    """Replace every `kvconvert::<op_type>` node of `model` in place by `layer(node, attrs, mask name)`, after the
    `base` nodes and one mask per distinct MASK_KEYS rule (`_mask_nodes`); drops the op's function and, once
    unused, the `kvconvert` domain. Returns the number of distinct masks."""
    masks: dict[tuple[int, ...], str] = {}
    body: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type != op_type:
            body.append(node)
            continue
        node.name = node.name or f"kv_attention_{len(body)}"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        key = tuple(int(attrs.get(k, 0)) for k in MASK_KEYS)
        mask = masks.setdefault(key, f"std_mask_{len(masks)}")
        body += layer(node, attrs, mask)
    head = base + [m for key, name in masks.items() for m in _mask_nodes(key, name)]
    del model.graph.node[:]
    model.graph.node.extend(head + body)
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name == op_type)]
    del model.functions[:]
    model.functions.extend(kept)
    if not any(nd.domain == DOMAIN for nd in model.graph.node) and not model.functions:
        imports = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(imports)
    return len(masks)
