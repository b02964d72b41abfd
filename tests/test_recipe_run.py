"""kvconvert run: resumption (content-hash keys, injected failure), and the report of a real run."""

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
from pydantic import Field

from kvconvert.config import StrictConfig
from kvconvert.recipe import STEPS, StepResult, load_recipe, run_recipe
from kvconvert.recipe.steps import StepSpec

ROOT = Path(__file__).parent.parent


class ScaleConfig(StrictConfig):
    """Test-only model-writing step: copies the model with its lm_head scaled by `factor`."""

    factor: float = Field(1.0, gt=0)


def _scale(cfg: ScaleConfig, ctx) -> StepResult:
    from safetensors.torch import load_file, save_file

    src = ctx.model()
    shutil.copytree(src.path, ctx.out, dirs_exist_ok=True)
    for f in ctx.out.glob("*.safetensors"):
        tensors = load_file(f)
        tensors = {k: (v * cfg.factor if "lm_head" in k or "embed" in k else v) for k, v in tensors.items()}
        save_file(tensors, f, metadata={"format": "pt"})
    return StepResult(artifact=ctx.out)


RECIPE = """
version: 1
model: {model}
name: t
context: 1000
batch: 2
steps:
  - step: eval
    max_tokens: 64
    chunk: 32
  - step: scale
    factor: 1.0
  - step: eval
    max_tokens: 64
    chunk: 32
  - step: eval
    max_tokens: 96
    chunk: 32
"""


@pytest.fixture
def counted(monkeypatch):
    """Registers the test `scale` step and counts the runs of every step folder; `fail` injects a failure."""
    calls, fail = Counter(), set()

    def wrap(spec):
        def run(cfg, ctx):
            calls[ctx.out.name] += 1
            if ctx.out.name in fail:
                raise RuntimeError(f"injected failure in {ctx.out.name}")
            return spec.run(cfg, ctx)
        return StepSpec(spec.name, spec.config, run, spec.reads, spec.writes, spec.plan)

    monkeypatch.setitem(STEPS, "scale", StepSpec("scale", ScaleConfig, _scale, ("model",), "model"))
    for name in ("eval", "scale"):
        monkeypatch.setitem(STEPS, name, wrap(STEPS[name]))
    return calls, fail


def test_resume_after_failure_redoes_only_unfinished_steps(counted, tiny_folder, tmp_path, cli):
    calls, fail = counted
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=tiny_folder("llama", 2)))
    out = tmp_path / "run"
    recipe = load_recipe(path)

    fail.add("03-eval")
    with pytest.raises(RuntimeError, match="injected failure"):
        run_recipe(recipe, out, progress=False, echo=lambda s: None)
    state = json.loads((out / "run-state.json").read_text())["steps"]
    assert [state[k]["status"] for k in sorted(state)] == ["done", "done", "failed"]
    assert "injected failure" in (out / "run.log").read_text()
    assert calls == Counter({"01-eval": 1, "02-scale": 1, "03-eval": 1})

    fail.clear()
    res = run_recipe(recipe, out, progress=False, echo=lambda s: None)
    assert calls == Counter({"01-eval": 1, "02-scale": 1, "03-eval": 2, "04-eval": 1})
    assert [r.get("cached", False) for r in res.records] == [True, True, False, False]

    run_recipe(recipe, out, progress=False, echo=lambda s: None)  # everything finished: nothing runs
    assert sum(calls.values()) == 5

    # a config change re-runs that step; its output changes, so every step reading it re-runs too
    run_recipe(load_recipe(path, ["scale.factor=2.0"]), out, progress=False, echo=lambda s: None)
    assert calls == Counter({"01-eval": 1, "02-scale": 2, "03-eval": 3, "04-eval": 2})
    run_recipe(load_recipe(path, ["scale.factor=2.0", "4.max_tokens=128"]), out, progress=False, echo=lambda s: None)
    assert calls["04-eval"] == 3 and calls["03-eval"] == 3

    code, text, err = cli("run", path, "--out", out, "--force", "-q")
    assert code == 0, err
    assert calls == Counter({"01-eval": 2, "02-scale": 3, "03-eval": 4, "04-eval": 4})
    assert "report.html" in text
    resolved = load_recipe(out / "recipe.resolved.yaml")
    assert resolved == recipe


def _finite_figures(report):
    rows = report["rows"]
    assert rows[0]["stage"] == "source"
    for r in rows:
        for key in ("kv_bytes_per_token", "kv_gib"):
            assert math.isfinite(r[key]) and r[key] > 0
    return rows


