"""The layer-by-layer executor equals the whole model, and every pass run on it equals its in-RAM path."""

import math

import pytest
import torch

import kvconvert  # noqa: F401  (registers kvconvert_latent)
from kvconvert.convert.activations import attention_input_grams
from kvconvert.convert.gqa import GQAConfig
from kvconvert.convert.gqa_calibrated import TensorSpill, fit_calibrated
from kvconvert.convert.latent import LatentConfig
from kvconvert.convert.latent_build import fit_factors
from kvconvert.eval.perplexity import perplexity, perplexity_layerwise
from kvconvert.io import resolve_source
from kvconvert.models import describe, gqa_capable_model_types
from kvconvert.runtime.layerwise import LayerwiseModel
from tiny_models import TINY


def _ids(n=3, s=40, seed=0, vocab=150):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, s), generator=g) for _ in range(n)]


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_executor_logits_and_loss_equal_the_full_forward(model_type, tiny_folder):
    source = resolve_source(tiny_folder(model_type))
    model = _load(source.path)
    runner = LayerwiseModel(source, device="cpu", head_chunk=7)  # chunked head: several chunks per batch
    batches = _ids()
    states = runner.forward(batches)
    with runner.head_context():
        for ids, state in zip(batches, states):
            with torch.no_grad():
                ref = model(ids).logits
                got = runner.logits(state.hidden)
                nll, n = runner.nll(state)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            ref_nll = torch.nn.functional.cross_entropy(ref[0, :-1], ids[0, 1:], reduction="sum")
            assert n == ids.numel() - 1
            assert float(nll) == pytest.approx(float(ref_nll), rel=1e-5)
    # the skeleton holds no weights between calls: every parameter is back on meta
    assert all(p.device.type == "meta" for p in runner.model.parameters())


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "kvconvert_latent"])
def test_layerwise_perplexity_equals_in_ram(model_type, tiny_folder):
    source = resolve_source(tiny_folder(model_type))
    ids = torch.cat([b.flatten() for b in _ids(4, 50)])
    ref = perplexity(_load(source.path), ids, chunk=64, max_tokens=180)
    got = perplexity_layerwise(source, ids, chunk=64, max_tokens=180, device="cpu")
    assert got == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3", "gemma2"])
def test_gram_and_calibrated_fit_equal_in_ram(model_type, tiny_folder, tmp_path):
    source = resolve_source(tiny_folder(model_type))
    view = describe(source.config_dict())
    batches = _ids()
    model = _load(source.path)
    ref_grams, ref_tokens = attention_input_grams(model, view, batches, progress=False, augment=True)
    seen = {}
    grams, tokens = attention_input_grams(LayerwiseModel(source, device="cpu"), view, batches, progress=False,
                                          augment=True, after_layer=lambda i, g: seen.__setitem__(i, g[i].clone()))
    assert tokens == ref_tokens and sorted(seen) == list(range(view.num_layers))
    for i in range(view.num_layers):
        torch.testing.assert_close(seen[i], ref_grams[i], rtol=1e-9, atol=1e-9)
    cfg = GQAConfig(groups=1, method="calibrated")
    ref, ref_metrics = fit_calibrated(model, view, cfg, batches, progress=False)
    got, metrics = fit_calibrated(LayerwiseModel(source, device="cpu"), view, cfg, batches, progress=False,
                                  store=TensorSpill(tmp_path / "spill"))
    assert set(got.keys()) == set(ref) and metrics["calibration_tokens"] == ref_metrics["calibration_tokens"]
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", gqa_capable_model_types())
@pytest.mark.parametrize("fields", [dict(kv_ratio=0.5), dict(kv_ratio=0.5, joint_kv=True, allocation="uniform"),
                                    dict(kv_ratio=0.4, metric="attention", allocation="uniform")])
