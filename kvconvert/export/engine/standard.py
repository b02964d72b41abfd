"""Engines from a standard-op graph (`kvconvert export onnx --attention standard`): no plugin, TensorRT's own
attention and KV-cache-update layers.

The ONNX parser turns each `TensorScatter` into an `IKVCacheUpdateLayer` (its cache input must be a network
input, its output a network output; both share one device buffer) and each `Attention` into an `IAttention`
(fused kernels for fp16/bf16 only).
"""

from __future__ import annotations

from typing import Any

from ...errors import PassFailed, UserError
from .config import EngineConfig


def attention_mode(meta: dict[str, Any]) -> str:
    """"kvconvert" (KVAttention nodes) or "standard" (ONNX Attention); exports before the field are kvconvert."""
    return meta.get("attention", {}).get("mode", "kvconvert")


def check_standard_graph(cfg: EngineConfig, meta: dict[str, Any]) -> None:
    """UserError for what TensorRT's Attention layer cannot build: soft-capping, fp32 fused attention."""
    capped = [a["layer"] for a in meta["attention"]["per_layer"] if a.get("softcap", 0) > 0]
    if capped:
        raise UserError(f"layers {capped} use attention soft-capping, which TensorRT's Attention layer does not "
                        "support; export with --attention kvconvert for the plugin engine")
    if meta["dtype"] == "fp32" and cfg.backend == "tensorrt-rtx" and not cfg.decompose_attention:
        raise UserError("TensorRT-RTX has no fused fp32 attention kernel; re-export with --dtype fp16 (or bf16), "
                        "or build with --decompose-attention (unfused, slower)")


def _layers(network, kind):
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == kind:
            yield layer


def decompose_attention(trt, network) -> int:
    """Mark every IAttention decomposable (TensorRT may then build it from unfused layers); returns the count."""
    count = 0
    for layer in _layers(network, trt.LayerType.ATTENTION_INPUT):
        layer.__class__ = trt.IAttentionInputLayer  # the documented downcast of a network's ILayer
        layer.attention.decomposable = True
        count += 1
    return count


def cache_update_aliases(trt, network, want: dict[str, str]) -> dict[str, str]:
    """{present_*: past_*} read off the network's KV-cache-update layers (cache input is the network input
    past_*, output the network output present_*); PassFailed unless that is every pair of `want` (the cache
    buffers of the metadata: K/V or latents), i.e. when a buffer is not updated in place."""
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    aliases = {}
    for layer in _layers(network, trt.LayerType.KV_CACHE_UPDATE):
        past, present = layer.get_input(0).name, layer.get_output(0).name
        if past in inputs and present in outputs:
            aliases[present] = past
    if aliases != want:
        missing = sorted(set(want) - set(aliases))
        raise PassFailed(f"the cache of {missing or sorted(aliases)} is not a KV-cache-update layer between the "
                         "network's past_* input and present_* output; the engine would copy it")
    return aliases


def layer_counts(network) -> dict[str, int]:
    """{TensorRT layer type name: count} of a parsed network."""
    counts: dict[str, int] = {}
    for i in range(network.num_layers):
        name = network.get_layer(i).type.name
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))
