"""latent_decode (Triton, under TRITON_INTERPRET=1 on CPU) == latent_decode_reference == the latent model's own
attention (kvconvert.runtime.latent, transformers path; under kvconvert.sparse for the policies) and == the
KVLatentAttention op's reference. Interpreter cases stay small: the interpreter is slow."""

import pytest
import torch
from latent_cases import rope_table, topk_pages

import kvconvert
from kvconvert.convert.latent import LatentConfig, fit_latent
from kvconvert.export.onnx.latent_op import kv_latent_attention_reference, latent_node_attributes, rotate
from kvconvert.kernels import LatentWeights, latent_decode, latent_decode_reference, sink_window_pages

B, H, KV, D, RK, RV, L = 2, 4, 2, 16, 12, 20, 40


def random_case(joint, norm, bias, rotary=D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rv = RK if joint else RV
    c_k = torch.randn(B, 1, L, RK, generator=g).to(dtype)
    c_v = c_k if joint else torch.randn(B, 1, L, RV, generator=g).to(dtype)
    cos, sin = rope_table(L, rotary)
    w = LatentWeights(KV, (torch.randn(RK, KV * D, generator=g) / 3).to(dtype),
                      (torch.randn(rv, KV * D, generator=g) / 3).to(dtype), cos.to(dtype), sin.to(dtype),
                      torch.randn(KV * D, generator=g).to(dtype) if bias else None,
                      torch.randn(KV * D, generator=g).to(dtype) if bias else None,
                      (torch.rand(D, generator=g) + 0.5).to(dtype) if norm else None, 1e-6 if norm else 0.0)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    return q, c_k, c_v, w


def selection(kind, q, c_k, w, lens, page):
    """(counts, indices, sink, window) of one decode step under `kind`, keys rebuilt for the page summaries."""
    if kind == "dense":
        return None, None, 0, 0
    if kind == "sink_window":
        sel = sink_window_pages(lens, 3, 7, page, w.num_kv_heads)
        return sel.counts, sel.indices, 3, 7
    sel = topk_pages(q.float(), c_k, w, lens, page, 2, 1, 1)
    assert int(sel.counts.min()) < int(((lens.long() + page - 1) // page).max())  # pages really skipped
    return sel.counts, sel.indices, 0, 0


@pytest.mark.parametrize("kind", ["dense", "page_topk", "sink_window"])
@pytest.mark.parametrize("joint,norm,bias", [(False, False, True), (False, True, False), (True, True, True),
                                             (True, False, False)])
def test_kernel_equals_reference(kind, joint, norm, bias):
    q, c_k, c_v, w = random_case(joint, norm, bias)
    lens = torch.tensor([L, 23], dtype=torch.int32)  # ragged
    counts, indices, sink, window = selection(kind, q, c_k, w, lens, 8)
    want = latent_decode_reference(q, c_k, c_v, lens, w, counts, indices, 8, sink, window)
    for splits in (None, 3):
        got = latent_decode(q, c_k, c_v, lens, w, counts, indices, 8, sink, window, num_splits=splits)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_kernel_partial_rotary_and_fp16():
    q, c_k, c_v, w = random_case(False, True, True, rotary=8)
    lens = torch.tensor([L, 5], dtype=torch.int32)
    torch.testing.assert_close(latent_decode(q, c_k, c_v, lens, w, page_size=16),
                               latent_decode_reference(q, c_k, c_v, lens, w), atol=2e-5, rtol=2e-5)
    q, c_k, c_v, w = random_case(True, False, True, dtype=torch.float16)
    got = latent_decode(q, c_k, c_v, lens, w, page_size=16)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), latent_decode_reference(q, c_k, c_v, lens, w).float(), atol=3e-3,
                               rtol=3e-3)


def test_sink_window_pages_cover_exactly_the_kept_slots():
    lens = torch.tensor([40, 23, 5, 1], dtype=torch.int32)
    sel = sink_window_pages(lens, 3, 7, 8, 2)
    for b, n in enumerate(lens.tolist()):
        want = {p // 8 for p in range(n) if p < 3 or p >= n - 7}
        got = set(sel.indices[b, 0, : sel.counts[b, 0]].tolist())
        assert got == want and sorted(got) == sel.indices[b, 0, : sel.counts[b, 0]].tolist()


@pytest.mark.parametrize("kind", ["dense", "page_topk", "sink_window"])
@pytest.mark.parametrize("joint", [False, True])
def test_reference_equals_op_reference(kind, joint):
    """One decode step of KVLatentAttention (the ONNX op's eager semantics) on ragged cache lengths."""
    q, c_k, c_v, w = random_case(joint, True, True, seed=1)
    lens = torch.tensor([L, 33], dtype=torch.int32)
    cl = lens.long() - 1
    page = 8
    policy = {"dense": None, "sink_window": {"kind": "sink_window", "decode": "sink_window", "decode_sink": 3,
                                             "decode_window": 7},
              "page_topk": {"kind": "page_topk", "decode": "page_topk", "decode_page": page, "decode_keep": 0.0,
                            "decode_budget": 2 * page, "decode_sink_pages": 1, "decode_recent_pages": 1,
                            "decode_dense_below": 0}}[kind]
    attrs = latent_node_attributes(joint_kv=joint, k_norm_eps=w.k_norm_eps, num_heads=H, num_kv_heads=KV, head_dim=D,
                                   scale=D ** -0.5, policy=policy)
    rows = torch.arange(B)
    new = [c_k[rows, :, cl][:, :, None]] + ([] if joint else [c_v[rows, :, cl][:, :, None]])
    past = [c_k] + ([] if joint else [c_v])
    op = kv_latent_attention_reference(q[:, :, None], *new, *past, cl, w.k_up, w.k_bias, w.v_up, w.v_bias,
                                       w.k_norm_weight, w.rope_cos, w.rope_sin, attrs=attrs)[0][:, 0]
    q_rot = rotate(q[:, :, None], w.rope_cos[cl][:, None, None], w.rope_sin[cl][:, None, None])[:, :, 0]
    counts, indices, sink, window = selection(kind, q_rot, c_k, w, lens, page)
    ours = latent_decode_reference(q_rot, c_k, c_v, lens, w, counts, indices, page, sink, window)
    torch.testing.assert_close(ours, op, atol=1e-5, rtol=1e-5)


# --- against the latent model's own attention (fit-latent tiny models, transformers path) -----------------

@pytest.fixture(scope="module")
def latent_model(tiny_folder, tmp_path_factory):
    cache = {}

    def make(model_type, joint):
        if (model_type, joint) not in cache:
            g = torch.Generator().manual_seed(0)
            calib = [torch.randint(3, 150, (1, 32), generator=g) for _ in range(2)]
            out = tmp_path_factory.mktemp(f"lat-{model_type}-{int(joint)}") / "m"
            kv = 2 if model_type == "llama" else None
            fit_latent(str(tiny_folder(model_type, kv)), LatentConfig(evaluate=False, kv_ratio=0.5, joint_kv=joint,
                                                                     metric="none"),
                       out, calib=calib, progress=False)
            cache[(model_type, joint)] = kvconvert.load_latent(out)
        return cache[(model_type, joint)]

    return make


def module_weights(m, length):
    cos, sin = m._rope[0].upto(length, m.o_proj.weight)
    eps = 0.0
    if m.k_norm is not None:
        eps = float(getattr(m.k_norm, "variance_epsilon", getattr(m.k_norm, "eps", 0.0)))
    return LatentWeights(m.num_kv_heads, m.k_proj.weight.t().detach(), m.v_proj.weight.t().detach(), cos[0], sin[0],
                         m.k_proj.bias, m.v_proj.bias, m.k_norm.weight if m.k_norm is not None else None, eps)


def module_decode(model, m, x):
    """The module's own output (after o_proj) for the last token of x [1, n, hidden] after prefilling the rest."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    m(x[:, :-1], attention_mask=None, cache=cache)
    return m(x[:, -1:], attention_mask=None, cache=cache)[0][:, 0]


def our_decode(m, xs, fn, kind="dense", page=16):
    """latent_decode(_reference) over a ragged batch built from the rows xs [1, n_b, hidden], then o_proj."""
    lens = torch.tensor([x.shape[1] for x in xs], dtype=torch.int32)
    lmax = int(lens.max())
    w = module_weights(m, lmax)
    c_k = torch.zeros(len(xs), 1, lmax, m.k_proj.in_features)
    c_v = torch.zeros(len(xs), 1, lmax, m.v_proj.in_features)
    q = torch.zeros(len(xs), m.num_heads, m.head_dim)
    for b, x in enumerate(xs):
        ck, cv = m.latents(x)
        c_k[b, :, : x.shape[1]], c_v[b, :, : x.shape[1]] = ck[0], (ck if m.joint else cv)[0]
        n = x.shape[1]
        q[b] = rotate(m.queries(x[:, -1:]), w.rope_cos[n - 1], w.rope_sin[n - 1])[0, :, 0]
    if m.joint:
        c_v = c_k
    counts, indices, sink, window = None, None, 0, 0
    if kind == "sink_window":
        counts, indices, sink, window = selection(kind, q, c_k, w, lens, page)
    elif kind == "page_topk":
        keep = (((lens.long() + page - 1) // page).float() * 0.25).ceil().long()
        sel = topk_pages(q, c_k, w, lens, page, keep, 1, 1)
        counts, indices = sel.counts, sel.indices
    out = fn(q, c_k, c_v, lens, w, counts, indices, page, sink, window, scale=m.scaling)
    return m.o_proj(out.reshape(len(xs), -1))


POLICIES = {"sink_window": "sink_window:sink=3,window=7",
            "page_topk": "page_topk:page=16,keep=0.25,dense_below=32,sink_pages=1,recent_pages=1"}


@pytest.mark.parametrize("model_type,joint", [("llama", False), ("qwen2", False), ("qwen3", False),
                                              ("qwen2", True), ("qwen3", True)])
def test_reference_equals_latent_model_attention(latent_model, model_type, joint):
    """llama (GQA), qwen2 (K/V biases), qwen3 (k_norm); joint and separate latents; ragged rows; dense and the
    two decode policies (the model under kvconvert.sparse); the kernel on the same inputs (interpreter)."""
    model = latent_model(model_type, joint)
    m = model.get_submodule("model.layers.1.self_attn")
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, n, model.config.hidden_size, generator=g) for n in (70, 41)]
    with torch.no_grad():
        for kind in ("dense", *POLICIES):
            if kind == "dense":
                want = [module_decode(model, m, x) for x in xs]
            else:
                with kvconvert.sparse(model, POLICIES[kind]):
                    want = [module_decode(model, m, x) for x in xs]
            ours = our_decode(m, xs, latent_decode_reference, kind)
            for b in range(len(xs)):
                torch.testing.assert_close(ours[b], want[b][0], atol=1e-4, rtol=1e-4)
            assert (ours - torch.cat(want)).abs().max() < 1e-4
        kernel = our_decode(m, xs, latent_decode, "page_topk")
        torch.testing.assert_close(kernel, our_decode(m, xs, latent_decode_reference, "page_topk"), atol=2e-5,
                                   rtol=2e-5)


def test_kernel_wide_rank_and_pages_longer_than_a_tile():
    """Rk > 64 (the key rebuild is accumulated over rank chunks) and 64-slot pages (two 32-slot tiles per page)."""
    g = torch.Generator().manual_seed(5)
    rk, rv, length, d = 80, 24, 150, 16
    c_k, c_v = torch.randn(2, 1, length, rk, generator=g), torch.randn(2, 1, length, rv, generator=g)
    cos, sin = rope_table(length, d)
    w = LatentWeights(KV, torch.randn(rk, KV * d, generator=g) / 5, torch.randn(rv, KV * d, generator=g) / 3, cos, sin,
                      torch.randn(KV * d, generator=g), None, torch.rand(d, generator=g) + 0.5, 1e-6)
    q = torch.randn(2, H, d, generator=g)
    lens = torch.tensor([length, 70], dtype=torch.int32)
    sel = topk_pages(q, c_k, w, lens, 64, 2, 1, 0)
    for counts, indices in ((None, None), (sel.counts, sel.indices)):
        want = latent_decode_reference(q, c_k, c_v, lens, w, counts, indices, 64)
        for splits in (None, 2):
            torch.testing.assert_close(latent_decode(q, c_k, c_v, lens, w, counts, indices, 64, num_splits=splits),
                                       want, atol=2e-5, rtol=2e-5)


def test_kernel_compiles_for_rtx_targets_within_shared_memory():
    """No GPU needed: SmolLM2-135M's latent shapes compile through ptxas for SM86 / SM89 inside their ~99 KB of shared
    memory per block (a fresh process: the interpreter patches triton.language)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import json; from kvconvert.kernels._triton_latent import compile_latent_decode as c; "
            "print(json.dumps([c('fp16', 3, 64, 96, 96, page=64, cc=86)[2], c('bf16', 3, 64, 192, 192, cc=89)[2]]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=600,
                         cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    for meta in json.loads(res.stdout.strip().splitlines()[-1]):
        assert 0 < meta["shared"] <= 99 * 1024, meta


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("s,policy", [(1, None), (3, "sink_window"), (1, "softcap")])
def test_fused_aot_step_equals_op_reference(joint, s, policy):
    """The AOT plugin's single kernel (latent cache write + attention, inputs as the op gets them, partial rotary)
    == KVLatentAttention's eager reference, output and buffers, on ragged cache lengths."""
    from kvconvert.kernels._triton_latent_step import latent_step

    g = torch.Generator().manual_seed(7)
    t, rotary = 40, 12
    rv = RK if joint else RV
    sw = {"kind": "sink_window", "decode": "sink_window", "decode_sink": 2, "decode_window": 5,
          "prefill": "sink_window", "prefill_sink": 2, "prefill_window": 5}
    attrs = latent_node_attributes(joint_kv=joint, k_norm_eps=1e-6, num_heads=H, num_kv_heads=KV, head_dim=D,
                                   scale=0.3, softcap=5.0 if policy == "softcap" else 0.0,
                                   policy=sw if policy == "sink_window" else None)
    cos, sin = rope_table(t, rotary)
    weights = [torch.randn(RK, KV * D, generator=g) / 3, torch.randn(KV * D, generator=g),
               torch.randn(rv, KV * D, generator=g) / 3, torch.randn(KV * D, generator=g),
               torch.rand(D, generator=g) + 0.5, cos, sin]
    q, kn, vn = torch.randn(B, H, s, D, generator=g), torch.randn(B, 1, s, RK, generator=g), torch.randn(B, 1, s, RV,
                                                                                                         generator=g)
    pk, pv = torch.randn(B, 1, t, RK, generator=g), torch.randn(B, 1, t, RV, generator=g)
    cl = torch.tensor([10, 25])

    def inputs():
        return [q, kn, pk.clone(), cl] if joint else [q, kn, vn, pk.clone(), pv.clone(), cl]

    ref = kv_latent_attention_reference(*inputs(), *weights, attrs=attrs)
    mine = inputs()
    out = latent_step(*mine, *weights, attrs=attrs)
    torch.testing.assert_close(out, ref[0], atol=2e-5, rtol=2e-5)
    for buf, want in zip(mine[2:3] if joint else mine[3:5], ref[1:]):
        assert torch.equal(buf, want)


def test_fused_aot_step_compiles_to_ptx_without_gpu():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import json; from kvconvert.kernels._triton_latent_step import compile_latent_step_ptx as c; "
            "from kvconvert.export.onnx.latent_op import latent_node_attributes as a; "
            "x = a(joint_kv=True, k_norm_eps=1e-6, num_heads=9, num_kv_heads=3, head_dim=64, scale=0.125); "
            "n, p, m = c('fp16', x, 3, 64, 192, 192, 64, cc=86); print(json.dumps([n, '.entry ' + n in p, m]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=900,
                         cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    name, has_entry, meta = json.loads(res.stdout.strip().splitlines()[-1])
    assert name.startswith("latent_step_joint_aot_kernel") and has_entry and meta["num_warps"] >= 1
