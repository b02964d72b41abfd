"""GPU-only: the compiled latent_decode kernel at realistic sizes == latent_decode_reference (fp16 / bf16), and the
latent plugin engine's greedy tokens == ONNX Runtime (TensorRT-RTX GPUs: SM80/86/89/120, not Hopper)."""

import importlib.util

import pytest
import torch
from latent_cases import rope_table, topk_pages

from kvconvert.kernels import LatentWeights, latent_decode, latent_decode_reference, sink_window_pages

pytestmark = pytest.mark.gpu
TOL = {torch.float16: {"atol": 5e-3, "rtol": 5e-3}, torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}


def _case(dtype, heads, kv_heads, head_dim, rank_k, rank_v, lmax, joint, norm, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)

    width = kv_heads * head_dim
    c_k = randn(2, 1, lmax, rank_k)
    c_v = c_k if joint else randn(2, 1, lmax, rank_v)
    cos, sin = rope_table(lmax, head_dim, device="cuda")
    w = LatentWeights(kv_heads, randn(rank_k, width, scale=rank_k ** -0.5),
                      randn(c_v.shape[-1], width, scale=c_v.shape[-1] ** -0.5), cos.to(dtype), sin.to(dtype),
                      randn(width, scale=0.1), randn(width, scale=0.1),
                      (torch.rand(head_dim, device="cuda", generator=g) + 0.5).to(dtype) if norm else None,
                      1e-6 if norm else 0.0)
    return randn(2, heads, head_dim), c_k, c_v, w


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("joint,norm", [(False, False), (True, True)])
@pytest.mark.parametrize("heads,kv_heads,head_dim,rank", [(9, 3, 64, 96), (32, 8, 128, 512)])
def test_latent_decode_long_context(dtype, joint, norm, heads, kv_heads, head_dim, rank):
    lmax = 16384
    q, c_k, c_v, w = _case(dtype, heads, kv_heads, head_dim, rank, rank, lmax, joint, norm)
    lens = torch.tensor([lmax, 9001], dtype=torch.int32, device="cuda")
    want = latent_decode_reference(q, c_k, c_v, lens, w)
    for splits in (None, 1, 16):
        torch.testing.assert_close(latent_decode(q, c_k, c_v, lens, w, num_splits=splits).float(), want.float(),
                                   **TOL[dtype])
    sel = sink_window_pages(lens, 4, 2048, 64, kv_heads)
    torch.testing.assert_close(latent_decode(q, c_k, c_v, lens, w, sink=4, window=2048).float(),
                               latent_decode_reference(q, c_k, c_v, lens, w, *sel.args()[1:], sink=4,
                                                       window=2048).float(), **TOL[dtype])
    sel = topk_pages(q, c_k, w, lens, 32, 64, 1, 2, keys_dtype=dtype)
    torch.testing.assert_close(latent_decode(q, c_k, c_v, lens, w, *sel.args()[1:]).float(),
                               latent_decode_reference(q, c_k, c_v, lens, w, *sel.args()[1:]).float(), **TOL[dtype])


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt-rtx-cu13 not installed")
@pytest.mark.parametrize("attention", ["kvconvert", "standard"])
def test_latent_engine_greedy_equals_onnxruntime(tiny_folder, tmp_path, attention):
    """The KVLatentAttention plugin (latent_decode inside the engine) / the standard-op latent engine against ONNX
    Runtime running the graph. Needs an SM80/86/89/120 GPU."""
    from kvconvert.convert.latent import LatentConfig, fit_latent
    from kvconvert.export.engine import EngineConfig, Runner, export_engine
    from kvconvert.export.onnx import OnnxExportConfig, OrtGenerator, export_onnx

    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(3, 150, (1, 32), generator=g) for _ in range(2)]
    src = fit_latent(str(tiny_folder("qwen3")), LatentConfig(evaluate=False, kv_ratio=0.5, joint_kv=True, metric="none"),
                     tmp_path / "lat", calib=calib, progress=False).out
    onnx_dir = export_onnx(str(src), OnnxExportConfig(max_context=64, dtype="fp16", attention=attention),
                           tmp_path / "onnx", progress=False).out
    export_engine(onnx_dir, EngineConfig(max_batch=2, opt_prefill=8), tmp_path / "eng")
    prompts = [[5, 9, 11, 3, 7], [40, 2, 17]]
    want = OrtGenerator(onnx_dir, providers=["CPUExecutionProvider"]).generate(prompts, 12, eos_token_id=None)
    got = Runner(tmp_path / "eng").generate(prompts, 12)
    assert got == [list(w[len(p):]) for w, p in zip(want, prompts)]
