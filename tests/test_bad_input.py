"""Issue 13: users' files are sacred and every bad input gets exit 2 with one line of advice.

One test per numbered item of the issue, each reproducing it on a tiny Llama checkpoint. For bad input:
exit 2, one `kvconvert: error:` line naming what and what to do, no file outside kvconvert's own outputs
deleted or changed (the whole test folder is listed and hashed before and after), no temporary folder left.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvconvert.errors import UserError

GQA = ("--groups", "2", "--no-eval", "-q")


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` (hidden ones too), '/' for folders."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
    return out


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in Path(folder).rglob("*") if ".kvconvert-tmp-" in p.name or ".kvconvert-old-" in p.name]


def assert_bad_input(code: int, err: str, *words: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvconvert: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def model(tmp_path, tiny_folder, capsys) -> Path:
    """A private copy of the tiny Llama (4 heads, 4 KV heads) that a test may damage."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder("llama"), folder)
    capsys.readouterr()  # transformers' "Writing model shards" bar when the session's tiny model is first saved
    return folder


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KVCONVERT_CACHE", str(tmp_path_factory.getbasetemp() / "kvconvert-cache"))


def edit_tensors(folder: Path, fn) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_header(path: Path, fn) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    new = fn(header)
    text = json.dumps(header if new is None else new).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


K0 = "model.layers.0.self_attn.k_proj.weight"


# 1 ---------------------------------------------------------------------------------------------------------
def test_01_out_dot_empty_and_home_are_refused(cli, model, tmp_path, monkeypatch):
    d = tmp_path / "d"
    d.mkdir()
    (d / "keep").write_text("x")
    before = snapshot(tmp_path)
    monkeypatch.chdir(d)
    assert_bad_input(*cli("mha-to-gqa", model, *GQA, "--out", ".", "--overwrite")[::2], "current folder",
                     "--out")
    assert_bad_input(*cli("mha-to-gqa", model, *GQA, "--out", ".", "--overwrite-foreign")[::2], "current folder")
    code, _, err = cli("mha-to-gqa", model, *GQA, "--out", "", "--overwrite")
    assert code == 2 and err.count("\n") == 1 and "--out" in err and "is empty" in err
    from kvconvert.convert.gqa import GQAConfig, mha_to_gqa

    with pytest.raises(UserError, match="--out is empty"):
        mha_to_gqa(model, GQAConfig(groups=2, evaluate=False), "", overwrite=True, progress=False)
    assert snapshot(tmp_path) == before
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("alias ll='ls -l'\n")
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(tmp_path)
    assert_bad_input(*cli("mha-to-gqa", model, *GQA, "--out", home, "--overwrite-foreign")[::2], "home folder",
                     ".bashrc")
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)

    # the current folder holding only a previous kvconvert checkpoint may be replaced in place
    work = tmp_path / "work"
    code, out, err = cli("mha-to-gqa", model, "--groups", "2", "--no-eval", "--out", work)
    assert code == 0, err
    monkeypatch.chdir(work)
    code, out, err = cli("mha-to-gqa", model, "--groups", "1", "--no-eval", "--out", ".", "--overwrite")
    assert code == 0, err
    assert f"wrote {work.resolve()}:" in out and Path.cwd() == work.resolve()
    assert json.loads((work / "config.json").read_text())["num_key_value_heads"] == 1
    assert not leftovers(tmp_path)


# 2 ---------------------------------------------------------------------------------------------------------
def test_02_missing_weight_is_refused_before_writing(cli, model, tmp_path):
    edit_tensors(model, lambda t: t.pop(K0))
    before = snapshot(tmp_path)
    line = assert_bad_input(*cli("mha-to-gqa", model, *GQA, "--out", tmp_path / "o")[::2], K0, "lacks")
    assert "re-download" in line
    assert snapshot(tmp_path) == before and not (tmp_path / "o").exists() and not leftovers(tmp_path)
    code, _, err = cli("mha-to-gqa", model, "--groups", "2", "--method", "calibrated", "--calib-samples", "2",
                       "--calib-seqlen", "16", "--no-eval", "-q", "--out", tmp_path / "o")
    assert_bad_input(code, err, K0)
    assert snapshot(tmp_path) == before


