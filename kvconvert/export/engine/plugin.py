"""The TensorRT plugins for `kvconvert::KVAttention` and `kvconvert::KVLatentAttention`: Python IPluginV3s
(OneCore + OneBuildV2 + OneRuntime) and their IPluginCreatorV3One, made for whichever TensorRT module
(`tensorrt` or `tensorrt_rtx`) is given.

The ONNX parser binds every KVAttention node to the creator registered as (name "KVAttention", namespace
"kvconvert", version "1") and hands it the node attributes listed in `INT_FIELDS` / `FLOAT_FIELDS` /
`STR_FIELDS`. Inputs: query [B,H,S,D], key [B,KV,S,D], value [B,KV,S,Dv], past_key [B,KV,T,D],
past_value [B,KV,T,Dv], cache_length int64 [B]; outputs: output [B,S,H,Dv], present_key, present_value.
`present_*` are aliased to `past_*` (IPluginV3OneBuildV2.get_aliased_input; the build enables the
preview feature ALIASED_PLUGIN_IO_10_03), so a step writes only the S new slots and never copies the cache.

At run time `enqueue` views the device pointers as torch tensors and executes the step with our kernels
(Triton decode kernels for S == 1 dense / sink-window layers, the eager reference otherwise), so running
such an engine needs `register(trt)` in the same Python process (the Runner does it).

KVLatentAttention (`LATENT`): inputs in the op's order (`export.onnx.latent_op.latent_io`: query, the new
latent(s), the past latent buffer(s), cache_length, then the weight initializers); outputs output [B,S,H,D] and the
present latent buffer(s), aliased to the past ones (separate: 1 -> 3, 2 -> 4; joint: 1 -> 2). `enqueue` runs
`plugin_compute.kv_latent_attention_step` (the `latent_decode` kernel for dense / sink-window decode steps).
"""

from __future__ import annotations

from types import ModuleType
from dataclasses import dataclass
from typing import Any

import numpy as np

NAME, NAMESPACE, VERSION = "KVAttention", "kvconvert", "1"
INT_FIELDS = ("num_heads", "num_kv_heads", "head_dim", "sliding_window", "layer", "policy_decode_sink",
              "policy_decode_window", "policy_prefill_sink", "policy_prefill_window")
FLOAT_FIELDS = ("scale", "softcap")
STR_FIELDS = ("policy", "policy_decode", "policy_prefill")
ALIASES = {1: 3, 2: 4}
LATENT_NAME = "KVLatentAttention"
LATENT_INT_FIELDS = INT_FIELDS + ("joint_kv", "policy_decode_page", "policy_decode_budget", "policy_decode_sink_pages",
                                  "policy_decode_recent_pages", "policy_decode_dense_below", "policy_prefill_tile",
                                  "policy_prefill_sink_blocks", "policy_prefill_local_blocks",
                                  "policy_prefill_dense_below")
LATENT_FLOAT_FIELDS = FLOAT_FIELDS + ("k_norm_eps", "policy_decode_keep", "policy_prefill_mass",
                                      "policy_prefill_density")
_REGISTERED: dict[str, Any] = {}


@dataclass(frozen=True)
class OpSpec:
    """What differs between the two plugins: name, declared fields, I/O layout."""

    name: str
    int_fields: tuple[str, ...]
    float_fields: tuple[str, ...]
    str_fields: tuple[str, ...] = STR_FIELDS

    @property
    def latent(self) -> bool:
        return self.name == LATENT_NAME

    def aliases(self, attrs: dict[str, Any]) -> dict[int, int]:
        if not self.latent:
            return ALIASES
        return {1: 2} if attrs.get("joint_kv") else {1: 3, 2: 4}

    def num_outputs(self, attrs: dict[str, Any]) -> int:
        return 1 + len(self.aliases(attrs))

    def cache_length_index(self, attrs: dict[str, Any]) -> int:
        return 3 if self.latent and attrs.get("joint_kv") else 5


KV = OpSpec(NAME, INT_FIELDS, FLOAT_FIELDS)
LATENT = OpSpec(LATENT_NAME, LATENT_INT_FIELDS, LATENT_FLOAT_FIELDS)


