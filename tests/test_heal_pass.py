"""`kvconvert heal` / `heal_model`: healing as its own pass after any conversion."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from kvconvert.convert.heal import kd_loss
from kvconvert.convert.heal_pass import HealPassConfig, heal_model
from kvconvert.io import provenance
from tiny_models import save_tiny, tiny_model

IDS = torch.randint(3, 150, (4, 32), generator=torch.Generator().manual_seed(7))


def _data(n=24, s=32):
    return [torch.randint(3, 150, (1, s), generator=torch.Generator().manual_seed(i)) for i in range(n)]


@pytest.fixture(scope="module")
def pair(tiny_mqa_pair):
    return tiny_mqa_pair


@torch.no_grad()
def _kl(folder, teacher):
    from transformers import AutoModelForCausalLM

    s = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    t = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    return float(kd_loss(s(IDS).logits, t(IDS).logits))


def test_heal_model_loss_falls_and_output_reloads_stock(pair, tmp_path):
    teacher, student = pair
    cfg = HealPassConfig(teacher=str(teacher), steps=16, lr=3e-3, batch=2, seqlen=32, hidden_weight=0.5,
                         evaluate=False)
    res = heal_model(student, cfg, tmp_path / "healed", calib=_data(), progress=False)
    losses = res.metrics["losses"]
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    assert _kl(res.out, teacher) < 0.8 * _kl(student, teacher)
    rec = provenance.read(res.out)
    assert [p["pass"] for p in rec["passes"]] == ["mha_to_gqa", "heal"]
    assert rec["passes"][-1]["params"]["teacher"]["spec"] == str(teacher)
    assert rec["metrics"]["heal"]["steps"] == 16
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(res.out)!r})
        assert m.config.num_key_value_heads == 1
        print(float(m(torch.tensor({IDS[:1].tolist()!r})).logits.sum()))
        assert not any(k.startswith("kvconvert") for k in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        mine = AutoModelForCausalLM.from_pretrained(res.out, dtype=torch.float32)(IDS[:1]).logits.sum()
    assert float(proc.stdout.strip()) == pytest.approx(float(mine), rel=1e-5)


def test_minutes_budget_stops(pair, tmp_path):
    teacher, student = pair
    cfg = HealPassConfig(teacher=str(teacher), minutes=0.02, batch=1, seqlen=32, evaluate=False)
    res = heal_model(student, cfg, tmp_path / "h", calib=_data(4), progress=False)
    assert res.metrics["heal"]["steps"] >= 1 and res.metrics["heal"]["seconds"] < 30


@pytest.mark.parametrize("case", ["missing_teacher", "not_a_model", "vocab", "zero_steps", "self", "resume"])
def test_cli_refuses_bad_input_one_line(cli, capsys, pair, tmp_path, tiny_tok, case):
    teacher, student = pair
    extra = ["--steps", "2"]
    if case == "missing_teacher":
        teacher = tmp_path / "nope"
    if case == "not_a_model":
        teacher = tmp_path / "empty"
        teacher.mkdir()
    if case == "vocab":
        teacher = tmp_path / "other"
        save_tiny(tiny_model("llama", vocab_size=200), teacher, tiny_tok)
    if case == "zero_steps":
        extra = ["--steps", "0"]
    if case == "self":
        teacher = student
    if case == "resume":
        extra += ["--resume"]
    capsys.readouterr()
    code, _, err = cli("heal", student, "--teacher", teacher, "--out", tmp_path / "out", "--no-eval", *extra)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("kvconvert: error: ") and "Traceback" not in err
    assert {"missing_teacher": "teacher", "not_a_model": "teacher", "vocab": "vocabulary",
            "zero_steps": "--steps", "self": "itself", "resume": "no saved heal state"}[case] in err
    assert not (tmp_path / "out").exists()


def test_cli_heals_and_prints_summary(cli, pair, tmp_path):
    teacher, student = pair
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 37} and more text {i}" for i in range(400)))
    code, out, err = cli("heal", student, "--teacher", teacher, "--out", tmp_path / "o", "--steps", "2",
                         "--seqlen", "32", "--batch", "1", "--calib", text, "--eval-text", text, "-q",
                         "--save-every", "1")
    assert code == 0, err
    assert "2 steps" in out and "perplexity" in out
    assert not (tmp_path / "o.heal-state").exists()  # the saved state goes once the output is written
    rec = json.loads((tmp_path / "o" / "kvconvert.json").read_text())
    assert rec["metrics"]["perplexity_ratio"] > 0


def test_heals_a_latent_student(tiny_folder, tmp_path):
    """Usable after any conversion: a fit-latent folder heals into a latent folder that loads again."""
    from kvconvert.convert.latent import LatentConfig, fit_latent
    from kvconvert.io import resolve_source

    src = tiny_folder("llama", 2)
    lat = fit_latent(src, LatentConfig(kv_ratio=0.5, allocation="uniform", metric="none", evaluate=False),
                     tmp_path / "lat", calib=_data(6), progress=False).out
    res = heal_model(lat, HealPassConfig(teacher=str(src), steps=4, lr=3e-3, batch=2, seqlen=32, evaluate=False),
                     tmp_path / "healed", calib=_data(6), progress=False)
    healed = resolve_source(res.out).load_model()
    assert healed.config.model_type == "kvconvert_latent"
    with torch.no_grad():
        before, after = resolve_source(lat).load_model()(IDS).logits, healed(IDS).logits
    assert not torch.allclose(before, after)
    assert [p["pass"] for p in provenance.read(res.out)["passes"]] == ["fit_latent", "heal"]
