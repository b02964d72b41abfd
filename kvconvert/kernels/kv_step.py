"""One fused KVAttention step for an ahead-of-time TensorRT plugin (a single kernel per plugin call):
write the S new K/V rows into the cache at cache_length[b] + s, then attend (dense, model sliding window,
sink + window policy, soft-capping), fp32 online softmax. One program per (sequence, KV head) serves the whole
query group, so each KV head is read once per query row and the cache is never copied.

Shapes: query [B, H, S, D], key/value [B, KV, S, D], past_key/past_value [B, KV, T, D] (updated in place),
cache_length int64 [B] -> output [B, S, H, D]. Same semantics as `kvconvert.export.onnx` KVAttention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2
from ._triton_common import visible


@triton.jit
def _kv_step_body(Q, K, V, PK, PV, CL, OUT, S, T, H, KV, sink, window, sliding, scale, softcap,
                  G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // KV
    g = pid % KV
    cl = tl.load(CL + b).to(tl.int32)
    dims = tl.arange(0, BLOCK_D)
    dm = dims < D
    head_kv = (b * KV + g).to(tl.int64)
    for s in range(S):
        src = (head_kv * S + s) * D + dims
        dst = (head_kv * T + cl + s) * D + dims
        tl.store(PK + dst, tl.load(K + src, mask=dm), mask=dm)
        tl.store(PV + dst, tl.load(V + src, mask=dm), mask=dm)
    tl.debug_barrier()
    toks = tl.arange(0, BLOCK_N)
    for r in range(G * S):
        hh = g * G + r // S
        s = r % S
        q = tl.load(Q + ((b * H + hh).to(tl.int64) * S + s) * D + dims, mask=dm, other=0.0).to(tl.float32)
        t = cl + s
        m = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
        den = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for j0 in range(0, t + 1, BLOCK_N):
            j = j0 + toks
            ok = visible(j, t, sliding, sink, window)
            rows = (head_kv * T + j[:, None]) * D + dims[None, :]
            k = tl.load(PK + rows, mask=ok[:, None] & dm[None, :], other=0.0).to(tl.float32)
            v = tl.load(PV + rows, mask=ok[:, None] & dm[None, :], other=0.0).to(tl.float32)
            sc = tl.sum(k * q[None, :], 1) * scale
            if softcap > 0:
                sc = (2.0 * tl.sigmoid(2.0 * sc / softcap) - 1.0) * softcap
            sc = tl.where(ok, sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(sc - m_safe)
            alpha = tl.exp(m - m_safe)
            den = den * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            m = m_new
        out = acc / tl.where(den > 0, den, 1.0)
        tl.store(OUT + ((b * S + s).to(tl.int64) * H + hh) * D + dims, out.to(OUT.dtype.element_ty), mask=dm)


@triton.jit
def kv_step_kernel(Q, K, V, PK, PV, CL, OUT, S, T, H, KV, sink, window, sliding, scale, softcap,
                   G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    _kv_step_body(Q, K, V, PK, PV, CL, OUT, S, T, H, KV, sink, window, sliding, scale, softcap, G, D, BLOCK_D, BLOCK_N)


@triton.jit
def kv_step_aot_kernel(Q, K, V, PK, PV, CL, OUT, PK_OUT, PV_OUT, S, T, H, KV, sink, window, sliding,
                       SCALE: tl.constexpr, SOFTCAP: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """TensorRT AOT argument order: inputs, outputs (PK_OUT/PV_OUT alias PK/PV), then integer extras;
    the float attributes are compile-time constants (AOT extras are integer expressions only)."""
    _kv_step_body(Q, K, V, PK_OUT, PV_OUT, CL, OUT, S, T, H, KV, sink, window, sliding, SCALE, SOFTCAP,
                  G, D, BLOCK_D, BLOCK_N)


def _phase_window(attrs: dict, s: int) -> tuple[int, int]:
    phase = "decode" if s == 1 else "prefill"
    window = int(attrs.get(f"policy_{phase}_window", 0)) if attrs.get(f"policy_{phase}", "dense") != "dense" else 0
    return (int(attrs.get(f"policy_{phase}_sink", 0)) if window else 0), window


def kv_step_reference(query, key, value, past_key, past_value, cache_length, attrs: dict) -> torch.Tensor:
    """Eager twin of `kv_step` (same signature; past_key/past_value updated in place) -> [B, S, H, D]."""
    b, h, s, _ = query.shape
    kv, t = past_key.shape[1], past_key.shape[2]
    for i in range(b):
        c = int(cache_length[i])
        past_key[i, :, c:c + s] = key[i]
        past_value[i, :, c:c + s] = value[i]
    sink, window = _phase_window(attrs, s)
    pos = cache_length[:, None] + torch.arange(s)[None]                       # [B, S]
    j = torch.arange(t)[None, None]
    ok = j <= pos[..., None]
    if int(attrs.get("sliding_window", 0)) > 0:
        ok &= j > pos[..., None] - int(attrs["sliding_window"])
    if window > 0:
        ok &= (j < sink) | (pos[..., None] - j < window)
    k = past_key.float().repeat_interleave(h // kv, 1)
    v = past_value.float().repeat_interleave(h // kv, 1)
    scores = query.float() @ k.transpose(2, 3) * float(attrs["scale"])       # [B, H, S, T]
    if float(attrs.get("softcap", 0.0)) > 0:
        scores = torch.tanh(scores / attrs["softcap"]) * attrs["softcap"]
    probs = torch.softmax(scores.masked_fill(~ok[:, None], float("-inf")), -1)
    return (probs @ v).transpose(1, 2).to(query.dtype)


def kv_step(query, key, value, past_key, past_value, cache_length, attrs: dict, block_n: int = 32) -> torch.Tensor:
    """Launch `kv_step_kernel` (updates past_key/past_value in place); returns output [B, S, H, D]."""
    b, h, s, d = query.shape
    kv, t = past_key.shape[1], past_key.shape[2]
    sink, window = _phase_window(attrs, s)
    tensors = [x.contiguous() for x in (query, key, value)]
    out = torch.empty((b, s, h, d), dtype=query.dtype, device=query.device)
    kv_step_kernel[(b * kv,)](*tensors, past_key, past_value, cache_length, out, s, t, h, kv, sink, window,
                              int(attrs.get("sliding_window", 0)), float(attrs["scale"]), float(attrs.get("softcap", 0.0)),
                              G=h // kv, D=d, BLOCK_D=max(16, next_pow2(d)), BLOCK_N=block_n)
    return out


def compile_ptx(dtype: str, group: int, head_dim: int, cc: int = 80, block_n: int = 32, *, aot_scale: float | None = None,
                softcap: float = 0.0) -> tuple[str, str, dict]:
    """(kernel name, PTX, metadata) for `dtype` ("fp16"/"bf16"/"fp32") on sm_`cc`; needs no GPU.
    `aot_scale` given: the TensorRT AOT variant `kv_step_aot_kernel` with scale/softcap baked in."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    kernel = kv_step_kernel if aot_scale is None else kv_step_aot_kernel
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    ptr = f"*{dtype}"
    names = ["Q", "K", "V", "PK", "PV", "CL", "OUT"] + ([] if aot_scale is None else ["PK_OUT", "PV_OUT"])
    signature = {n: ("*i64" if n == "CL" else ptr) for n in names}
    signature |= {n: "i32" for n in ("S", "T", "H", "KV", "sink", "window", "sliding")}
    constexprs = {"G": group, "D": head_dim, "BLOCK_D": max(16, next_pow2(head_dim)), "BLOCK_N": block_n}
    if aot_scale is None:
        signature |= {"scale": "fp32", "softcap": "fp32"}
    else:
        constexprs |= {"SCALE": float(aot_scale), "SOFTCAP": float(softcap)}
    signature |= {n: "constexpr" for n in constexprs}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32))
    meta = {"num_warps": compiled.metadata.num_warps, "shared": compiled.metadata.shared}
    return compiled.metadata.name, compiled.asm["ptx"], meta
