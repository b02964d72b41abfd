"""The TensorRT plugin for `kvconvert::KVAttention`: a Python IPluginV3 (OneCore + OneBuildV2 + OneRuntime)
and its IPluginCreatorV3One, made for whichever TensorRT module (`tensorrt` or `tensorrt_rtx`) is given.

The ONNX parser binds every KVAttention node to the creator registered as (name "KVAttention", namespace
"kvconvert", version "1") and hands it the node attributes listed in `INT_FIELDS` / `FLOAT_FIELDS` /
`STR_FIELDS`. Inputs: query [B,H,S,D], key [B,KV,S,D], value [B,KV,S,Dv], past_key [B,KV,T,D],
past_value [B,KV,T,Dv], cache_length int64 [B]; outputs: output [B,S,H,Dv], present_key, present_value.
`present_*` are aliased to `past_*` (IPluginV3OneBuildV2.get_aliased_input; the build enables the
preview feature ALIASED_PLUGIN_IO_10_03), so a step writes only the S new slots and never copies the cache.

At run time `enqueue` views the device pointers as torch tensors and executes the step with our kernels
(Triton decode kernels for S == 1 dense / sink-window layers, the eager reference otherwise), so running
such an engine needs `register(trt)` in the same Python process (the Runner does it).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

NAME, NAMESPACE, VERSION = "KVAttention", "kvconvert", "1"
INT_FIELDS = ("num_heads", "num_kv_heads", "head_dim", "sliding_window", "layer", "policy_decode_sink",
              "policy_decode_window", "policy_prefill_sink", "policy_prefill_window")
FLOAT_FIELDS = ("scale", "softcap")
STR_FIELDS = ("policy", "policy_decode", "policy_prefill")
ALIASES = {1: 3, 2: 4}
_REGISTERED: dict[str, Any] = {}


def _decode_field(f) -> tuple[str, Any]:
    data = np.asarray(f.data)
    if f.name in STR_FIELDS:
        return f.name, bytes(data.astype(np.uint8).tobytes()).split(b"\0")[0].decode()
    if f.name in FLOAT_FIELDS:
        return f.name, float(data.reshape(-1)[0])
    return f.name, int(data.reshape(-1)[0])


def attrs_from_fields(fc) -> dict[str, Any]:
    """Plugin fields -> the attribute dict `kv_attention_reference` takes (defaults for absent ones)."""
    attrs: dict[str, Any] = {k: 0 for k in INT_FIELDS} | {k: 0.0 for k in FLOAT_FIELDS} | {k: "dense" for k in STR_FIELDS}
    for f in fc or []:
        if f.name in attrs:
            k, v = _decode_field(f)
            attrs[k] = v
    return attrs


def _fields(trt: ModuleType, attrs: dict[str, Any] | None):
    out = []
    for k in INT_FIELDS:
        out.append(trt.PluginField(k, np.array([] if attrs is None else [attrs[k]], np.int32), trt.PluginFieldType.INT32))
    for k in FLOAT_FIELDS:
        out.append(trt.PluginField(k, np.array([] if attrs is None else [attrs[k]], np.float32),
                                   trt.PluginFieldType.FLOAT32))
    for k in STR_FIELDS:
        raw = b"" if attrs is None else attrs[k].encode() + b"\0"
        out.append(trt.PluginField(k, np.frombuffer(raw, np.int8).copy(), trt.PluginFieldType.CHAR))
    return trt.PluginFieldCollection(out)


def make_classes(trt: ModuleType):
    """(KVAttentionPlugin, KVAttentionCreator) subclassing this TensorRT module's plugin interfaces."""

    class KVAttentionPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuildV2, trt.IPluginV3OneRuntime):
        def __init__(self, attrs: dict[str, Any]):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuildV2.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.num_outputs = 3
            self.plugin_namespace, self.plugin_name, self.plugin_version = NAMESPACE, NAME, VERSION
            self.attrs = dict(attrs)

        def get_capability_interface(self, kind):
            return self

        def clone(self):
            return KVAttentionPlugin(self.attrs)

        def get_output_data_types(self, input_types):
            return [input_types[0], input_types[3], input_types[4]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            q, v = inputs[0], inputs[2]
            out = trt.DimsExprs(4)
            out[0], out[1], out[2], out[3] = q[0], q[2], q[1], v[3]
            return [out, trt.DimsExprs(inputs[3]), trt.DimsExprs(inputs[4])]

        def get_aliased_input(self, output_index):
            return ALIASES.get(output_index, -1)

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == 5:
                return desc.type == trt.DataType.INT64
            ok = (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16)
            return desc.type in ok and desc.type == in_out[0].desc.type

        def configure_plugin(self, inputs, outputs):
            pass

        def on_shape_change(self, inputs, outputs):
            pass

        def get_fields_to_serialize(self):
            return _fields(trt, self.attrs)

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            from .plugin_compute import kv_attention_step

            kv_attention_step(trt, self.attrs, input_desc, output_desc, inputs, outputs, stream)

    class KVAttentionCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = NAME, NAMESPACE, VERSION
            self.field_names = _fields(trt, None)

        def create_plugin(self, name, fc, phase):
            return KVAttentionPlugin(attrs_from_fields(fc))

    return KVAttentionPlugin, KVAttentionCreator


def register(trt: ModuleType) -> None:
    """Register the creator once per TensorRT module (needed to build and to run the engine)."""
    if trt.__name__ in _REGISTERED:
        return
    _, creator_cls = make_classes(trt)
    creator = creator_cls()
    if not trt.get_plugin_registry().register_creator(creator, NAMESPACE):
        raise RuntimeError(f"could not register the {NAMESPACE}::{NAME} plugin creator with {trt.__name__}")
    _REGISTERED[trt.__name__] = creator
