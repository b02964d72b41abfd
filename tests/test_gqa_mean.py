import json
import subprocess
import sys
import textwrap

import pytest
import torch

from gqa_helpers import expand_kv, logits_of, shuffle_kv_heads
from kvconvert.convert.gqa import GQAConfig, mha_to_gqa
from kvconvert.io import provenance
from kvconvert.models import describe, gqa_capable_model_types

IDS = torch.randint(3, 150, (2, 24), generator=torch.Generator().manual_seed(0))


def _kv(folder):
    return json.loads((folder / "config.json").read_text())["num_key_value_heads"]


@pytest.mark.parametrize("model_type", gqa_capable_model_types())
def test_groups_equal_kv_heads_is_exact(tiny_folder, tmp_path, model_type):
    src = tiny_folder(model_type)
    g = _kv(src)
    res = mha_to_gqa(str(src), GQAConfig(groups=g, evaluate=False), tmp_path / "out", progress=False)
    assert torch.equal(logits_of(res.out, IDS), logits_of(src, IDS))
    assert res.record["passes"][-1]["pass"] == "mha_to_gqa"
    assert provenance.read(res.out)["passes"][-1]["params"]["groups"] == g


@pytest.mark.parametrize("model_type", gqa_capable_model_types())
def test_expanded_heads_merge_back_exactly(tiny_folder, tmp_path, model_type):
    """A model whose KV heads are repeated copies converts back (mean) to the original function."""
    src = tiny_folder(model_type, 2)
    view = describe(json.loads((src / "config.json").read_text()))
    wide = expand_kv(src, tmp_path / "wide", view.num_heads)
    torch.testing.assert_close(logits_of(wide, IDS), logits_of(src, IDS))
    res = mha_to_gqa(wide, GQAConfig(groups=2, max_shard_size="20KB"), tmp_path / "out", progress=False)
    assert _kv(res.out) == 2
    assert (res.out / "model.safetensors.index.json").is_file()  # really sharded
    torch.testing.assert_close(logits_of(res.out, IDS), logits_of(src, IDS), rtol=1e-5, atol=1e-5)
    m = provenance.read(res.out)["metrics"]
    assert m["perplexity_ratio"] == pytest.approx(1.0, rel=1e-4)
    assert m["kv_bytes_per_token"][1] * view.num_heads == m["kv_bytes_per_token"][0] * 2


def test_mean_is_average_of_group(tiny_folder, tmp_path):
    from safetensors.torch import load_file

    src = tiny_folder("llama")  # 4 KV heads, head_dim 16
    cfg = GQAConfig(groups=2, grouping="consecutive", align=False, evaluate=False)
    res = mha_to_gqa(src, cfg, tmp_path / "o", progress=False)
    a, b = load_file(src / "model.safetensors"), load_file(res.out / "model.safetensors")
    name = "model.layers.1.self_attn.v_proj.weight"
    want = a[name].reshape(2, 2, 16, -1).mean(1).reshape(32, -1)
    torch.testing.assert_close(b[name], want)
    assert torch.equal(b["model.layers.1.self_attn.q_proj.weight"], a["model.layers.1.self_attn.q_proj.weight"])


