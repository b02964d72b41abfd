import json
import subprocess
import sys
import textwrap

import pytest
import torch

from gqa_helpers import expand_kv, logits_of
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
    res = mha_to_gqa(src, GQAConfig(groups=2, evaluate=False), tmp_path / "o", progress=False)
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
