import json

import pytest
import torch

from gqa_helpers import expand_kv, logits_of, shuffle_kv_heads
from kvconvert.convert.gqa import GQAConfig, mha_to_gqa
from kvconvert.convert.gqa_keys import fit_shared_keys, fold_into_queries
from kvconvert.convert.placement import PlacementConfig, load_reference
from kvconvert.io import provenance, resolve_source
from kvconvert.models import describe, gqa_capable_model_types

IDS = torch.randint(3, 150, (2, 24), generator=torch.Generator().manual_seed(0))
CALIB = [torch.randint(3, 150, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(6)]


def _convert(src, out, groups, **kw):
    cfg = GQAConfig(groups=groups, method="calibrated", evaluate=False, **kw)
    return mha_to_gqa(src, cfg, out, calib=CALIB, progress=False)


@pytest.mark.parametrize("model_type", gqa_capable_model_types())
def test_calibrated_at_current_kv_heads_reproduces_logits(tiny_folder, tmp_path, model_type):
    src = tiny_folder(model_type)
    kv = json.loads((src / "config.json").read_text())["num_key_value_heads"]
    res = _convert(src, tmp_path / "o", kv)
    torch.testing.assert_close(logits_of(res.out, IDS), logits_of(src, IDS), rtol=1e-4, atol=1e-4)
    assert res.metrics["fit"]["key_error"] < 1e-8 and res.metrics["fit"]["value_error"] < 1e-8


@pytest.mark.parametrize("model_type", gqa_capable_model_types())
def test_similarity_grouping_finds_shuffled_duplicate_heads(tiny_folder, tmp_path, model_type):
    """Duplicated KV heads scattered over the MHA model: only a grouping that finds them merges exactly."""
    src = tiny_folder(model_type, 2)
    heads = describe(json.loads((src / "config.json").read_text())).num_heads
    wide = expand_kv(src, tmp_path / "wide", heads)  # heads 0,1 copy KV 0; heads 2,3 copy KV 1
    mixed = shuffle_kv_heads(wide, tmp_path / "mixed", [0, 2, 1, 3])  # now consecutive pairs differ
    ref = logits_of(src, IDS)
    torch.testing.assert_close(logits_of(mixed, IDS), ref, rtol=1e-5, atol=1e-5)
    found = _convert(mixed, tmp_path / "sim", 2, grouping="similarity")
    torch.testing.assert_close(logits_of(found.out, IDS), ref, rtol=1e-4, atol=1e-4)
    naive = _convert(mixed, tmp_path / "cons", 2, grouping="consecutive")
    assert (logits_of(naive.out, IDS) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("model_type", gqa_capable_model_types())
def test_calibrated_beats_mean_to_one_kv_head(tiny_folder, tmp_path, model_type):
    src = tiny_folder(model_type, 2)
    ref = logits_of(src, IDS)
    mean = mha_to_gqa(src, GQAConfig(groups=1, evaluate=False), tmp_path / "mean", progress=False)
    cal = _convert(src, tmp_path / "cal", 1)
    err = {k: (logits_of(r.out, IDS) - ref).pow(2).mean() for k, r in (("mean", mean), ("cal", cal))}
    assert err["cal"] < err["mean"]
    assert provenance.read(cal.out)["passes"][-1]["metrics"]["fit"]["qk_norm_fallback"] == (model_type == "qwen3")


def _rope(x, pos, theta=10000.0):
    """Rotate-half RoPE of x [..., d] at integer positions pos [...]."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    ang = pos[..., None].double() * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin


def test_key_compensation_commutes_with_rope():
    """q'.RoPE-k' == q.RoPE-(c k') for every pair of positions: folding into q_proj is exact under RoPE."""
    torch.manual_seed(0)
    d, n = 16, 12
    kw = torch.randn(3, d, n, dtype=torch.float64)
    k_shared, c, maps, err = fit_shared_keys(kw, torch.rand(3, d // 2, dtype=torch.float64), d)
    q = torch.randn(2, d, n, dtype=torch.float64)
    q_folded = fold_into_queries(q, c[1], maps, d)
    x = torch.randn(5, n, dtype=torch.float64)
    half = d // 2
    kc = torch.complex(x @ k_shared[:half].T, x @ k_shared[half:].T) * c[1]  # c k' per token [5, F]
    k_comp = torch.cat([kc.real, kc.imag], -1)
    pos_q, pos_k = torch.tensor([7, 3, 11, 0, 5]), torch.tensor([1, 9, 4, 2, 6])
    for h in range(2):
        want = (_rope(x @ q[h].T, pos_q) * _rope(k_comp, pos_k)).sum(-1)
        got = (_rope(x @ q_folded[h].T, pos_q) * _rope(x @ k_shared.T, pos_k)).sum(-1)
        torch.testing.assert_close(got, want)
    assert 0 < err < 1


def test_cli_calibrated_with_heal_records_everything(cli, tiny_folder, tmp_path):
    code, out, err = cli("mha-to-gqa", tiny_folder("qwen2"), "--groups", "1", "--method", "calibrated",
                         "--calib-samples", "4", "--calib-seqlen", "64", "--heal-steps", "2", "--heal-seqlen", "32",
                         "--out", tmp_path / "o", "-q", "--json")
    assert code == 0, err
    m = json.loads(out)
    assert m["heal"]["steps"] == 2 and m["fit"]["calibration_tokens"] == 256
    rec = provenance.read(tmp_path / "o")
    params = rec["passes"][-1]["params"]
    assert params["method"] == "calibrated" and params["heal"]["steps"] == 2 and params["calib"]["samples"] == 4
    assert rec["metrics"]["eval"]["kv_bytes_per_token"] * 2 == rec["metrics"]["baseline_eval"]["kv_bytes_per_token"]


def test_partial_rotary_keeps_non_rotary_dims_exact(tmp_path, tiny_tok):
    from tiny_models import save_tiny, tiny_model

    model = tiny_model("phi3", 2, partial_rotary_factor=0.5)
    assert describe(model.config).rope.rotary_dim < describe(model.config).head_dim
    src = save_tiny(model, tmp_path / "src", tiny_tok)
    wide = expand_kv(src, tmp_path / "wide", 4)
    res = _convert(wide, tmp_path / "o", 2)
    torch.testing.assert_close(logits_of(res.out, IDS), logits_of(src, IDS), rtol=1e-4, atol=1e-4)
    one = _convert(src, tmp_path / "one", 1)
    assert 0 < one.metrics["fit"]["key_error"] < 1


def test_offloaded_reference_gives_the_same_fit_and_heal(tiny_folder, tmp_path):
    """The reference spread by accelerate over CPU RAM and disk (tiny max_memory) fits and heals like one in RAM."""
    src = tiny_folder("llama", 2)
    placement = PlacementConfig(device_map="sequential", max_memory={"cpu": "60KB"},
                                offload_folder=str(tmp_path / "offload"))
    with load_reference(resolve_source(src), placement) as ref:
        assert "disk" in ref.hf_device_map.values(), "nothing offloaded to disk: the test would prove nothing"
        assert any(p.device.type == "meta" for p in ref.parameters())
    heal = {"steps": 2, "batch": 1, "seqlen": 32}
    plain = _convert(src, tmp_path / "ram", 1, heal=heal)
    spread = _convert(src, tmp_path / "disk", 1, heal=heal, placement=placement.model_dump())
    torch.testing.assert_close(logits_of(spread.out, IDS), logits_of(plain.out, IDS), rtol=1e-5, atol=1e-5)
    assert spread.metrics["heal"]["last_loss"] == pytest.approx(plain.metrics["heal"]["last_loss"], rel=1e-5)


def test_max_memory_flag_must_be_dev_equals_size(cli, tiny_folder, tmp_path):
    code, _, err = cli("mha-to-gqa", str(tiny_folder("llama", 2)), "--groups", "1", "--method", "calibrated",
                       "--device-map", "auto", "--max-memory", "lots", "--out", str(tmp_path / "o"))
    assert code == 2 and "--max-memory" in err and not (tmp_path / "o").exists()


def test_reference_larger_than_ram_is_refused_with_the_offload_hint(cli, tiny_folder, tmp_path, monkeypatch):
    import kvconvert.resources as resources

    monkeypatch.setattr(resources, "available_ram", lambda: 1000)
    code, _, err = cli("mha-to-gqa", str(tiny_folder("llama", 2)), "--groups", "1", "--method", "calibrated",
                       "--heal-steps", "2", "--out", str(tmp_path / "o"))
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("kvconvert: error:") and "--device-map auto" in line and "fp32 student" in line
    assert not (tmp_path / "o").exists()
    spread = _convert(tiny_folder("llama", 2), tmp_path / "ok", 1, placement={"device_map": "auto"})
    assert spread.metrics["fit"]["calibration_tokens"] > 0