def test_output_loads_in_fresh_transformers_process(tiny_folder, tmp_path):
    outs = []
    for mt in gqa_capable_model_types():
        res = mha_to_gqa(tiny_folder(mt), GQAConfig(groups=1, evaluate=False), tmp_path / mt, progress=False)
        outs.append(str(res.out))
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        for folder in {outs!r}:
            m = AutoModelForCausalLM.from_pretrained(folder)
            assert m.config.num_key_value_heads == 1
            out = m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
            assert out.shape == (1, 7), out.shape
        assert not any(k.startswith("kvconvert") for k in sys.modules)
        print("ok", len({outs!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"ok {len(outs)}"


@pytest.mark.parametrize("case", ["not_divisor", "too_many", "mha_only", "no_calib", "not_empty"])
def test_bad_input_one_line_exit_2_nothing_written(cli, capsys, tiny_folder, tmp_path, case):
    out = tmp_path / "out"
    model, extra = tiny_folder("llama"), []
    groups = {"not_divisor": 3, "too_many": 8}.get(case, 2)
    if case == "mha_only":
        model = tiny_folder("gpt2")
    if case == "no_calib":
        extra = ["--method", "calibrated", "--calib", str(tmp_path / "missing.txt")]
    if case == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    capsys.readouterr()  # drop the fixture's own output
    code, _, err = cli("mha-to-gqa", model, "--groups", groups, "--out", out, "--no-eval", *extra)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("kvconvert: error: ") and "Traceback" not in err
    if case == "not_divisor":
        assert "valid values: 1, 2, 4" in err
    if case == "mha_only":
        assert "num_key_value_heads" in err
    if case == "not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "kvconvert-tmp" in p.name]


def test_cli_mean_prints_summary_and_records_eval(cli, tiny_folder, tmp_path):
    code, out, err = cli("mha-to-gqa", tiny_folder("qwen2"), "--groups", "1", "--out", tmp_path / "o", "-q")
    assert code == 0, err
    assert "2 -> 1 KV heads" in out and "perplexity" in out
    rec = provenance.read(tmp_path / "o")
    assert rec["metrics"]["eval"]["perplexity"] > 0 and rec["metrics"]["baseline_eval"]["perplexity"] > 0
    assert rec["passes"][-1]["params"]["method"] == "mean"


def _permuted_mha(src, tmp_path, view):
    """`src` expanded to MHA by repeating its KV heads, then heads shuffled so copies are not neighbours."""
    wide = expand_kv(src, tmp_path / "wide", view.num_heads)
    kv, r = view.num_kv_heads, view.num_heads // view.num_kv_heads
    order = [i * r + c for c in range(r) for i in range(kv)]  # the r copies of head i land kv apart
    return shuffle_kv_heads(wide, tmp_path / "permuted", order)


@pytest.mark.parametrize("model_type", gqa_capable_model_types())
def test_similarity_grouping_finds_scattered_copies(tiny_folder, tmp_path, model_type):
    """Data-free grouping: scattered identical KV heads are grouped again, the source's function comes back."""
    src = tiny_folder(model_type, 2)
    view = describe(json.loads((src / "config.json").read_text()))
    permuted = _permuted_mha(src, tmp_path, view)
    torch.testing.assert_close(logits_of(permuted, IDS), logits_of(src, IDS), rtol=1e-5, atol=1e-5)
    consecutive = mha_to_gqa(permuted, GQAConfig(groups=2, grouping="consecutive", align=False, evaluate=False),
                             tmp_path / "c", progress=False)
    assert not torch.allclose(logits_of(consecutive.out, IDS), logits_of(src, IDS), atol=1e-3)
    res = mha_to_gqa(permuted, GQAConfig(groups=2, method="mean", grouping="similarity", evaluate=False),
                     tmp_path / "s", progress=False)
    torch.testing.assert_close(logits_of(res.out, IDS), logits_of(src, IDS), rtol=1e-4, atol=1e-4)
    mean = provenance.read(res.out)["metrics"]["mean"]
    assert mean["grouping"] == "similarity" and len(mean["layers"]) == view.num_layers
    for layer in mean["layers"]:  # heads i and i + kv... are copies: each group holds one head's copies
        size = view.num_heads // 2
        groups = [layer["kv_order"][g * size:(g + 1) * size] for g in range(2)]
        assert all(len({j % 2 for j in g}) == 1 for g in groups), layer["kv_order"]


def test_alignment_keeps_function_and_lowers_merge_error(tmp_path):
    """Rotating each head (per RoPE pair for keys, orthogonally for values) before the average changes no
    unmerged head's function and lowers the merge error of heads that are rotated copies."""
    from kvconvert.convert.gqa_layout import LayerAttention
    from kvconvert.convert.gqa_mean import merge_layer
    from tiny_models import tiny_config

    view = describe(tiny_config("llama", 4).to_dict())
    heads, kv, d, hid = view.num_heads, view.num_kv_heads, view.head_dim, view.hidden_size
    g = torch.Generator().manual_seed(0)
    base_k, base_v = torch.randn(d, hid, generator=g), torch.randn(d, hid, generator=g)
    half = view.rope.rotary_dim // 2
    ks, vs = [], []
    for j in range(kv):  # head j: the base head rotated per RoPE pair (keys), orthogonally (values), + noise
        ang = torch.rand(half, generator=g) * 6.28
        rot = torch.zeros(d, d)
        for f in range(half):
            c, s = torch.cos(ang[f]), torch.sin(ang[f])
            rot[f, f], rot[f, f + half], rot[f + half, f], rot[f + half, f + half] = c, -s, s, c
        qv, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        ks.append(rot @ base_k + 0.01 * torch.randn(d, hid, generator=g))
        vs.append(qv @ base_v + 0.01 * torch.randn(d, hid, generator=g))
    w = LayerAttention(torch.randn(heads * d, hid, generator=g), torch.cat(ks), torch.cat(vs),
                       torch.randn(hid, heads * d, generator=g))
    plain, f0 = merge_layer(w, view, 1, "consecutive", align=False)
    aligned, f1 = merge_layer(w, view, 1, "consecutive", align=True)
    assert f1["key_error_aligned"] < 0.01 < 0.5 < f0["key_error"]
    assert f1["value_error_aligned"] < 0.01 < 0.5 < f0["value_error"]
    torch.testing.assert_close(plain.k, w.k.reshape(kv, d, hid).mean(0))
    pair = torch.zeros(d, d, dtype=torch.bool)  # the 2x2 blocks of the RoPE pairs (f, f + half)
    for f in range(half):
        for a in (f, f + half):
            pair[a, f] = pair[a, f + half] = True
    for j in range(kv):  # the map folded into head j's queries: a rotation per RoPE pair, so q.k and RoPE commute
        rk = aligned.q[j * d:(j + 1) * d] @ torch.linalg.pinv(w.q[j * d:(j + 1) * d])
        torch.testing.assert_close(rk @ rk.T, torch.eye(d), atol=1e-4, rtol=1e-4)
        assert rk[~pair].abs().max() < 1e-4
        rv = torch.linalg.pinv(w.o[:, j * d:(j + 1) * d]) @ aligned.o[:, j * d:(j + 1) * d]  # o_j R^T
        torch.testing.assert_close(rv @ rv.T, torch.eye(d), atol=1e-4, rtol=1e-4)


@pytest.mark.smollm2
def test_smollm2_permuted_mha_recovers_perplexity(smollm2_source, tmp_path):
    from transformers import AutoModelForCausalLM

    from kvconvert.data.calibration import load_text, token_stream
    from kvconvert.eval.perplexity import perplexity

    view = describe(smollm2_source.config_dict())
    permuted = _permuted_mha(smollm2_source.path, tmp_path, view)
    res = mha_to_gqa(str(permuted), GQAConfig(groups=3, method="mean", grouping="similarity", evaluate=False),
                     tmp_path / "g3", progress=False)
    ids = token_stream(smollm2_source.load_tokenizer(), load_text("builtin:gpl3"))

    def ppl(folder):
        return perplexity(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), ids,
                          chunk=256, max_tokens=512)

    assert ppl(res.out) == pytest.approx(ppl(smollm2_source.path), rel=1e-3)


def test_closed_form_2x2_rotation_is_the_procrustes_optimum():
    from kvconvert.convert.gqa_mean import rotation_2x2

    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 16, 2, 50, generator=g, dtype=torch.float64)
    ref = torch.randn(16, 2, 50, generator=g, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(ref @ a.transpose(-1, -2))
    sign = torch.linalg.det(u @ vh).sign()
    svd = torch.cat([u[..., :-1], u[..., -1:] * sign[..., None, None]], dim=-1) @ vh
    got = rotation_2x2(a, ref)
    torch.testing.assert_close(got, svd, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.linalg.det(got), torch.ones(4, 16, dtype=torch.float64))
