"""The latent runtime's single-token decode goes through the kernel entry point (`latent_decode_step`: the
eager reference on the CPU) and gives what the rebuild-then-attend path gives: greedy tokens and logits."""

import importlib

import pytest
import torch

import kvconvert
from kvconvert.convert.latent import LatentConfig, fit_latent
from kvconvert.runtime.latent.attention import LatentAttention

kernel_module = importlib.import_module("kvconvert.kernels.latent_decode")  # the package re-exports a function of this name


def _generate(model, prompt, steps):
    """Greedy tokens [steps] and the logits of every decode step [steps, V] (prefill, then one token a step)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        out = model(prompt, past_key_values=cache, use_cache=True)
        tokens, logits = [], []
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            tokens.append(int(nxt))
            out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[0, -1])
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return tokens, torch.stack(logits)


@pytest.mark.parametrize("model_type,joint", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_runtime_decode_uses_kernel_entry_and_equals_rebuild_path(tiny_folder, tmp_path, monkeypatch, model_type,
                                                                  joint):
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(3, 150, (1, 48), generator=g) for _ in range(3)]
    out = fit_latent(str(tiny_folder(model_type)), LatentConfig(evaluate=False, kv_ratio=0.5, joint_kv=joint),
                     tmp_path / "lat", calib=calib, progress=False).out
    model = kvconvert.load_latent(out).eval()
    prompt = torch.randint(3, 150, (1, 7), generator=g)

    calls = []
    real = kernel_module.latent_decode_step
    monkeypatch.setattr(kernel_module, "latent_decode_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    tokens, logits = _generate(model, prompt, 12)
    layers = sum(isinstance(m, LatentAttention) for m in model.modules())
    assert len(calls) == 12 * layers  # every decode step of every layer, never the prefill

    monkeypatch.setattr(LatentAttention, "decode_kernel", False)
    calls.clear()
    want_tokens, want_logits = _generate(model, prompt, 12)
    assert not calls
    assert tokens == want_tokens
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
