import json
import shutil

import pytest

from kvconvert.models import registered_model_types


def test_version_and_help(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("kvconvert ")
    code, out, _ = cli("--help")
    assert code == 0 and "examples:" in out and "inspect" in out


def test_bad_usage_is_exit_2(cli):
    code, _, err = cli("inspect")
    assert code == 2 and "error" in err
    code, _, err = cli("no-such-command")
    assert code == 2


@pytest.mark.parametrize("model_type", registered_model_types())
def test_inspect_kv_bytes_equals_formula(cli, tiny_folder, model_type):
    folder = tiny_folder(model_type)
    code, out, err = cli("inspect", folder, "--json", "--dtype", "fp16", "--context", "1000", "--batch", "3")
    assert code == 0, err
    r = json.loads(out)
    v = r["view"]
    assert r["kv_bytes_per_token"] == 2 * v["num_layers"] * v["num_kv_heads"] * v["head_dim"] * 2
    assert r["kv_gib"] == pytest.approx(r["kv_bytes_per_token"] * 1000 * 3 / 2**30)
    assert r["parameters"] > 0
    code, out, _ = cli("inspect", folder)
    assert code == 0 and "What-if" in out


@pytest.mark.parametrize("case", ["missing", "no_config", "unsupported", "corrupt", "pickle"])
def test_bad_input_one_line_exit_2(cli, tiny_folder, tmp_path, case):
    folder = tmp_path / "m"
    if case == "missing":
        folder = tmp_path / "does-not-exist"
    else:
        shutil.copytree(tiny_folder("llama"), folder)
    if case == "no_config":
        (folder / "config.json").unlink()
    if case == "unsupported":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["model_type"] = "mamba"
        (folder / "config.json").write_text(json.dumps(cfg))
    if case == "corrupt":
        (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    if case == "pickle":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    code, out, err = cli("inspect", folder)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("kvconvert: error: ")
    assert "Traceback" not in err


@pytest.mark.smollm2
def test_inspect_smollm2(cli):
    code, out, err = cli("inspect", "builtin:smollm2-135m", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert (r["view"]["num_heads"], r["view"]["num_kv_heads"], r["view"]["head_dim"]) == (9, 3, 64)
    assert r["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 2
    assert 130e6 < r["parameters"] < 140e6
