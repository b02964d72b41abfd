"""Enterprise TensorRT only (>= 10.8, `tensorrt.plugin`): the ahead-of-time KVAttention plugin. Its `aot_impl`
returns the PTX of our fused Triton kernel (`kvconvert.kernels.kv_step.kv_step_aot_kernel`: cache write at
cache_length + s into the aliased past/present buffer, then attention), so the plan embeds the kernel and
loads in Triton's C++ TensorRT backend with no Python.

NOT TESTED: the tensorrt_rtx wheels have no `tensorrt.plugin`, and enterprise TensorRT is not installable on our
machines (see issue 5). The kernel itself and its PTX compilation are tested (tests/test_kv_step_kernel.py).
"""

# no `from __future__ import annotations`: tensorrt.plugin reads the real annotation types
import re
from types import ModuleType
from typing import Any

from ...errors import UserError

_DONE: set[str] = set()
_DTYPES = {"HALF": "fp16", "BF16": "bf16", "FLOAT": "fp32"}


def _policy(attrs: dict[str, Any], phase: str) -> tuple[int, int]:
    if attrs.get(f"policy_{phase}", "dense") == "dense":
        return 0, 0
    return int(attrs.get(f"policy_{phase}_sink", 0)), int(attrs.get(f"policy_{phase}_window", 0))