def test_fit_factors_layerwise_equal_in_ram(model_type, fields, tiny_folder):
    source = resolve_source(tiny_folder(model_type))
    view = describe(source.config_dict())
    batches = _ids()
    cfg = LatentConfig(**fields)
    ref = fit_factors(_load(source.path), view, cfg, batches, progress=False)
    got = fit_factors(LayerwiseModel(source, device="cpu"), view, cfg, batches, progress=False)
    assert got.widths == ref.widths and got.tokens == ref.tokens
    for a, b in zip(got.factors, ref.factors):
        for name, t in a.items():
            torch.testing.assert_close(t.double(), b[name].double(), rtol=1e-4, atol=1e-5)


def test_fit_latent_output_equals_in_ram_build(tiny_folder, tmp_path):
    """The streamed latent checkpoint holds exactly the tensors of the in-memory latent model."""
    from safetensors.torch import load_file

    from kvconvert.convert.latent import fit_latent
    from kvconvert.convert.latent_build import build_latent_model

    for model_type in ("qwen2", "phi3"):
        source = resolve_source(tiny_folder(model_type))
        view = describe(source.config_dict())
        cfg = LatentConfig(kv_ratio=0.5, evaluate=False)
        res = fit_latent(source, cfg, tmp_path / model_type, calib=_ids(), progress=False)
        fit = fit_factors(_load(source.path), view, cfg, _ids(), progress=False)
        student = build_latent_model(_load(source.path), view, source.config_dict(), fit)
        written = {}
        for f in res.out.glob("*.safetensors"):
            written.update(load_file(f))
        state = {k: v for k, v in student.state_dict().items() if k in written or not k.endswith("lm_head.weight")}
        assert set(written) == set(state)
        for k, v in state.items():
            torch.testing.assert_close(written[k].float(), v.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_layerwise_calibrated_gqa_and_fit_latent_match_in_ram(smollm2_source, smollm2_model, tmp_path):
    """Perplexity of the layer-by-layer calibrated GQA fit and fit-latent within 1e-3 of the in-RAM path."""
    from kvconvert.convert.gqa import build_model, mha_to_gqa
    from kvconvert.convert.gqa_stream import iter_source_tensors
    from kvconvert.convert.latent import fit_latent
    from kvconvert.convert.latent_build import build_latent_model
    from kvconvert.data.calibration import load_text, token_stream

    tok = smollm2_source.load_tokenizer()
    ids = token_stream(tok, load_text("builtin:gpl3"))[:512]
    view = describe(smollm2_source.config_dict())
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 49152, (1, 128), generator=g) for _ in range(2)]
    cfg = GQAConfig(groups=1, method="calibrated", evaluate=False)
    ref, _ = fit_calibrated(smollm2_model, view, cfg, calib, progress=False)
    ref_model = build_model({**smollm2_source.config_dict(), "num_key_value_heads": 1},
                            {**dict(iter_source_tensors(smollm2_source)), **ref})
    ref_ppl = perplexity(ref_model, ids, chunk=256, max_tokens=512)
    del ref_model
    out = mha_to_gqa(smollm2_source, cfg, tmp_path / "g1", calib=calib, progress=False).out
    got_ppl = perplexity_layerwise(resolve_source(out), ids, chunk=256, max_tokens=512, device="cpu")
    assert math.isfinite(got_ppl) and got_ppl == pytest.approx(ref_ppl, rel=1e-3)

    lcfg = LatentConfig(kv_ratio=0.5, evaluate=False, sensitivity_samples=1)
    fit = fit_factors(smollm2_model, view, lcfg, calib, progress=False)
    student = build_latent_model(smollm2_model, view, smollm2_source.config_dict(), fit)
    ref_ppl = perplexity(student, ids, chunk=256, max_tokens=512)
    del student
    out = fit_latent(smollm2_source, lcfg, tmp_path / "lat", calib=calib, progress=False).out
    got_ppl = perplexity_layerwise(resolve_source(out), ids, chunk=256, max_tokens=512, device="cpu")
    assert math.isfinite(got_ppl) and got_ppl == pytest.approx(ref_ppl, rel=1e-3)
