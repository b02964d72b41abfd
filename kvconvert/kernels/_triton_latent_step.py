"""One fused KVLatentAttention step for the ahead-of-time TensorRT plugin (a single kernel per plugin call): write the
S new latent rows into the (aliased) buffers at cache_length[b] + s, then for each new token attend from the latents
(`latent_decode`'s algebra: keys rebuilt in registers, RoPE and k_norm applied, values accumulated as latents,
v_up applied at the end). One program per (sequence, KV head) serves the whole query group. The op's inputs arrive
as the model stores them (no host-side preparation): rotate_half is read through permuted column indices.

Shapes (the op's, see export/onnx/latent_op.py): query [B,H,S,D] (before RoPE), new latents [B,1,S,R*],
buffers [B,1,T,R*], cache_length int64 [B], k_up [Rk,KV*D], k_bias [KV*D], v_up [Rv,KV*D], v_bias [KV*D],
k_norm_weight [D], rope_cos/rope_sin [T,ROT] -> output [B,S,H,D].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2
from ._triton_common import visible


@triton.jit
def _latent_step_body(Q, KN, VN, PK, PV, CL, KUP, KB, VUP, VB, KW, COS, SIN, OUT, S, T, H, KV, sink, window, sliding,
                      SCALE: tl.constexpr, SOFTCAP: tl.constexpr, EPS: tl.constexpr, JOINT: tl.constexpr,
                      G: tl.constexpr, D: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, ROT: tl.constexpr,
                      BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_RV: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // KV
    g = pid % KV
    cl = tl.load(CL + b).to(tl.int32)
    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    slots = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_R)
    rv = tl.arange(0, BLOCK_RV)
    row_ok = rows < G
    dim_ok = dims < D
    rv_ok = rv < RV
    half = ROT // 2
    perm = tl.where(dims < half, dims + half, tl.where(dims < ROT, dims - half, dims))
    sign = tl.where(dims < half, -1.0, tl.where(dims < ROT, 1.0, 0.0))
    rot_ok = dims < ROT
    b64 = b.to(tl.int64)
    # the new latents into the aliased buffers (every KV-head program writes the same values)
    for s in range(S):
        for r0 in tl.static_range(0, RK, BLOCK_R):
            m = r0 + rk < RK
            tl.store(PK + (b64 * T + cl + s) * RK + r0 + rk, tl.load(KN + (b64 * S + s) * RK + r0 + rk, mask=m), mask=m)
        if not JOINT:
            tl.store(PV + (b64 * T + cl + s) * RV + rv, tl.load(VN + (b64 * S + s) * RV + rv, mask=rv_ok), mask=rv_ok)
    tl.debug_barrier()
    kb = tl.load(KB + g * D + dims, mask=dim_ok, other=0.0).to(tl.float32)
    kb_r = tl.load(KB + g * D + perm, mask=dim_ok, other=0.0).to(tl.float32) * sign
    kw = tl.load(KW + dims, mask=dim_ok, other=1.0).to(tl.float32)
    kw_r = tl.load(KW + perm, mask=dim_ok, other=1.0).to(tl.float32)
    vup = tl.load(VUP + rv[:, None] * (KV * D) + g * D + dims[None, :], mask=rv_ok[:, None] & dim_ok[None, :],
                  other=0.0).to(tl.float32)
    vb = tl.load(VB + g * D + dims, mask=dim_ok, other=0.0).to(tl.float32)
    q_mask = row_ok[:, None] & dim_ok[None, :]
    for s in range(S):
        t = cl + s
        qbase = Q + ((b64 * H + g * G + rows[:, None]) * S + s) * D
        q = tl.load(qbase + dims[None, :], mask=q_mask, other=0.0).to(tl.float32)
        q_r = tl.load(qbase + perm[None, :], mask=q_mask, other=0.0).to(tl.float32) * sign[None, :]
        cos_q = tl.load(COS + t * ROT + dims, mask=rot_ok, other=1.0).to(tl.float32)
        sin_q = tl.load(SIN + t * ROT + dims, mask=rot_ok, other=0.0).to(tl.float32)
        q = q * cos_q[None, :] + q_r * sin_q[None, :]
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_RV], tl.float32)
        for j0 in range(0, t + 1, BLOCK_N):
            pos = j0 + slots
            ok = visible(pos, t, sliding, sink, window)
            x = tl.zeros([BLOCK_N, BLOCK_D], tl.float32) + kb[None, :]
            xr = tl.zeros([BLOCK_N, BLOCK_D], tl.float32) + kb_r[None, :]
            for r0 in tl.static_range(0, RK, BLOCK_R):
                rr = r0 + rk
                r_ok = rr < RK
                c = tl.load(PK + (b64 * T + pos[:, None]) * RK + rr[None, :], mask=ok[:, None] & r_ok[None, :],
                            other=0.0).to(tl.float32)
                w_rows = rr[:, None] * (KV * D) + g * D
                up = tl.load(KUP + w_rows + dims[None, :], mask=r_ok[:, None] & dim_ok[None, :], other=0.0)
                up_r = tl.load(KUP + w_rows + perm[None, :], mask=r_ok[:, None] & dim_ok[None, :], other=0.0)
                x += tl.dot(c, up.to(tl.float32), input_precision="ieee")
                xr += tl.dot(c, up_r.to(tl.float32) * sign[None, :], input_precision="ieee")
            if EPS > 0:
                inv = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + EPS)
                x = x * inv[:, None] * kw[None, :]
                xr = xr * inv[:, None] * kw_r[None, :]
            tab = pos[:, None] * ROT + dims[None, :]
            cos = tl.load(COS + tab, mask=ok[:, None] & rot_ok[None, :], other=1.0).to(tl.float32)
            sin = tl.load(SIN + tab, mask=ok[:, None] & rot_ok[None, :], other=0.0).to(tl.float32)
            k = x * cos + xr * sin
            if JOINT:
                v = tl.load(PK + (b64 * T + pos[:, None]) * RK + rv[None, :], mask=ok[:, None] & rv_ok[None, :],
                            other=0.0).to(tl.float32)
            else:
                v = tl.load(PV + (b64 * T + pos[:, None]) * RV + rv[None, :], mask=ok[:, None] & rv_ok[None, :],
                            other=0.0).to(tl.float32)
            sc = tl.dot(q, tl.trans(k), input_precision="ieee") * SCALE
            if SOFTCAP > 0:
                sc = (2.0 * tl.sigmoid(2.0 * sc / SOFTCAP) - 1.0) * SOFTCAP
            sc = tl.where(ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(sc - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new
        seen = l_i > 0
        o_lat = acc / tl.where(seen, l_i, 1.0)[:, None]
        out = tl.dot(o_lat, vup, input_precision="ieee") + tl.where(seen, 1.0, 0.0)[:, None] * vb[None, :]
        tl.store(OUT + ((b64 * S + s) * H + g * G + rows[:, None]) * D + dims[None, :], out.to(OUT.dtype.element_ty),
                 mask=q_mask)


@triton.jit
def latent_step_aot_kernel(Q, KN, VN, PK, PV, CL, KUP, KB, VUP, VB, KW, COS, SIN, OUT, PK_OUT, PV_OUT,
                           S, T, H, KV, sink, window, sliding,
                           SCALE: tl.constexpr, SOFTCAP: tl.constexpr, EPS: tl.constexpr, G: tl.constexpr,
                           D: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, ROT: tl.constexpr,
                           BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_RV: tl.constexpr):
    """TensorRT AOT order for separate latents: the op's 13 inputs, its 3 outputs (PK_OUT/PV_OUT alias PK/PV),
    then the integer extras; float attributes are compile-time constants."""
    _latent_step_body(Q, KN, VN, PK_OUT, PV_OUT, CL, KUP, KB, VUP, VB, KW, COS, SIN, OUT, S, T, H, KV, sink, window,
                      sliding, SCALE, SOFTCAP, EPS, False, G, D, RK, RV, ROT, BLOCK_G, BLOCK_D, BLOCK_N, BLOCK_R,
                      BLOCK_RV)


@triton.jit
def latent_step_joint_aot_kernel(Q, KN, PK, CL, KUP, KB, VUP, VB, KW, COS, SIN, OUT, PK_OUT,
                                 S, T, H, KV, sink, window, sliding,
                                 SCALE: tl.constexpr, SOFTCAP: tl.constexpr, EPS: tl.constexpr, G: tl.constexpr,
                                 D: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, ROT: tl.constexpr,
                                 BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_R: tl.constexpr, BLOCK_RV: tl.constexpr):
    """Joint latent: the op's 11 inputs, its 2 outputs (PK_OUT aliases PK), then the integer extras."""
    _latent_step_body(Q, KN, KN, PK_OUT, PK_OUT, CL, KUP, KB, VUP, VB, KW, COS, SIN, OUT, S, T, H, KV, sink, window,
                      sliding, SCALE, SOFTCAP, EPS, True, G, D, RK, RV, ROT, BLOCK_G, BLOCK_D, BLOCK_N, BLOCK_R,
                      BLOCK_RV)