# 3 ---------------------------------------------------------------------------------------------------------
def test_03_overwrite_never_deletes_foreign_files_without_the_second_flag(cli, model, tmp_path, caplog,
                                                                         monkeypatch):
    u = tmp_path / "u"
    u.mkdir()
    (u / "notes.txt").write_text("p")
    (u / "sub").mkdir()
    (u / "sub" / "data.bin").write_bytes(b"\0\1")
    before = snapshot(tmp_path)
    assert_bad_input(*cli("mha-to-gqa", model, *GQA, "--out", u, "--overwrite")[::2], "notes.txt",
                     "--overwrite-foreign")
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)

    o = tmp_path / "o"
    assert cli("mha-to-gqa", model, *GQA, "--out", o)[0] == 0
    caplog.clear()
    code, _, err = cli("mha-to-gqa", model, *GQA, "--out", o, "--overwrite")  # only kvconvert's files: listed
    said = err + caplog.text  # warnings go to stderr (to pytest's log capture here)
    assert code == 0 and "removing" in said and "model.safetensors" in said and "kvconvert.json" in said
    (o / "README.md").write_text("my notes")
    before = snapshot(tmp_path)
    assert_bad_input(*cli("mha-to-gqa", model, *GQA, "--out", o, "--overwrite")[::2], "README.md")
    assert_bad_input(*cli("mha-to-gqa", model, *GQA, "--out", o)[::2], "not empty", "README.md")
    assert snapshot(tmp_path) == before
    caplog.clear()
    code, _, err = cli("mha-to-gqa", model, *GQA, "--out", o, "--overwrite-foreign")
    said = err + caplog.text
    assert code == 0 and "README.md" in said and "not written by kvconvert" in said
    assert not (o / "README.md").exists() and not leftovers(tmp_path)

    from kvconvert.io import atomic_output_dir

    onnx = tmp_path / "onnx"
    with atomic_output_dir(onnx, kind="onnx") as tmp:  # another kind of kvconvert output
        (tmp / "model.onnx").write_bytes(b"graph")
    before = snapshot(tmp_path)
    assert_bad_input(*cli("mha-to-gqa", model, *GQA, "--out", onnx, "--overwrite")[::2], "onnx output",
                     "not a checkpoint")
    monkeypatch.chdir(onnx)
    assert_bad_input(*cli("mha-to-gqa", model, *GQA, "--out", ".", "--overwrite-foreign")[::2], "current folder",
                     "not a checkpoint")
    assert snapshot(tmp_path) == before


# 4 ---------------------------------------------------------------------------------------------------------
def test_04_nan_and_inf_weights_are_named(cli, model, tmp_path):
    def poison(t):
        t[K0][0, 0] = float("nan")

    edit_tensors(model, poison)
    before = snapshot(tmp_path)
    assert_bad_input(*cli("mha-to-gqa", model, *GQA, "--out", tmp_path / "o")[::2], K0, "NaN", "re-download")
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)

    def inf(t):
        t[K0][0, 0] = 0.0
        t["model.layers.1.mlp.up_proj.weight"][:] = float("inf")

    edit_tensors(model, inf)
    code, out, err = cli("eval", model, "--max-tokens", "64", "--chunk", "32", "-q")
    assert code == 2, (code, out, err)
    line = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert "mlp.up_proj" in line and "Inf" in line and "re-download" in line


# 5 ---------------------------------------------------------------------------------------------------------
def test_05_binary_calibration_text_is_refused(cli, model, tmp_path):
    b = tmp_path / "b.txt"
    b.write_bytes(random.Random(0).randbytes(4096))
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"text\0" * 200)
    before = snapshot(tmp_path)
    for calib in (b, nul):
        code, _, err = cli("mha-to-gqa", model, "--groups", "2", "--method", "calibrated", "--calib", calib,
                           "--calib-samples", "2", "--calib-seqlen", "32", "--no-eval", "-q", "--out", tmp_path / "o")
        line = assert_bad_input(code, err, str(calib))
        assert "not UTF-8 text" in line or "looks binary" in line
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)


# 6 ---------------------------------------------------------------------------------------------------------
def test_06_dry_run_checks_group_counts_like_the_real_run(cli, model, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nmodel: {model}\nsteps:\n  - step: mha_to_gqa\n    groups: 2\n"
                      "    evaluate: false\n")
    before = snapshot(tmp_path)
    dry = assert_bad_input(*cli("run", recipe, "--dry-run", "--set", "1.groups=3", "--out", tmp_path / "run")[::2],
                           "--groups 3 does not divide", "valid values: 1, 2, 4")
    assert snapshot(tmp_path) == before
    code, _, err = cli("run", recipe, "--set", "1.groups=3", "--out", tmp_path / "run", "-q")
    real = assert_bad_input(code, err)
    assert real.split("kvconvert: error: ")[1] in dry
    assert cli("run", recipe, "--dry-run", "--out", tmp_path / "run2")[0] == 0