def _decode_field(f, spec: OpSpec = KV) -> tuple[str, Any]:
    data = np.asarray(f.data)
    if f.name in spec.str_fields:
        return f.name, bytes(data.astype(np.uint8).tobytes()).split(b"\0")[0].decode()
    if f.name in spec.float_fields:
        return f.name, float(data.reshape(-1)[0])
    return f.name, int(data.reshape(-1)[0])


def attrs_from_fields(fc, spec: OpSpec = KV) -> dict[str, Any]:
    """Plugin fields -> the attribute dict the op's reference takes (defaults for absent ones)."""
    attrs: dict[str, Any] = ({k: 0 for k in spec.int_fields} | {k: 0.0 for k in spec.float_fields}
                             | {k: "dense" for k in spec.str_fields})
    for f in fc or []:
        if f.name in attrs:
            k, v = _decode_field(f, spec)
            attrs[k] = v
    return attrs


def _fields(trt: ModuleType, attrs: dict[str, Any] | None, spec: OpSpec = KV):
    out = []
    for k in spec.int_fields:
        out.append(trt.PluginField(k, np.array([] if attrs is None else [attrs[k]], np.int32), trt.PluginFieldType.INT32))
    for k in spec.float_fields:
        out.append(trt.PluginField(k, np.array([] if attrs is None else [attrs[k]], np.float32),
                                   trt.PluginFieldType.FLOAT32))
    for k in spec.str_fields:
        raw = b"" if attrs is None else attrs[k].encode() + b"\0"
        out.append(trt.PluginField(k, np.frombuffer(raw, np.int8).copy(), trt.PluginFieldType.CHAR))
    return trt.PluginFieldCollection(out)


def make_classes(trt: ModuleType, spec: OpSpec = KV):
    """(Plugin, Creator) of `spec`'s op subclassing this TensorRT module's plugin interfaces."""

    class KVAttentionPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuildV2, trt.IPluginV3OneRuntime):
        def __init__(self, attrs: dict[str, Any]):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuildV2.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.attrs = dict(attrs)
            self.aliases = spec.aliases(self.attrs)
            self.num_outputs = spec.num_outputs(self.attrs)
            self.cache_length_index = spec.cache_length_index(self.attrs)
            self.plugin_namespace, self.plugin_name, self.plugin_version = NAMESPACE, spec.name, VERSION

        def get_capability_interface(self, kind):
            return self

        def clone(self):
            return KVAttentionPlugin(self.attrs)

        def get_output_data_types(self, input_types):
            return [input_types[0], *(input_types[i] for i in self.aliases.values())]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            q = inputs[0]
            last = q[3] if spec.latent else inputs[2][3]  # latent: Dv == D (the latent models' heads)
            out = trt.DimsExprs(4)
            out[0], out[1], out[2], out[3] = q[0], q[2], q[1], last
            return [out, *(trt.DimsExprs(inputs[i]) for i in self.aliases.values())]

        def get_aliased_input(self, output_index):
            return self.aliases.get(output_index, -1)

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == self.cache_length_index:
                return desc.type == trt.DataType.INT64
            ok = (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16)
            return desc.type in ok and desc.type == in_out[0].desc.type

        def configure_plugin(self, inputs, outputs):
            pass

        def on_shape_change(self, inputs, outputs):
            pass

        def get_fields_to_serialize(self):
            return _fields(trt, self.attrs, spec)

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            from . import plugin_compute

            step = plugin_compute.kv_latent_attention_step if spec.latent else plugin_compute.kv_attention_step
            step(trt, self.attrs, input_desc, output_desc, inputs, outputs, stream)

    class KVAttentionCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = spec.name, NAMESPACE, VERSION
            self.field_names = _fields(trt, None, spec)

        def create_plugin(self, name, fc, phase):
            return KVAttentionPlugin(attrs_from_fields(fc) if spec is KV else attrs_from_fields(fc, spec))

    return KVAttentionPlugin, KVAttentionCreator


def register(trt: ModuleType) -> None:
    """Register both creators once per TensorRT module (needed to build and to run the engine)."""
    if trt.__name__ in _REGISTERED:
        return
    creators = []
    for spec in (KV, LATENT):
        _, creator_cls = make_classes(trt, spec)
        creator = creator_cls()
        if not trt.get_plugin_registry().register_creator(creator, NAMESPACE):
            raise RuntimeError(f"could not register the {NAMESPACE}::{spec.name} plugin creator with {trt.__name__}")
        creators.append(creator)
    _REGISTERED[trt.__name__] = creators
