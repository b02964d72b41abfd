"""Passes on a model several times larger than the memory they are allowed: the calibrated GQA fit, fit-latent and
eval run in subprocesses whose peak RSS growth (beyond the imports) stays a fraction of the model's fp32 size, and
give the in-RAM path's tensors / perplexity."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LAYERS, HIDDEN, INTER, VOCAB = 16, 384, 1152, 1000


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    """A random GQA llama (8 query / 2 KV heads, like the GQA-8 output fit-latent runs on in the benchmark) of ~27M
    parameters (~105 MB fp32), saved in bf16. fit-latent's per-layer statistics ([2 KV width]^2 Fishers, spectra)
    grow with KV width^2 x layers, not with the weights: an MHA model this narrow would make them as large as it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=48, vocab_size=VOCAB,
                               max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else 0.03 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("big")
    model.save_pretrained(folder, max_shard_size="20MB")
    return folder, sum(p.numel() for p in model.parameters()) * 4


def _calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (1, 128), generator=g) for _ in range(2)]


SCRIPT = """
import json, resource, sys, torch
from kvconvert.convert.gqa import GQAConfig, mha_to_gqa
from kvconvert.convert.latent import LatentConfig, fit_latent
from kvconvert.eval.evaluate import EvalConfig, evaluate
from kvconvert.io import resolve_source
from kvconvert.runtime.layerwise import LayerwiseModel
import transformers.models.llama.modeling_llama  # noqa: F401
src, out, what = sys.argv[1:4]
g = torch.Generator().manual_seed(0)
calib = [torch.randint(0, {vocab}, (1, 128), generator=g) for _ in range(2)]
source = resolve_source(src)
base = resolve_source(src).reader().shapes()
before = resolve_source(src)
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if what == "gqa":
    mha_to_gqa(source, GQAConfig(groups=1, method="calibrated", evaluate=False), out, calib=calib, progress=False)
    result = {{}}
elif what == "latent":
    fit_latent(source, LatentConfig(kv_ratio=0.5, evaluate=False, sensitivity_samples=1), out, calib=calib,
               progress=False)
    result = {{}}
else:
    res = evaluate(source, EvalConfig(max_tokens=256, chunk=128, device="cpu"), calib=calib, progress=False)
    result = {{"perplexity": res.metrics["eval"]["perplexity"]}}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"growth": peak - start, **result}}))
""".format(vocab=VOCAB)


def _run(folder, out, what):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), str(folder), str(out), what],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_passes_on_a_model_larger_than_their_memory_equal_the_in_ram_path(big_folder, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from kvconvert.convert.gqa import GQAConfig
    from kvconvert.convert.gqa_calibrated import fit_calibrated
    from kvconvert.convert.latent import LatentConfig
    from kvconvert.convert.latent_build import fit_factors
    from kvconvert.eval.perplexity import perplexity
    from kvconvert.io import resolve_source
    from kvconvert.models import describe

    folder, fp32_bytes = big_folder
    budget = fp32_bytes / 3  # what each pass may add on top of the interpreter and its imports
    gqa = _run(folder, tmp_path / "gqa", "gqa")
    lat = _run(folder, tmp_path / "lat", "latent")
    ev = _run(folder, None, "eval")
    for name, r in (("calibrated gqa", gqa), ("fit-latent", lat), ("eval", ev)):
        assert r["growth"] < budget, f"{name} grew RSS by {r['growth'] / 2**20:.0f} MiB (model fp32 " \
                                     f"{fp32_bytes / 2**20:.0f} MiB)"

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    view = describe(resolve_source(folder).config_dict())
    ref, _ = fit_calibrated(model, view, GQAConfig(groups=1, method="calibrated"), _calib(), progress=False)
    written = {}
    for f in (tmp_path / "gqa").glob("*.safetensors"):
        written.update(load_file(f))
    for name, t in ref.items():
        torch.testing.assert_close(written[name].float(), t.to(torch.bfloat16).float(), rtol=2e-2, atol=1e-3)
    fit = fit_factors(model, view, LatentConfig(kv_ratio=0.5, sensitivity_samples=1), _calib(), progress=False)
    latent = {}
    for f in (tmp_path / "lat").glob("*.safetensors"):
        latent.update(load_file(f))
    assert json.loads((tmp_path / "lat" / "config.json").read_text())["kvconvert_latent"]["kv_widths"] == \
        [list(w) for w in fit.widths]
    for i, factors in enumerate(fit.factors):
        got = latent[f"{view.layer_prefix(i)}.k_latent.weight"].float()
        torch.testing.assert_close(got, factors["k_latent"].to(torch.bfloat16).float(), rtol=2e-2, atol=1e-3)
    ids = torch.cat([b.flatten() for b in _calib()])
    assert ev["perplexity"] == pytest.approx(perplexity(model, ids, chunk=128, max_tokens=256), rel=1e-4)