# 7 ---------------------------------------------------------------------------------------------------------
def test_07_tokenizer_less_checkpoint_skips_the_evaluation(cli, model, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    out = tmp_path / "o"
    code, stdout, stderr = cli("mha-to-gqa", model, "--groups", "2", "--out", out)
    assert code == 0, stderr
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    text = stdout + stderr
    assert any("skip" in line and "kvconvert eval" in line for line in text.splitlines()), text


# 8 ---------------------------------------------------------------------------------------------------------
CUSTOM_CONFIG = '''import pathlib
pathlib.Path(__file__).with_name("REMOTE_CODE_RAN").write_text("ran")
from transformers import LlamaConfig
class TinyConfig(LlamaConfig):
    model_type = "tinycustom"
'''


@pytest.mark.parametrize("case", ["config_not_json", "header_is_list", "wrong_k_shape", "bad_jsonl", "out_under_file",
                                  "remote_code"])
def test_08_exceptions_become_exit_2_with_advice(cli, model, tmp_path, case):
    command, words = ["inspect", model], []
    if case == "config_not_json":
        (model / "config.json").write_text('{"model_type": "llama",')
        words = ["config.json is not valid JSON", "line 1"]
    elif case == "header_is_list":
        edit_header(model / "model.safetensors", lambda h: [1, 2])
        words = ["corrupt safetensors file", "not a JSON object"]
    elif case == "wrong_k_shape":
        edit_tensors(model, lambda t: t.__setitem__(K0, torch.zeros(32, 64)))
        command, words = ["mha-to-gqa", model, *GQA, "--out", tmp_path / "o"], [K0, "[32, 64]", "[64, 64]"]
    elif case == "bad_jsonl":
        data = tmp_path / "calib.jsonl"
        data.write_text('{"text": "fine"}\n{"text": broken}\n')
        command = ["mha-to-gqa", model, "--groups", "2", "--method", "calibrated", "--calib", data, "--no-eval",
                   "-q", "--out", tmp_path / "o"]
        words = [f"{data}:2:", "not valid JSON"]
    elif case == "out_under_file":
        (tmp_path / "file").write_text("mine")
        command, words = ["mha-to-gqa", model, *GQA, "--out", tmp_path / "file" / "x"], ["is a file"]
    elif case == "remote_code":
        edit_config(model, model_type="tinycustom", auto_map={"AutoConfig": "configuration_tiny.TinyConfig",
                                                              "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
        (model / "configuration_tiny.py").write_text(CUSTOM_CONFIG)
        (model / "modeling_tiny.py").write_text(CUSTOM_CONFIG.replace("Config", "ForCausalLM"))
        command, words = ["eval", model, "--max-tokens", "32", "-q"], ["--trust-remote-code", "configuration_tiny.py"]
    before = snapshot(tmp_path)
    assert_bad_input(*cli(*command)[::2], *words)
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)
    assert not (model / "REMOTE_CODE_RAN").exists()


# 9 ---------------------------------------------------------------------------------------------------------
def test_09_unsafe_pickle_is_refused_with_what_to_do(cli, model, tmp_path):
    import argparse

    (model / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "args": argparse.Namespace(lr=1)},
               model / "pytorch_model.bin")
    before = snapshot(tmp_path)
    line = assert_bad_input(*cli("inspect", model, "--allow-pickle")[::2], "cannot be loaded safely",
                            "argparse.Namespace", "safetensors")
    assert "two options" not in line and "\x1b" not in line
    assert snapshot(tmp_path) == before


# 10 --------------------------------------------------------------------------------------------------------
def test_10_unknown_dtype_is_named_as_such(cli, model, tmp_path):
    def f99(h):
        h[K0]["dtype"] = "F99"

    edit_header(model / "model.safetensors", f99)
    assert_bad_input(*cli("inspect", model)[::2], "unknown dtype 'F99'", K0)


# 11 --------------------------------------------------------------------------------------------------------
KILLED = """
import os, signal, sys
from kvconvert.io import atomic_output_dir
with atomic_output_dir(sys.argv[1]) as tmp:
    (tmp / "model.safetensors").write_bytes(b"partial")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_11_leftovers_of_a_killed_run_are_removed_or_named(cli, model, tmp_path, monkeypatch, caplog):
    target = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILLED, str(target)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    (stale,) = tmp_path.glob(".o.kvconvert-tmp-*")
    dead_pid = int(stale.name.split("-tmp-")[1].split("-")[0])
    old = tmp_path / f".o.kvconvert-old-{dead_pid}-abc123"
    old.mkdir()
    (old / "partly-removed.bin").write_bytes(b"x")
    live = tmp_path / f".o.kvconvert-tmp-{os.getppid()}-live12"
    live.mkdir()
    code, _, err = cli("mha-to-gqa", model, *GQA, "--out", target)
    assert code == 0, err
    err += caplog.text  # warnings go to stderr (to pytest's log capture here)
    assert not stale.exists() and not old.exists()
    assert str(stale) in err and str(old) in err and "interrupted" in err
    assert live.exists() and str(live) in err and "still running" in err
    live.rmdir()

    from kvconvert.io import output_dir

    def busy(src, dst):  # a mount point cannot be renamed away
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(output_dir, "_rename_dir", busy)
    code, _, err = cli("mha-to-gqa", model, "--groups", "1", "--no-eval", "-q", "--out", target, "--overwrite")
    assert code == 0, err
    assert json.loads((target / "config.json").read_text())["num_key_value_heads"] == 1
    assert not leftovers(tmp_path)


# 12 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_12_output_folder_mode_follows_the_umask(cli, model, tmp_path, umask):
    old = os.umask(umask)
    try:
        assert cli("mha-to-gqa", model, *GQA, "--out", tmp_path / "o")[0] == 0
    finally:
        os.umask(old)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o777 & ~umask


# 13 --------------------------------------------------------------------------------------------------------
def test_13_recipe_name_cannot_leave_runs(cli, model, tmp_path, monkeypatch):
    from kvconvert.recipe import loads_recipe

    body = f"version: 1\nmodel: {model}\n{{name}}steps:\n  - step: eval\n    max_tokens: 32\n"
    for name in ("../../x", "/tmp/abs", "..", "a/b"):
        with pytest.raises(UserError, match="plain folder name"):
            loads_recipe(body.format(name=f"name: '{name}'\n"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(body.format(name=""))
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path.parent)
    assert_bad_input(*cli("run", recipe, "--set", "name=../..", "-q")[::2], "plain folder name")
    assert_bad_input(*cli("run", recipe, "--set", f"name={tmp_path / 'abs'}", "--dry-run")[::2], "plain folder name")
    assert snapshot(tmp_path.parent) == before


# 14 --------------------------------------------------------------------------------------------------------
def test_14_auto_map_modules_travel_with_the_output(cli, model, tmp_path):
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_tiny.TinyTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model / "tokenization_tiny.py").write_text("raise RuntimeError('never run by a conversion')\n")
    out = tmp_path / "o"
    code, _, err = cli("mha-to-gqa", model, *GQA, "--trust-remote-code", "--out", out)
    assert code == 0, err
    assert (out / "tokenization_tiny.py").read_bytes() == (model / "tokenization_tiny.py").read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["auto_map"] == cfg["auto_map"]


# 15 --------------------------------------------------------------------------------------------------------
def test_15_misspelt_key_is_named_and_errors_start_their_own_line(cli, model, tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"verison: 1\nmodel: {model}\nsteps:\n  - step: eval\n")
    assert_bad_input(*cli("run", recipe, "--dry-run")[::2], "unknown key 'verison'", "did you mean 'version'")

    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # progress bars on (an earlier -q sets it)
    edit_tensors(model, lambda t: t["model.layers.1.self_attn.v_proj.weight"].fill_(float("nan")))
    code, _, err = cli("mha-to-gqa", model, "--groups", "2", "--no-eval", "--out", tmp_path / "o")
    assert code == 2
    (line,) = [ln for ln in err.split("\n") if "kvconvert: error:" in ln]
    last = line.split("\r")[-1]
    assert last.startswith("kvconvert: error: ") and "v_proj" in last
    assert terminal_view(line).rstrip() == last.rstrip(), repr(line)  # the bar was cleared, not glued on


def terminal_view(line: str) -> str:
    """What a terminal shows for one line with carriage returns: each segment overwrites from column 0."""
    shown = ""
    for segment in line.split("\r"):
        shown = segment + shown[len(segment):]
    return shown