def step_constexprs(attrs: dict, group: int, head_dim: int, rank_k: int, rank_v: int, rotary: int,
                    block_n: int = 16) -> dict:
    return {"SCALE": float(attrs["scale"]), "SOFTCAP": float(attrs.get("softcap", 0.0)),
            "EPS": float(attrs.get("k_norm_eps", 0.0)), "G": group, "D": head_dim, "RK": rank_k, "RV": rank_v,
            "ROT": rotary, "BLOCK_G": max(16, next_pow2(group)), "BLOCK_D": max(16, next_pow2(head_dim)),
            "BLOCK_N": block_n, "BLOCK_R": min(64, max(16, next_pow2(rank_k))), "BLOCK_RV": max(16, next_pow2(rank_v))}


def phase_window(attrs: dict, s: int) -> tuple[int, int]:
    """(sink, window) of the sink_window policy of this step's phase (0, 0 when the phase is dense)."""
    phase = "decode" if s == 1 else "prefill"
    if attrs.get(f"policy_{phase}", "dense") != "sink_window":
        return 0, 0
    return int(attrs.get(f"policy_{phase}_sink", 0)), int(attrs.get(f"policy_{phase}_window", 0))


def latent_step(*inputs: torch.Tensor, attrs: dict) -> torch.Tensor:
    """Launch the fused step on the op's inputs (`latent_op.latent_io` order; the past buffers are updated in
    place) -> output [B, S, H, D]. The AOT plugin runs the same kernel from its PTX."""
    joint = bool(attrs["joint_kv"])
    x = list(inputs)
    q = x[0]
    b, h, s, d = q.shape
    kv = int(attrs["num_kv_heads"])
    past = x[2] if joint else x[3]
    rk = past.shape[-1]
    rv = rk if joint else x[4].shape[-1]
    rotary = x[-2].shape[-1]
    out = torch.empty((b, s, h, d), dtype=q.dtype, device=q.device)
    sink, window = phase_window(attrs, s)
    tensors = [t.contiguous() for t in x]
    if joint:
        tensors[2] = past  # written in place
    else:
        tensors[3], tensors[4] = past, x[4]
    ce = step_constexprs(attrs, h // kv, d, rk, rv, rotary)
    kernel = latent_step_joint_aot_kernel if joint else latent_step_aot_kernel
    outs = [out, tensors[2]] if joint else [out, tensors[3], tensors[4]]
    kernel[(b * kv,)](*tensors, *outs, s, past.shape[2], h, kv, sink, window, int(attrs.get("sliding_window", 0)), **ce,
                      num_warps=1 if q.device.type == "cpu" else 4)
    return out


def compile_latent_step_ptx(dtype: str, attrs: dict, group: int, head_dim: int, rank_k: int, rank_v: int,
                            rotary: int, cc: int = 80) -> tuple[str, str, dict]:
    """(kernel name, PTX, {num_warps, shared}) of the AOT step kernel for `dtype` tensors on sm_`cc`, no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    joint = bool(attrs["joint_kv"])
    kernel = latent_step_joint_aot_kernel if joint else latent_step_aot_kernel
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    names = fn.arg_names
    ints = ["S", "T", "H", "KV", "sink", "window", "sliding"]
    ce = step_constexprs(attrs, group, head_dim, rank_k, rank_v, rotary)
    signature = {}
    for n in names:
        if n in ce:
            signature[n] = "constexpr"
        elif n in ints:
            signature[n] = "i32"
        else:
            signature[n] = "*i64" if n == "CL" else f"*{dtype}"
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=ce), target=GPUTarget("cuda", cc, 32))
    return compiled.metadata.name, compiled.asm["ptx"], {"num_warps": compiled.metadata.num_warps,
                                                         "shared": compiled.metadata.shared}
