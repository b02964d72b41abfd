"""Needle in a haystack: CLI plumbing on a tiny model, bad input, and the real test on SmolLM2-135M."""

import json

import pytest

from kvconvert.eval.needle import NeedleConfig, build_prompt, format_needle, retrieved, run_needle

PAGE_TOPK = "page_topk:page=32,keep=0.25,dense_below=0"


def test_prompt_has_the_length_and_the_needle_at_its_depth(tiny_tok):
    hay, question = build_prompt(tiny_tok, 400, 0.5, "12345")
    assert len(hay) + len(question) == 400
    text = tiny_tok.decode(hay)
    assert text.count("12345") == 2 and 0.3 < text.index("12345") / len(text) < 0.7
    assert retrieved(" the pass key. 12345.", "12345") and not retrieved(" 123456", "12345")


def test_needle_cli_table_json_and_heatmap(cli, tiny_folder, tmp_path):
    folder = tiny_folder("llama", 2)
    png = tmp_path / "needle.png"
    code, out, err = cli("eval", folder, "--needle", "--policy", PAGE_TOPK, "--policy", "sink_window:sink=4,window=64",
                         "--lengths", "400,480", "--depths", "0.2,0.8", "--plot", png, "--json", "-q")
    assert code == 0, err
    res = json.loads(out)
    assert res["policies"] == ["dense", PAGE_TOPK, "sink_window:sink=4,window=64"]
    assert len(res["scores"]["dense"]) == 2 and len(res["scores"]["dense"][0]) == 2
    assert res["kv_read_fraction"]["dense"] == 1.0
    assert res["kv_read_fraction"][PAGE_TOPK] < 0.45
    assert res["kv_read_fraction"]["sink_window:sink=4,window=64"] < 0.3
    assert png.stat().st_size > 1000
    table = format_needle(res)
    assert "sink_window:sink=4,window=64" in table and "KV read" in table


@pytest.mark.parametrize("argv, message", [
    (["--policy", "page_topk:pag=16"], "pag"),
    (["--policy", "page_topk:page=48+block_sparse_prefill:tile=64"], "page=48"),
    (["--policy", "page_topk:page=16,budget=512,dense_below=512"], "budget"),
    (["--lengths", "4096"], "trained length"),
    (["--depths", "1.5"], "depth"),
])
def test_needle_bad_input_exits_2_naming_the_field(cli, tiny_folder, argv, message):
    code, _, err = cli("eval", tiny_folder("llama", 2), "--needle", "--lengths", "400", *argv)
    assert code == 2 and message in err, err


def test_policy_without_needle_is_refused(cli, tiny_folder):
    code, _, err = cli("eval", tiny_folder("llama", 2), "--policy", "dense")
    assert code == 2 and "--needle" in err


@pytest.mark.smollm2
@pytest.mark.slow
def test_needle_smollm2(smollm2_model, smollm2_source):
    """Dense retrieves; page_topk reading 1/4 of the KV retrieves >= 90% of it; sink_window fails beyond its window."""
    tok = smollm2_source.load_tokenizer()
    cfg = NeedleConfig(lengths=[1024], depths=[0.1, 0.5, 0.9])
    sink = "sink_window:sink=4,window=256"
    res = run_needle(smollm2_model, tok, cfg, ["page_topk:page=32,keep=0.25", sink], progress=False)
    print(format_needle(res))
    dense = res["retrieval"]["dense"]
    assert dense >= 2 / 3
    assert res["retrieval"]["page_topk:page=32,keep=0.25"] >= 0.9 * dense
    assert res["kv_read_fraction"]["page_topk:page=32,keep=0.25"] <= 0.3
    beyond = res["scores"][sink][0][:2]          # needle 600+ tokens before the question
    assert beyond == [0.0, 0.0]
    assert res["scores"][sink][0][2] == 1.0      # inside the window it still retrieves
