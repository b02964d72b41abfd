"""Every registered step type: an example validates and round trips; a chain of all of them runs on a tiny
model and the report carries each step's figures."""

import importlib.util
import json
import math

import pytest

from kvconvert.errors import UserError
from kvconvert.recipe import STEPS, load_recipe, loads_recipe, run_recipe
from kvconvert.recipe.plan import plan_rows
from kvconvert.models import describe

# the smallest fields each step needs; a step added to the registry must be added here
EXAMPLES = {
    "eval": {"max_tokens": 64, "chunk": 32},
    "heal": {"steps": 2, "seqlen": 32, "batch": 1},
    "use_source": {},
    "mha_to_gqa": {"groups": 1, "evaluate": True, "eval": {"max_tokens": 64, "chunk": 32}},
    "sparse_policy": {"decode": {"kind": "sink_window", "sink": 4, "window": 252},
                      "layers": {1: {"decode": {"kind": "dense"}}}},
    "needle": {"lengths": [400], "depths": [0.5], "max_new_tokens": 4},
    "export_onnx": {"max_context": 300, "validate_prompt_len": 8, "validate_decode_steps": 2},
    "export_engine": {"max_batch": 1, "opt_prefill": 8},
    "export_triton": {"name": "tiny", "max_new_tokens": 8},
    "fit_latent": {"kv_ratio": 0.5, "allocation": "uniform", "metric": "none", "evaluate": True,
                   "eval": {"max_tokens": 64, "chunk": 32}},
}
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None  # engines build without a GPU, if installed
# export_onnx refuses latent checkpoints: the latent fit comes after it
ORDER = ["eval", "mha_to_gqa", "heal", "sparse_policy", "needle", "export_onnx"] + (["export_engine"] if HAS_RTX else []) \
    + ["export_triton", "use_source", "fit_latent", "eval"]


def _recipe_text(model) -> str:
    import yaml

    steps = [{"step": name, **EXAMPLES[name]} for name in ORDER if name in STEPS]
    return yaml.safe_dump({"version": 1, "model": str(model), "context": 4096, "batch": 2,
                           "calib": {"samples": 2, "seqlen": 32}, "steps": steps}, sort_keys=False)


def test_every_registered_step_has_an_example_that_round_trips():
    assert set(STEPS) == set(EXAMPLES) & set(STEPS) and set(STEPS) <= set(EXAMPLES), \
        f"add an example for {sorted(set(STEPS) - set(EXAMPLES))}"
    for name in STEPS:
        text = f"version: 1\nmodel: x\nsteps:\n" + "".join(
            f"  - step: {n}\n" + "".join(f"    {k}: {json.dumps(v)}\n" for k, v in EXAMPLES[n].items())
            for n in _with_prerequisites(name))
        recipe = loads_recipe(text)
        assert loads_recipe(recipe.dump()) == recipe
        with pytest.raises(UserError, match="unknown key 'bogus_key'"):
            loads_recipe(text + "    bogus_key: 1\n")


def _with_prerequisites(name: str) -> list[str]:
    """`name` preceded by steps that make the artifacts it reads (e.g. export_onnx before export_engine)."""
    before = []
    for need in STEPS[name].reads:
        maker = next((n for n, sp in STEPS.items() if sp.writes == need), None)
        if need not in ("model", "source") and maker:
            before += _with_prerequisites(maker)
    return before + [name]


def test_missing_input_artifact_is_named():
    with pytest.raises(UserError, match=r"steps\[1\] \(export_engine\) reads 'onnx'.*add export_onnx before it"):
        loads_recipe("version: 1\nmodel: x\nsteps:\n  - step: export_engine\n")


def test_nested_misspelt_key_names_the_nested_field():
    text = "version: 1\nmodel: x\nsteps:\n  - step: mha_to_gqa\n    groups: 1\n    heal: {stpes: 3}\n"
    with pytest.raises(UserError, match=r"unknown key 'heal.stpes'.*did you mean 'steps'"):
        loads_recipe(text)


def test_plan_predicts_kv_after_gqa(tiny_folder):
    folder = tiny_folder("llama", 2)
    recipe = loads_recipe(_recipe_text(folder))
    view = describe(json.loads((folder / "config.json").read_text()))
    rows = plan_rows(recipe, view)
    gqa = next(r for r in rows if r["step"] == "mha_to_gqa")
    assert gqa["kv_bytes_per_token"] == 2 * view.num_layers * 1 * view.head_dim * 2
    assert rows[0]["kv_bytes_per_token"] == 2 * view.num_layers * 2 * view.head_dim * 2


