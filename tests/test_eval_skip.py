"""A pass's default evaluation never costs the pass: without a tokenizer (or room) it is skipped in one line."""

import json

import torch

from tiny_models import save_tiny, tiny_model


def test_tokenizerless_checkpoint_converts_with_one_skipped_evaluation_line(tmp_path, cli):
    src = tmp_path / "notok"
    save_tiny(tiny_model("llama"), src)  # weights + config, no tokenizer files
    out = tmp_path / "g2"
    code, stdout, err = cli("mha-to-gqa", src, "--groups", "2", "--out", out, "-q")
    assert code == 0, err
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    skipped = [line for line in (stdout + err).splitlines() if "evaluation skipped" in line]
    assert len(skipped) == 1
    assert f"kvconvert eval {out} --baseline {src}" in skipped[0]
    record = json.loads((out / "kvconvert.json").read_text())
    assert "eval_skipped" in record["metrics"] and "eval" not in record["metrics"]
    assert not list(tmp_path.glob(".g2.kvconvert-tmp-*"))


def test_tokenizer_flag_evaluates_a_tokenizerless_checkpoint(tmp_path, cli, tiny_folder):
    src = tmp_path / "notok"
    save_tiny(tiny_model("llama"), src)
    out = tmp_path / "g2"
    code, stdout, err = cli("mha-to-gqa", src, "--groups", "2", "--out", out, "--tokenizer", tiny_folder("llama"),
                            "--json", "-q")
    assert code == 0, err
    m = json.loads(stdout)
    assert m["eval"]["perplexity"] > 0 and m["baseline_eval"]["perplexity"] > 0 and "eval_skipped" not in m


def test_no_room_skips_the_evaluation_not_the_pass(tmp_path, cli, tiny_folder, monkeypatch):
    import kvconvert.resources as resources

    monkeypatch.setattr(resources, "available_ram", lambda: 1000)
    out = tmp_path / "g2"
    code, stdout, err = cli("mha-to-gqa", tiny_folder("llama"), "--groups", "2", "--out", out, "-q")
    assert code == 0, err
    lines = [line for line in (stdout + err).splitlines() if "evaluation skipped" in line]
    assert len(lines) == 1 and "GiB of RAM" in lines[0]


def test_eval_command_never_writes_into_its_input(tmp_path, cli, tiny_folder):
    out = tmp_path / "g2"
    assert cli("mha-to-gqa", tiny_folder("llama"), "--groups", "2", "--out", out, "--no-eval", "-q")[0] == 0
    before = (out / "kvconvert.json").read_bytes()
    code, stdout, err = cli("eval", out, "--out", tmp_path / "ev", "--json", "-q")
    assert code == 0, err
    assert (out / "kvconvert.json").read_bytes() == before
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["metrics"]["eval"]["perplexity"] == json.loads(stdout)["perplexity"]


def test_library_evaluate_is_pass_shaped(tiny_folder, tmp_path):
    from kvconvert.eval.evaluate import EvalConfig, evaluate

    ids = torch.randint(3, 150, (300,), generator=torch.Generator().manual_seed(0))
    res = evaluate(tiny_folder("qwen2"), EvalConfig(max_tokens=256, chunk=64), tmp_path / "e", calib=[ids],
                   progress=False)
    assert res.out == (tmp_path / "e").resolve() and res.metrics["eval"]["perplexity"] > 1
    assert res.record["passes"][-1]["pass"] == "eval"


def test_needle_states_its_ram_and_refuses_up_front(tiny_folder, tmp_path, cli, monkeypatch):
    import kvconvert.resources as resources

    monkeypatch.setattr(resources, "available_ram", lambda: 1000)
    code, _, err = cli("eval", tiny_folder("llama"), "--needle", "--lengths", "64", "--plot", tmp_path / "n.png")
    assert code == 2 and "GiB of RAM" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "n.png").exists()


def test_evaluated_output_keeps_its_file_listing_so_overwrite_replaces_it(tmp_path, tiny_folder):
    """The evaluation rewrites kvconvert.json after the folder is in place; its `output` listing must survive."""
    from kvconvert.convert.gqa import GQAConfig, mha_to_gqa
    from kvconvert.eval.evaluate import EvalConfig

    out = tmp_path / "g2"
    cfg = GQAConfig(groups=2, eval=EvalConfig(max_tokens=128, chunk=64))
    res = mha_to_gqa(tiny_folder("llama"), cfg, out, progress=False)
    record = json.loads((out / "kvconvert.json").read_text())
    assert "eval" in record["metrics"]
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"kvconvert.json"}
    assert set(record["output"]["files"]) == files and record["output"]["kind"] == "checkpoint"
    assert res.record["output"] == record["output"]
    again = mha_to_gqa(tiny_folder("llama"), cfg, out, overwrite=True, progress=False)
    assert "eval" in again.metrics and (out / "config.json").is_file()
