"""Trace a `DecoderStep` to ONNX, attach the KVAttention (or KVLatentAttention) function, metadata, external
data; check it."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .attention_op import DOMAIN
from .function_body import Lowering, kv_attention_function, layer_lowering
from .wrapper import DecoderStep

MODEL_FILE = "model.onnx"
TRACE_OPSET_MAX = 20  # the TorchScript exporter's newest opset; later targets go through onnx.version_converter
DATA_FILE = "model.onnx.data"
OVERLOAD_IR_VERSION = 10  # FunctionProto / NodeProto `overload`


def example_inputs(step: DecoderStep, max_context: int, dtype: torch.dtype, batch: int = 2, seq: int = 3):
    """Trace inputs; seq >= 2 so no axis is specialised to 1."""
    ids = torch.randint(0, 8, (batch, seq))
    pos = torch.arange(seq)[None].expand(batch, seq) + 1
    cache_length = torch.ones(batch, dtype=torch.long)
    past = [torch.zeros(batch, b.heads, max_context, b.width, dtype=dtype) for b in step.layout.buffers]
    return (ids, pos, cache_length, *past)


def attach_kv_functions(model: onnx.ModelProto, nodes: list[onnx.NodeProto], names: list[str], opset: int,
                        fused_ok: bool) -> list[str]:
    """One KVAttention function overload per distinct `layer_lowering` of `nodes` (each node names its own);
    returns the overload of each node."""
    lowerings: dict[str, Lowering] = {}
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        low = layer_lowering(attrs, fused_ok)
        lowerings.setdefault(low.overload, low)
        node.overload = low.overload
    for low in lowerings.values():
        model.functions.append(kv_attention_function(names, opset, lowering=low))
    model.ir_version = max(model.ir_version, OVERLOAD_IR_VERSION)
    return [node.overload for node in nodes]


def trace_to_onnx(step: DecoderStep, max_context: int, dtype: torch.dtype, opset: int, path: Path,
                  page_topk: bool = False, block_sparse: bool = False, fused: bool = True) -> onnx.ModelProto:
    """torch.onnx (TorchScript exporter) -> ModelProto with the attention function(s) attached (`fused`: dense
    KVAttention layers lower to ONNX Runtime's GroupQueryAttention, see `function_body.layer_lowering`)."""
    inputs, outputs = step.layout.io_names()
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"},
               "cache_length": {0: "batch"}, "logits": {0: "batch", 1: "seq" if step.logits_to_keep == 0 else "one"}}
    for name in inputs[3:] + outputs[1:]:
        dynamic[name] = {0: "batch"}
    args = example_inputs(step, max_context, dtype)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / MODEL_FILE
        with torch.no_grad():
            torch.onnx.export(step, args, str(raw), dynamo=False, opset_version=min(opset, TRACE_OPSET_MAX),
                              input_names=inputs, output_names=outputs, dynamic_axes=dynamic, custom_opsets={DOMAIN: 1},
                              do_constant_folding=True)
        model = onnx.load(str(raw), load_external_data=True)
    if opset > TRACE_OPSET_MAX:
        from onnx import version_converter

        model = version_converter.convert_version(model, opset)
    _keep_position_ids(model, inputs)
    if dynamic["logits"][1] == "one":
        model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1
    op_type = step.layout.op_type
    attention_nodes = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == op_type]
    if len(attention_nodes) != step.view.num_layers:
        raise RuntimeError(f"expected {step.view.num_layers} {DOMAIN}::{op_type} nodes, traced "
                           f"{len(attention_nodes)}")
    for i, node in enumerate(attention_nodes):
        node.name = f"kv_attention_{i}"
    share_transposed_weights(model)  # rebuilds graph.node: look the attention nodes up again
    attention_nodes = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == op_type]
    names = sorted({a.name for n in attention_nodes for a in n.attribute})
    if step.layout.latent:
        from .latent_function_body import attach_latent_functions

        attach_latent_functions(model, attention_nodes, names, opset, step.layout.kind == "joint_latent")
    else:
        widths = {b.kind: b.width for b in step.layout.buffers}
        attach_kv_functions(model, attention_nodes, names, opset, fused and widths["key"] == widths["value"])
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return model


def _keep_position_ids(model: onnx.ModelProto, inputs: list[str]) -> None:
    """Put back `position_ids` [batch, seq] when the tracer dropped it as unused (latent graphs: positions are
    slot indices), so every export has the same interface."""
    present = [i.name for i in model.graph.input]
    if present == inputs:
        return
    if [n for n in inputs if n not in present] != ["position_ids"]:
        raise RuntimeError(f"traced graph inputs {present} differ from {inputs}")
    spec = onnx.helper.make_tensor_value_info("position_ids", onnx.TensorProto.INT64, ["batch", "seq"])
    by_name = {i.name: i for i in model.graph.input}
    ordered = [by_name.get(n, spec) for n in inputs]
    del model.graph.input[:]
    model.graph.input.extend(ordered)


def share_transposed_weights(model: onnx.ModelProto) -> int:
    """Replace initializers that are the transpose of another (tied embeddings / lm_head after constant
    folding) by a Transpose node, so the weight is stored once. Returns the bytes saved."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer if len(i.dims) == 2}
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, init in inits.items():
        by_shape.setdefault(tuple(init.dims), []).append(name)
    saved, drop, nodes = 0, set(), []
    for name, init in inits.items():
        rows, cols = init.dims
        if rows == cols or name in drop:
            continue
        a = None
        for other in by_shape.get((cols, rows), []):
            if other in drop:
                continue
            a = numpy_helper.to_array(init) if a is None else a
            b = numpy_helper.to_array(inits[other])
            if a.dtype == b.dtype and np.array_equal(a[:4], b[:, :4].T) and np.array_equal(a, b.T):
                drop.add(name)
                nodes.append(onnx.helper.make_node("Transpose", [other], [name], perm=[1, 0],
                                                   name=f"shared_transpose_{len(nodes)}"))
                saved += a.nbytes
                break
    if drop:
        kept = [i for i in model.graph.initializer if i.name not in drop]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        rest = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes + rest)
    return saved


def attach_metadata(model: onnx.ModelProto, meta: dict[str, Any]) -> None:
    entry = next((p for p in model.metadata_props if p.key == "kvconvert"), None) or model.metadata_props.add()
    entry.key = "kvconvert"
    entry.value = json.dumps(meta)


def save_and_check(model: onnx.ModelProto, folder: Path, external: bool) -> dict[str, Any]:
    """Write model.onnx (+ model.onnx.data) into `folder`, run the full checker; returns sizes and versions."""
    path = folder / MODEL_FILE
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    files = [path] + ([folder / DATA_FILE] if external else [])
    return {"onnx_bytes": sum(f.stat().st_size for f in files), "external_data": external,
            "ir_version": model.ir_version,
            "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import}}