def test_sparse_policy_layers_are_checked_against_the_model(tiny_folder, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"version: 1\nmodel: {tiny_folder('llama', 2)}\nsteps:\n  - step: sparse_policy\n"
                    "    layers: {7: {decode: {kind: sink_window}}}\n")
    with pytest.raises(UserError, match="has 2 layers"):
        run_recipe(load_recipe(path), tmp_path / "run", progress=False, echo=lambda s: None)


def test_chain_of_every_step_on_a_tiny_model(tiny_folder, tmp_path):
    folder = tiny_folder("llama", 2)
    path = tmp_path / "chain.yaml"
    path.write_text(_recipe_text(folder))
    res = run_recipe(load_recipe(path), tmp_path / "run", progress=False, echo=lambda s: None)
    report = json.loads((res.out / "report.json").read_text())
    rows = {r["step"]: r for r in report["rows"]}
    view = describe(json.loads((folder / "config.json").read_text()))
    if "mha_to_gqa" in STEPS:
        assert rows["mha_to_gqa"]["kv_bytes_per_token"] == 2 * view.num_layers * view.head_dim * 2
        assert math.isfinite(rows["mha_to_gqa"]["perplexity"])
        assert json.loads((res.out / "02-mha_to_gqa" / "config.json").read_text())["num_key_value_heads"] == 1
    if "sparse_policy" in STEPS:  # layer 0 reads sink 4 + window 252 of 4096 tokens, layer 1 (dense) all
        assert rows["sparse_policy"]["decode_read"] == pytest.approx((256 / 4096 + 1) / 2)
    if "needle" in STEPS:
        assert 0 <= rows["needle"]["needle"] <= 1
        assert "05-needle/needle.png" in report["plots"]
    if "export_onnx" in STEPS:
        onnx_row = rows["export_onnx"]
        assert math.isfinite(onnx_row["export_diff"]) and onnx_row["export_diff"] < 1e-3
        import onnx

        meta = {p.key: p.value for p in onnx.load(res.out / onnx_row["stage"] / "model.onnx",
                                                   load_external_data=False).metadata_props}
        resolved = json.loads(meta["kvconvert"])["policy_resolved"]
        assert resolved["decode"]["kind"] == "sink_window", "the export picked up the earlier sparse policy"
    if "export_engine" in STEPS and HAS_RTX:
        plan = res.out / rows["export_engine"]["stage"] / "model.plan"
        assert rows["export_engine"]["engine_bytes"] == plan.stat().st_size > 0
    if "export_triton" in STEPS:
        repo = res.out / rows["export_triton"]["stage"]
        assert (repo / "tiny_generate" / "config.pbtxt").is_file()
        assert (repo / "tiny" / "1" / "model.plan").is_file() == HAS_RTX
    if "fit_latent" in STEPS:
        lat = rows["fit_latent"]
        before = rows["use_source"] if "use_source" in STEPS else rows["mha_to_gqa"]  # use_source: back to the source
        assert lat["kv_bytes_per_token"] == pytest.approx(before["kv_bytes_per_token"] / 2, rel=0.1)
        assert math.isfinite(lat["perplexity"])
        plan = {r["step"]: r for r in plan_rows(load_recipe(path), view)}
        assert plan["fit_latent"]["kv_bytes_per_token"] == lat["kv_bytes_per_token"]
    if "use_source" in STEPS:
        assert rows["use_source"]["kv_bytes_per_token"] == report["rows"][0]["kv_bytes_per_token"]
    last = report["rows"][-1]
    assert last["step"] == "eval" and math.isfinite(last["perplexity"])
    assert len(report["pareto"]) >= 2


def test_plan_agrees_with_inspect_what_if(tiny_folder):
    """--dry-run's expected KV sizes use the same arithmetic as `kvconvert inspect`'s what-if table."""
    from kvconvert.eval.inspect_report import what_if

    folder = tiny_folder("llama", 2)
    view = describe(json.loads((folder / "config.json").read_text()))
    rows = what_if(view, 4096, 2, 2)
    for row in rows:
        if row["kind"] == "gqa":
            step = f"  - step: mha_to_gqa\n    groups: {row['kv_heads']}\n"
        else:
            step = f"  - step: fit_latent\n    rank: {row['rank']}\n"
        recipe = loads_recipe(f"version: 1\nmodel: x\ncontext: 4096\nbatch: 2\nsteps:\n{step}")
        planned = plan_rows(recipe, view)[1]
        assert planned["kv_bytes_per_token"] == row["bytes_per_token"], row["label"]
        assert planned["kv_gib"] == pytest.approx(row["gib"])
