"""Recipe schema: every shipped recipe validates, round trips, and bad keys are one-line errors."""

from pathlib import Path

import pytest

from kvconvert.errors import UserError
from kvconvert.recipe import STEPS, load_recipe, loads_recipe
from kvconvert.recipe.schema import apply_sets

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))

MINIMAL = """
version: 1
model: builtin:smollm2-135m
kv_dtype: fp16
steps:
  - step: eval
    max_tokens: 64
  - step: eval
    kv_dtype: fp32
"""


def test_recipes_exist():
    assert any(p.name == "smollm2-demo.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates_and_round_trips(path):
    assert path.read_text().startswith("#"), "every recipe starts with a header comment saying what it is for"
    recipe = load_recipe(path)
    assert all(s.step in STEPS for s in recipe.steps)
    again = loads_recipe(recipe.dump())
    assert again == recipe
    assert loads_recipe(again.dump()).to_dict() == recipe.to_dict()


def test_round_trip_and_run_wide_defaults():
    recipe = loads_recipe(MINIMAL)
    assert [s.config.kv_dtype for s in recipe.steps] == ["fp16", "fp32"]  # recipe default, then the step's own
    assert recipe.steps[0].config.max_tokens == 64
    assert loads_recipe(recipe.dump()) == recipe
    assert recipe.folder_names() == ["01-eval", "02-eval"]


@pytest.mark.parametrize("text, expected", [
    (MINIMAL.replace("max_tokens: 64", "max_tokns: 64"), "unknown key 'max_tokns'.*did you mean 'max_tokens'"),
    (MINIMAL.replace("kv_dtype: fp16", "kv_dtpye: fp16"), "unknown key 'kv_dtpye'.*did you mean 'kv_dtype'"),
    (MINIMAL.replace("step: eval\n    max", "step: evall\n    max"), "unknown step 'evall'.*did you mean 'eval'"),
    (MINIMAL.replace("version: 1", "version: 7"), "version 7 is not supported"),
    (MINIMAL.replace("version: 1\n", ""), "add 'version: 1'"),
    (MINIMAL.replace("max_tokens: 64", "max_tokens: many"), r"steps\[1\] \(eval\): max_tokens"),
    ("version: 1\nmodel: x\nsteps: []\n", "non-empty list"),
    ("version: 1\nmodel: x\nmodel: y\nsteps: []\n", "duplicate key 'model'"),
    ("version: 1\nmodel: !!python/object/apply:os.system ['echo pwned']\nsteps: []\n", "not valid YAML"),
    ("- just\n- a list\n", "a recipe is a mapping"),
])
def test_bad_recipe_is_one_line_user_error(text, expected):
    with pytest.raises(UserError, match=expected) as exc:
        loads_recipe(text)
    assert "\n" not in str(exc.value)


def test_set_overrides():
    import yaml

    data = yaml.safe_load(MINIMAL)
    out = apply_sets(data, ["eval.chunk=128", "2.max_tokens=32", "context=4096", "calib.samples=2"])
    assert [s["chunk"] for s in out["steps"]] == [128, 128]
    assert out["steps"][1]["max_tokens"] == 32 and out["context"] == 4096 and out["calib"] == {"samples": 2}
    assert "chunk" not in data["steps"][0], "the raw recipe is not modified"
    for bad, msg in [("evl.chunk=1", "did you mean 'eval'"), ("9.chunk=1", "step 9 does not exist"),
                     ("eval", "KEY=VALUE"), ("eval=3", "name a field")]:
        with pytest.raises(UserError, match=msg):
            apply_sets(data, [bad])


def test_cli_errors_exit_2(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.replace("max_tokens: 64", "max_tokns: 64"))
    code, out, err = cli("run", bad, "--dry-run")
    assert code == 2 and "did you mean 'max_tokens'" in err and err.count("\n") == 1
    code, _, err = cli("run", tmp_path / "missing.yaml")
    assert code == 2 and "recipe not found" in err


def test_dry_run_prints_plan_and_writes_nothing(cli, tiny_folder, tmp_path):
    folder = tiny_folder("llama", 2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(MINIMAL.replace("builtin:smollm2-135m", str(folder)) + "context: 1000\nbatch: 3\n")
    out = tmp_path / "run"
    code, text, err = cli("run", recipe, "--dry-run", "--out", out, "--set", "eval.chunk=32")
    assert code == 0, err
    assert not out.exists()
    import json

    cfg = json.loads((folder / "config.json").read_text())
    bpt = 2 * cfg["num_hidden_layers"] * 2 * (cfg["hidden_size"] // cfg["num_attention_heads"]) * 2
    assert f"{bpt:,}" in text and "01-eval" in text and "02-eval" in text and "chunk=32" in text
