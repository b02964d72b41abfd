"""export_onnx on every registered architecture (GQA and MHA): ONNX Runtime logits == transformers."""

import json

import numpy as np
import onnx
import pytest
import torch
from tiny_models import MHA_ONLY, TINY, tiny_model

from kvconvert.errors import PassFailed, UserError
from kvconvert.export.onnx import OnnxExportConfig, OrtGenerator, export_onnx
from kvconvert.models import gqa_capable_model_types, registered_model_types

MAX_CONTEXT = 48


def _grid():
    cases = [(mt, None) for mt in registered_model_types()]
    for mt in gqa_capable_model_types():
        heads = TINY[mt]["num_attention_heads"]
        if TINY[mt].get("num_key_value_heads", heads) == heads:
            cases.append((mt, heads // 2))
        else:
            cases.append((mt, heads))
    return cases


def _load(folder):
    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


@pytest.mark.parametrize("model_type,kv_heads", _grid())
def test_export_matches_transformers(tiny_folder, tmp_path, model_type, kv_heads):
    src = tiny_folder(model_type, kv_heads)
    result = export_onnx(str(src), OnnxExportConfig(max_context=MAX_CONTEXT), tmp_path / "onnx", progress=False)
    v = result.metrics["validation"]
    assert v["passed"] and v["decode_steps"] >= 1
    assert v["max_abs_diff"] <= 1e-4, v
    recorded = json.loads((result.out / "kvconvert.json").read_text())
    assert recorded["passes"][-1]["metrics"]["onnx"]["validation"]["max_abs_diff"] == v["max_abs_diff"]

    graph = _load(result.out)
    meta = json.loads({p.key: p.value for p in graph.metadata_props}["kvconvert"])
    latent = model_type == "kvconvert_latent"  # full-rank latents of a qwen2 base: see test_export_onnx_latent.py
    op_type = "KVLatentAttention" if latent else "KVAttention"
    nodes = [n for n in graph.graph.node if n.domain == "kvconvert" and n.op_type == op_type]
    assert len(nodes) == meta["num_layers"]
    assert {f.name for f in graph.functions} == {op_type}
    kinds = ("key_latent", "value_latent") if latent else ("key", "value")
    for i, node in enumerate(nodes):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"kvconvert" and attrs["plugin_version"] == b"1"
        assert attrs["num_kv_heads"] == meta["num_kv_heads"] and attrs["layer"] == i
        assert list(node.input[3:5]) == [f"past_{kind}_{i}" for kind in kinds]
    inputs = {i.name: i for i in graph.graph.input}
    outputs = [o.name for o in graph.graph.output]
    assert list(inputs)[:3] == ["input_ids", "position_ids", "cache_length"]
    assert outputs[0] == "logits" and len(outputs) == 1 + 2 * meta["num_layers"]
    dims = [d.dim_value or d.dim_param for d in inputs[f"past_{kinds[0]}_0"].type.tensor_type.shape.dim]
    kv_width = meta["num_kv_heads"] * meta["head_dim"]
    assert dims == (["batch", 1, MAX_CONTEXT, kv_width] if latent else
                    ["batch", meta["num_kv_heads"], MAX_CONTEXT, meta["head_dim"]])
    assert meta["num_kv_heads"] == (kv_heads or TINY[model_type].get("num_key_value_heads")
                                    or meta["num_heads"])


def test_ragged_batch_generation_equals_transformers(tiny_folder, tmp_path):
    """Different prompt lengths in one batch (per-sequence cache_length) generate what transformers does."""
    src = tiny_folder("qwen2", 2)
    out = export_onnx(str(src), OnnxExportConfig(max_context=MAX_CONTEXT, validate=False), tmp_path / "o",
                      progress=False).out
    model = tiny_model("qwen2", 2)
    prompts = [[5, 9, 14, 3, 70], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    got = OrtGenerator(out).generate(prompts, 8, eos_token_id=None)
    for prompt, seq in zip(prompts, got):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        assert seq.tolist() == ref[0].tolist()


def test_sliding_window_layers_beyond_the_window(tiny_folder, tmp_path):
    """gemma2: sliding-window layers + softcapping, validated on a prompt longer than the window (64)."""
    cfg = OnnxExportConfig(max_context=96, validate_prompt_len=80, validate_decode_steps=3)
    result = export_onnx(str(tiny_folder("gemma2", None)), cfg, tmp_path / "g", progress=False)
    assert result.metrics["validation"]["max_abs_diff"] <= 1e-4
    windows = [n for n in _load(result.out).graph.node if n.op_type == "KVAttention"]
    found = {onnx.helper.get_attribute_value(a) for n in windows for a in n.attribute if a.name == "sliding_window"}
    assert found == {0, 64}


def test_last_logits_fp16_and_external_data(tiny_folder, tmp_path):
    src = tiny_folder("llama", 2)
    cfg = OnnxExportConfig(max_context=MAX_CONTEXT, dtype="fp16", logits="last", external_data="always")
    result = export_onnx(str(src), cfg, tmp_path / "h", progress=False)
    assert result.metrics["validation"]["passed"] and result.metrics["external_data"]
    assert (result.out / "model.onnx.data").is_file()
    gen = OrtGenerator(result.out)
    logits, cache = gen.step(np.array([[4, 5, 6]]), np.array([[0, 1, 2]]), np.array([0]), gen.empty_cache(1))
    assert logits.shape == (1, 1, 160) and logits.dtype == np.float16 and cache[0].dtype == np.float16
    assert np.abs(cache[0][:, :, :3]).sum() > 0 and np.abs(cache[0][:, :, 3:]).sum() == 0


@pytest.mark.parametrize("attention,opset,runtime,update", [
    ("kvconvert", 17, "onnxruntime", "GroupQueryAttention"), ("kvconvert", 24, "onnxruntime", "GroupQueryAttention"),
    ("kvconvert", 17, "any", "ScatterElements"), ("kvconvert", 24, "any", "TensorScatter"),
    ("standard", 24, "onnxruntime", "TensorScatter")])
def test_cache_is_updated_in_place(tiny_folder, tmp_path, attention, opset, runtime, update):
    """ONNX Runtime writes present_* into the bound past_* buffer (no copy); same tokens. The update is the dense
    lowering's GroupQueryAttention, the standard-op body's ScatterElements / TensorScatter, or (standard
    attention) the graph's TensorScatter."""
    out = export_onnx(str(tiny_folder("qwen3", 2)), OnnxExportConfig(max_context=MAX_CONTEXT, opset=opset,
                                                                    attention=attention, runtime=runtime),
                      tmp_path / "o24", progress=False).out
    graph = _load(out)
    assert {o.domain: o.version for o in graph.opset_import}[""] == opset
    nodes = [n for f in graph.functions for n in f.node] if attention == "kvconvert" else graph.graph.node
    assert update in {n.op_type for n in nodes}
    gen = OrtGenerator(out)
    assert gen.in_place
    cache = gen.empty_cache(1)
    values = gen.to_ort_values(cache)
    gen.step_in_place(np.array([[7, 8, 9]]), np.array([[0, 1, 2]]), np.array([0]), values)
    assert values[0].data_ptr() == cache[0].ctypes.data
    assert np.abs(cache[0][:, :, :3]).sum() > 0 and np.abs(cache[0][:, :, 3:]).sum() == 0
    prompt = np.array([[5, 6, 7, 8]])
    assert (gen.generate(prompt, 6, eos_token_id=None)
            == OrtGenerator(out, in_place=False).generate(prompt, 6, eos_token_id=None)).all()


@pytest.mark.parametrize("model_type", ["qwen2", "gemma2"])
def test_sink_window_policy_equals_sparse_reference(tiny_folder, tmp_path, model_type):
    """ONNX Runtime with a sink_window policy == kvconvert.sparse on the same selection (gemma2: its
    soft-capped / sliding layers stay dense in both)."""
    policy = "sink_window:sink=2,window=4"
    result = export_onnx(str(tiny_folder(model_type, 2)), OnnxExportConfig(max_context=MAX_CONTEXT, policy=policy),
                         tmp_path / "sw", progress=False)
    assert result.metrics["validation"]["max_abs_diff"] <= 1e-4
    meta = json.loads({p.key: p.value for p in _load(result.out).metadata_props}["kvconvert"])
    assert meta["policy"] == policy and meta["policy_resolved"]["decode"]["kind"] == "sink_window"
    if model_type == "gemma2":
        return
    attrs = meta["attention"]["attributes"]
    assert (attrs["policy_decode"], attrs["policy_decode_sink"], attrs["policy_decode_window"]) == (
        "sink_window", 2, 4)
    gen = OrtGenerator(result.out)
    ids = np.arange(3, 15)[None]
    logits, _ = gen.step(ids, np.arange(12)[None], np.array([0]), gen.empty_cache(1))
    dense = tiny_model(model_type, 2)(torch.from_numpy(ids)).logits.detach().numpy()
    assert np.abs(logits - dense).max() > 1e-2  # the policy really restricts attention


def test_page_topk_policy_equals_sparse_reference(tiny_folder, tmp_path):
    """Decode steps past dense_below read the selected pages only, in ONNX Runtime as in kvconvert.sparse."""
    cfg = OnnxExportConfig(max_context=128, policy="page_topk:page=16,keep=0.25,dense_below=64",
                           validate_decode_steps=2)
    result = export_onnx(str(tiny_folder("qwen3", 2)), cfg, tmp_path / "pt", progress=False)
    v = result.metrics["validation"]
    assert v["prompt_len"] >= 64 and v["max_abs_diff"] <= 1e-4, v
    assert "TopK" in {n.op_type for n in _load(result.out).functions[0].node}
    gen = OrtGenerator(result.out)
    ids = (np.arange(90) * 7 % 150 + 3)[None]
    _, cache = gen.step(ids, np.arange(90)[None], np.array([0]), gen.empty_cache(1))
    step_logits, _ = gen.step(np.array([[5]]), np.array([[90]]), np.array([90]), cache)
    model = tiny_model("qwen3", 2)
    dense = model(torch.from_numpy(np.concatenate([ids, [[5]]], 1))).logits[:, -1].detach().numpy()
    assert np.abs(step_logits[:, -1] - dense).max() > 1e-3  # pages were really skipped


def test_block_sparse_prefill_policy_equals_sparse_reference(tiny_folder, tmp_path):
    """Long prefills read the selected key blocks only, in ONNX Runtime as in kvconvert.sparse."""
    cfg = OnnxExportConfig(max_context=192, validate_decode_steps=1,
                           policy="block_sparse_prefill:tile=64,mass=0.5,dense_below=128")
    result = export_onnx(str(tiny_folder("llama", 2)), cfg, tmp_path / "bs", progress=False)
    v = result.metrics["validation"]
    assert v["prompt_len"] >= 128 and v["max_abs_diff"] <= 1e-4, v
    gen = OrtGenerator(result.out)
    ids = (np.arange(160) * 11 % 150 + 3)[None]
    logits, _ = gen.step(ids, np.arange(160)[None], np.array([0]), gen.empty_cache(1))
    dense = tiny_model("llama", 2)(torch.from_numpy(ids)).logits.detach().numpy()
    assert np.abs(logits - dense).max() > 1e-3  # blocks were really skipped


def test_policy_sizes_must_divide_the_capacity(tiny_folder, tmp_path):
    with pytest.raises(UserError, match="multiple of the block_sparse_prefill tile 64"):
        export_onnx(str(tiny_folder("llama", 2)), OnnxExportConfig(max_context=96, policy="block_sparse_prefill"),
                    tmp_path / "p", progress=False)
    with pytest.raises(UserError, match="multiple of the page_topk page size 16"):
        export_onnx(str(tiny_folder("llama", 2)), OnnxExportConfig(max_context=40, policy="page_topk:page=16"),
                    tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()


def test_wrong_graph_fails_validation_and_writes_nothing(tiny_folder, tmp_path, monkeypatch):
    """A function body with a broken score scale must be caught by the built-in validation."""
    from kvconvert.export.onnx import graph

    real = graph.kv_attention_function

    def broken(*args, **kwargs):
        fn = real(*args, **kwargs)
        for node in fn.node:
            if list(node.output) == ["scores_scaled"]:
                node.input[1] = node.input[0]  # scores * scores instead of scores * scale
            for attr in node.attribute:
                if node.op_type == "GroupQueryAttention" and attr.name == "scale":
                    attr.ref_attr_name, attr.f = "", 1.0  # the fused lowering: scale 1 instead of the node's
        return fn

    monkeypatch.setattr(graph, "kv_attention_function", broken)
    with pytest.raises(PassFailed, match="differ from PyTorch"):
        export_onnx(str(tiny_folder("llama", 2)), OnnxExportConfig(max_context=MAX_CONTEXT), tmp_path / "bad",
                    progress=False)
    assert not (tmp_path / "bad").exists()


def test_generation_capacity_is_checked(tiny_folder, tmp_path):
    out = export_onnx(str(tiny_folder("llama", 2)), OnnxExportConfig(max_context=8, validate_prompt_len=4,
                                                                      validate_decode_steps=2),
                      tmp_path / "c", progress=False).out
    with pytest.raises(ValueError, match="max_context=8"):
        OrtGenerator(out).generate(np.array([[3, 4, 5, 6]]), 5)


def test_cli_export_onnx(tiny_folder, tmp_path, cli):
    src = tiny_folder("mistral", None)
    code, out, err = cli("export", "onnx", src, "--out", tmp_path / "x", "--max-context", "32", "-q")
    assert code == 0, err
    assert "max abs logit diff" in out
    record = json.loads((tmp_path / "x" / "kvconvert.json").read_text())
    assert record["passes"][-1]["pass"] == "export_onnx"
    assert (tmp_path / "x" / "tokenizer.json").is_file()
    code, _, err = cli("export", "onnx", src, "--out", tmp_path / "x", "--no-validate", "-q")
    assert code == 2 and "not empty" in err
    code, out, err = cli("export", "onnx", src, "--out", tmp_path / "x", "--no-validate", "--overwrite", "-q")
    assert code == 0 and "max abs logit diff" not in out
    assert "validation" not in json.loads((tmp_path / "x" / "kvconvert.json").read_text())["passes"][-1][
        "metrics"]["onnx"]


def test_unknown_config_key_and_latent_widths_without_latent_model(tiny_folder, tmp_path):
    with pytest.raises(UserError, match="max_context"):
        OnnxExportConfig.parse({"max_contex": 8})
    src = tiny_folder("llama", 2)
    cfg = json.loads((src / "config.json").read_text())
    latent = tmp_path / "latent"
    latent.mkdir()
    for f in src.iterdir():
        (latent / f.name).write_bytes(f.read_bytes())
    cfg["kvconvert_latent"] = {"kv_widths": [[8, 8]] * 2}
    (latent / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="latent KV widths but model_type is not kvconvert_latent"):
        export_onnx(str(latent), OnnxExportConfig(max_context=8), tmp_path / "l", progress=False)


assert MHA_ONLY  # the grid covers MHA-only architectures through registered_model_types()