def register_aot(trt: ModuleType, meta: dict[str, Any]) -> None:
    """Register kvconvert::KVAttention with tensorrt.plugin (descriptor + AOT implementation)."""
    if trt.__name__ in _DONE:
        return
    try:
        import tensorrt.plugin as trtp
    except ImportError:
        raise UserError("--plugin aot needs enterprise TensorRT >= 10.8 with tensorrt.plugin") from None

    from ...kernels.kv_step import compile_ptx

    @trtp.register("kvconvert::KVAttention")
    def kv_attention_desc(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc,
                          past_key: trtp.TensorDesc, past_value: trtp.TensorDesc, cache_length: trtp.TensorDesc,
                          num_heads: int, num_kv_heads: int, head_dim: int, scale: float, softcap: float,
                          sliding_window: int, layer: int, policy: str, policy_decode: str, policy_prefill: str,
                          policy_decode_sink: int, policy_decode_window: int, policy_prefill_sink: int,
                          policy_prefill_window: int, plugin_namespace: str, plugin_version: str,
                          ) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        out = query.like()
        q = query.shape_expr
        out.shape_expr = [q[0], q[2], q[1], value.shape_expr[3]]
        return out, past_key.aliased(), past_value.aliased()

    @trtp.aot_impl("kvconvert::KVAttention")
    def kv_attention_aot(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc,
                         past_key: trtp.TensorDesc, past_value: trtp.TensorDesc, cache_length: trtp.TensorDesc,
                         num_heads: int, num_kv_heads: int, head_dim: int, scale: float, softcap: float,
                         sliding_window: int, layer: int, policy: str, policy_decode: str, policy_prefill: str,
                         policy_decode_sink: int, policy_decode_window: int, policy_prefill_sink: int,
                         policy_prefill_window: int, plugin_namespace: str, plugin_version: str,
                         outputs: tuple[trtp.TensorDesc], tactic: int,
                         ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        import torch

        attrs = {"policy_decode": policy_decode, "policy_decode_sink": policy_decode_sink,
                 "policy_decode_window": policy_decode_window}
        major, minor = torch.cuda.get_device_capability()
        name, ptx, info = compile_ptx(_DTYPES[query.dtype.name], num_heads // num_kv_heads, head_dim,
                                      cc=major * 10 + minor, aot_scale=scale, softcap=softcap)
        q, cache = query.shape_expr, past_key.shape_expr
        launch = trtp.KernelLaunchParams()
        launch.grid_x = q[0] * num_kv_heads
        launch.block_x = info["num_warps"] * 32
        launch.shared_mem = info["shared"]
        # one plan serves prefill and decode: the decode policy applies to S == 1 only, so sparse decode
        # policies need a decode-only plan (profile "decode"); prefill is dense
        sink, window = _policy(attrs, "decode") if q[2].is_constant and q[2].constant_value() == 1 else (0, 0)
        extras = [q[2], cache[2], q[1], cache[1], sink, window, sliding_window]
        params = len(re.findall(r"\.param\s", ptx.split(f".entry {name}", 1)[1].split(")", 1)[0]))
        extras += [0] * max(0, params - 9 - len(extras))  # Triton's trailing scratch pointers (unused: null)
        sym = trtp.SymIntExprs(len(extras))
        for i, e in enumerate(extras):
            sym[i] = e if isinstance(e, trtp.SymInt32) else trtp.SymInt32(int(e))
        return name, ptx, launch, sym

    del meta
    _DONE.add(trt.__name__)


LATENT_ATTRS = {  # KVLatentAttention's node attributes and their Python types (export/onnx/latent_op.py)
    "num_heads": int, "num_kv_heads": int, "head_dim": int, "scale": float, "softcap": float, "sliding_window": int,
    "layer": int, "policy": str, "plugin_namespace": str, "plugin_version": str, "policy_decode": str,
    "policy_decode_sink": int, "policy_decode_window": int, "policy_prefill": str, "policy_prefill_sink": int,
    "policy_prefill_window": int, "policy_decode_page": int, "policy_decode_keep": float, "policy_decode_budget": int,
    "policy_decode_sink_pages": int, "policy_decode_recent_pages": int, "policy_decode_dense_below": int,
    "policy_prefill_tile": int, "policy_prefill_mass": float, "policy_prefill_density": float,
    "policy_prefill_sink_blocks": int, "policy_prefill_local_blocks": int, "policy_prefill_dense_below": int,
    "joint_kv": int, "k_norm_eps": float,
}


def check_latent_aot(meta: dict[str, Any]) -> None:
    """UserError for what the fused AOT latent kernel does not do: page_topk / block-sparse selections."""
    for a in meta["attention"]["per_layer"]:
        if a.get("policy_decode_page", 0) > 0 or a.get("policy_prefill_tile", 0) > 0:
            raise UserError(f"layer {a['layer']}: --plugin aot runs dense and sink_window latent attention only; "
                            "build page_topk / block_sparse_prefill latent graphs with --plugin python")


def _latent_functions(trtp, joint: bool, impl):
    """(descriptor, aot_impl) with the op's explicit signature (tensorrt.plugin reads the parameters)."""
    from ...export.onnx.latent_op import latent_io

    inputs, outputs = latent_io(joint)
    tensors = ", ".join(f"{n}: trtp.TensorDesc" for n in inputs)
    attrs = ", ".join(f"{n}: {t.__name__}" for n, t in LATENT_ATTRS.items())
    call = ", ".join([f"{n}={n}" for n in inputs + list(LATENT_ATTRS)])
    out_types = ", ".join(["trtp.TensorDesc"] * len(outputs))
    src = (f"def latent_desc({tensors}, {attrs}) -> tuple[{out_types}]:\n"
           f"    out = query.like()\n    q = query.shape_expr\n    out.shape_expr = [q[0], q[2], q[1], q[3]]\n"
           f"    return (out, {', '.join(f'{p}.aliased()' for p in inputs if p.startswith('past_'))})\n"
           f"def latent_aot({tensors}, {attrs}, outputs: tuple[trtp.TensorDesc], tactic: int)"
           f" -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:\n"
           f"    return impl(dict({call}), outputs)\n")
    scope: dict[str, Any] = {"trtp": trtp, "impl": impl}
    exec(compile(src, "<kvconvert latent aot>", "exec"), scope)  # noqa: S102 - our own generated signature
    return scope["latent_desc"], scope["latent_aot"]


def register_latent_aot(trt: ModuleType, meta: dict[str, Any]) -> None:
    """Register kvconvert::KVLatentAttention with tensorrt.plugin: descriptor (outputs aliased to the past latent
    buffers) + AOT implementation returning the PTX of `kernels._triton_latent_step` (cache write + attention)."""
    key = f"{trt.__name__}:latent"
    if key in _DONE:
        return
    try:
        import tensorrt.plugin as trtp
    except ImportError:
        raise UserError("--plugin aot needs enterprise TensorRT >= 10.8 with tensorrt.plugin") from None
    check_latent_aot(meta)
    joint = bool(meta["attention"]["attributes"].get("joint_kv", 0))

    def impl(x: dict[str, Any], outputs):
        import torch

        from ...kernels._triton_latent_step import compile_latent_step_ptx, phase_window

        q, cache = x["query"].shape_expr, (x["past_kv_latent"] if joint else x["past_key_latent"]).shape_expr
        rank_k = cache[3].constant_value()
        rank_v = rank_k if joint else x["past_value_latent"].shape_expr[3].constant_value()
        rotary = x["rope_cos"].shape_expr[1].constant_value()
        kv = x["num_kv_heads"]
        major, minor = torch.cuda.get_device_capability()
        name, ptx, info = compile_latent_step_ptx(_DTYPES[x["query"].dtype.name], x, x["num_heads"] // kv,
                                                  x["head_dim"], rank_k, rank_v, rotary, cc=major * 10 + minor)
        launch = trtp.KernelLaunchParams()
        launch.grid_x = q[0] * kv
        launch.block_x = info["num_warps"] * 32
        launch.shared_mem = info["shared"]
        decode = q[2].is_constant and q[2].constant_value() == 1
        sink, window = phase_window(x, 1) if decode else phase_window(x, 2)
        extras = [q[2], cache[2], q[1], kv, sink, window, x["sliding_window"]]
        tensors = (11 + 2) if joint else (13 + 3)
        params = len(re.findall(r"\.param\s", ptx.split(f".entry {name}", 1)[1].split(")", 1)[0]))
        extras += [0] * max(0, params - tensors - len(extras))
        sym = trtp.SymIntExprs(len(extras))
        for i, e in enumerate(extras):
            sym[i] = e if isinstance(e, trtp.SymInt32) else trtp.SymInt32(int(e))
        return name, ptx, launch, sym

    desc, aot = _latent_functions(trtp, joint, impl)
    trtp.register("kvconvert::KVLatentAttention")(desc)
    trtp.aot_impl("kvconvert::KVLatentAttention")(aot)
    _DONE.add(key)