def test_report_of_tiny_run(counted, tiny_folder, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=tiny_folder("llama", 2)))
    res = run_recipe(load_recipe(path), tmp_path / "run", progress=False, echo=lambda s: None)
    report = json.loads((res.out / "report.json").read_text())
    rows = _finite_figures(report)
    ppl = [r["perplexity"] for r in rows if "perplexity" in r]
    assert len(ppl) == 3 and all(math.isfinite(p) and p > 1 for p in ppl)
    assert report["rows"][1]["kv_gib"] == pytest.approx(rows[1]["kv_bytes_per_token"] * 1000 * 2 / 2**30)
    md = (res.out / "report.md").read_text()
    assert f"{ppl[0]:.3f}" in md and "pareto.png" in md
    html = (res.out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(report["plots"]) >= 1
    assert "src='pareto.png'" not in html and "http" not in html  # self-contained


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_demo_recipe_reduced(cli, tmp_path):
    """The README's demo recipe with small calibration / evaluation, end to end on the real model."""
    out = tmp_path / "demo"
    code, text, err = cli("run", ROOT / "recipes" / "smollm2-demo.yaml", "--out", out, "-q",
                          "--set", "calib.samples=2", "--set", "calib.seqlen=64", "--set", "eval.max_tokens=128",
                          "--set", "eval.chunk=64", "--set", "heal.steps=2", "--set", "heal.seqlen=64",
                          "--set", "needle.lengths=[512]", "--set", "needle.depths=[0.5]",
                          "--set", "sparse_policy.decode.window=256", "--set", "export_onnx.max_context=600",
                          "--set", "fit_latent.sensitivity_samples=1", "--set", "fit_latent.heal.steps=2",
                          "--set", "fit_latent.heal.seqlen=64")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    rows = _finite_figures(report)
    assert rows[0]["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 2
    ppl = [r["perplexity"] for r in rows if "perplexity" in r]
    assert len(ppl) >= 2 and all(math.isfinite(p) and 1 < p < 10000 for p in ppl)
    by_step = {}
    for r in rows[1:]:
        by_step.setdefault(r["step"], r)
    if "mha_to_gqa" in by_step:
        assert by_step["mha_to_gqa"]["kv_bytes_per_token"] == 2 * 30 * 1 * 64 * 2
    if "export_onnx" in by_step:
        assert math.isfinite(by_step["export_onnx"]["export_diff"])
    if "sparse_policy" in by_step:
        assert 0 < by_step["sparse_policy"]["decode_read"] < 1
    if "needle" in by_step:
        assert 0 <= by_step["needle"]["needle"] <= 1
    if "fit_latent" in by_step:
        assert by_step["fit_latent"]["kv_bytes_per_token"] <= 2 * 30 * 3 * 64 * 2 / 3  # at most 1/3 of the source
    assert report["recommendation"] and report["operating_points"][0]["label"] == "source"
    assert len(report["pareto"]) >= 2
    md = (out / "report.md").read_text()
    for r in rows:
        assert f"{r['kv_bytes_per_token']:,}" in md
    assert all(f"{p:.3f}" in md for p in ppl)
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 1
    assert "report.md" in text


def test_heal_step_distils_towards_the_source(counted, tiny_folder, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"""
version: 1
model: {tiny_folder("llama", 2)}
calib: {{seqlen: 32}}
steps:
  - step: scale
    factor: 1.5
  - step: heal
    steps: 6
    lr: 0.003
    seqlen: 32
    batch: 2
    trainable: all
  - step: eval
    max_tokens: 64
    chunk: 32
""")
    recipe = load_recipe(path)
    assert recipe.steps[1].config.calib.seqlen == 32  # run-wide calib default reached the step
    res = run_recipe(recipe, tmp_path / "run", progress=False, echo=lambda s: None)
    healed = res.out / "02-heal"
    from kvconvert.io import provenance, resolve_source

    record = provenance.read(healed)
    assert [p["pass"] for p in record["passes"]] == ["heal"] and record["passes"][0]["params"]["steps"] == 6
    losses = res.records[1]["metrics"]["losses"]
    assert len(losses) == 6 and all(math.isfinite(x) and x > 0 for x in losses)
    import torch

    before = resolve_source(res.out / "01-scale").load_model().state_dict()
    after = resolve_source(healed).load_model().state_dict()
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    report = json.loads((res.out / "report.json").read_text())
    assert "02-heal/heal-loss.png" in report["plots"]
    assert report["rows"][3]["model"] == "02-heal"


def test_refuses_a_foreign_non_empty_out(cli, tiny_folder, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"version: 1\nmodel: {tiny_folder('llama', 2)}\nsteps:\n  - step: eval\n    max_tokens: 32\n")
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = cli("run", path, "--out", out)
    assert code == 2 and "not a kvconvert run folder" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
