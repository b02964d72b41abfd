"""export_onnx on latent-KV models (kvconvert fit-latent): the graph caches the latents, ONNX Runtime logits and
greedy tokens == the latent PyTorch model, the buffers' bytes per token == what `describe`/`inspect` report."""

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch

import kvconvert
from kvconvert.convert.latent import LatentConfig, fit_latent
from kvconvert.errors import PassFailed, UserError
from kvconvert.export.onnx import OnnxExportConfig, OrtGenerator, export_onnx
from kvconvert.models import describe

MAX_CONTEXT = 48


@pytest.fixture(scope="module")
def latent_folder(tiny_folder, tmp_path_factory):
    """latent_folder(model_type, joint, kv_ratio) -> a fit-latent folder of the tiny model (cached)."""
    cache = {}

    def make(model_type, joint=False, kv_ratio=0.5):
        key = (model_type, joint, kv_ratio)
        if key not in cache:
            g = torch.Generator().manual_seed(0)
            calib = [torch.randint(3, 150, (1, 48), generator=g) for _ in range(3)]
            out = tmp_path_factory.mktemp(f"latent-{model_type}-{int(joint)}") / "lat"
            cfg = LatentConfig(evaluate=False, kv_ratio=kv_ratio, joint_kv=joint)
            cache[key] = fit_latent(str(tiny_folder(model_type)), cfg, out, calib=calib, progress=False).out
        return cache[key]

    return make


def _graph(folder):
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return model, json.loads({p.key: p.value for p in model.metadata_props}["kvconvert"])


def _dims(value_info):
    return [d.dim_value or d.dim_param for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("model_type,joint,kv_ratio,opset", [
    ("qwen2", False, 0.5, 17),   # K/V biases kept outside the factors, per-layer ranks from the budget
    ("qwen3", True, 0.5, 24),    # QK-norm (k_norm inside the op), one joint latent, TensorScatter
    ("gemma2", False, 0.5, 17),  # sliding-window layers and attention soft-capping
    ("llama", False, 1.0, 17),   # full rank
    ("phi3", True, 0.5, 17),     # fused qkv_proj base, joint latent
    ("gemma", False, 0.5, 24),   # scaled embeddings, gelu MLP
])
def test_latent_export_matches_latent_model(latent_folder, tmp_path, model_type, joint, kv_ratio, opset):
    src = latent_folder(model_type, joint, kv_ratio)
    config = json.loads((src / "config.json").read_text())
    result = export_onnx(str(src), OnnxExportConfig(max_context=MAX_CONTEXT, opset=opset), tmp_path / "o",
                         progress=False)
    v = result.metrics["validation"]
    assert v["passed"] and v["decode_steps"] >= 1 and v["greedy_tokens_agree"]
    assert v["max_abs_diff"] <= 1e-4, v

    graph, meta = _graph(result.out)
    view = describe(config)
    widths = [tuple(w) for w in config["kvconvert_latent"]["kv_widths"]]
    nodes = [n for n in graph.graph.node if n.domain == "kvconvert"]
    assert [n.op_type for n in nodes] == ["KVLatentAttention"] * view.num_layers
    assert {f.name for f in graph.functions} == {"KVLatentAttention"}
    assert meta["attention"]["op_type"] == "KVLatentAttention"
    assert meta["cache"]["kind"] == ("joint_latent" if joint else "latent")
    inputs = {i.name: i for i in graph.graph.input}
    assert list(inputs)[:3] == ["input_ids", "position_ids", "cache_length"]
    assert not any(name.startswith(("past_key_", "past_value_")) and "latent" not in name for name in inputs)
    for i, node in enumerate(nodes):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"kvconvert" and attrs["joint_kv"] == int(joint) and attrs["layer"] == i
        assert (attrs["k_norm_eps"] > 0) == (model_type == "qwen3")
        k, v_width = widths[i]
        if joint:
            assert v_width == 0 and node.input[2] == f"past_kv_latent_{i}"
            assert _dims(inputs[f"past_kv_latent_{i}"]) == ["batch", 1, MAX_CONTEXT, k]
        else:
            assert list(node.input[3:5]) == [f"past_key_latent_{i}", f"past_value_latent_{i}"]
            assert _dims(inputs[f"past_key_latent_{i}"]) == ["batch", 1, MAX_CONTEXT, k]
            assert _dims(inputs[f"past_value_latent_{i}"]) == ["batch", 1, MAX_CONTEXT, v_width]
    if kv_ratio < 1:
        assert sum(k + v for k, v in widths) < view.num_layers * 2 * view.kv_width
    # the exported buffers hold exactly the latent bytes per token that describe()/inspect report
    per_token = sum(int(np.prod(_dims(inputs[n])[1:])) // MAX_CONTEXT * 4 for n in meta["inputs"][3:])
    assert per_token == view.kv_bytes_per_token("fp32") == meta["kv_bytes_per_token"]


def test_bytes_per_token_equal_inspect(latent_folder, tiny_folder, tmp_path, cli):
    src = latent_folder("qwen2")
    out = export_onnx(str(src), OnnxExportConfig(max_context=MAX_CONTEXT, validate=False, dtype="fp16"),
                      tmp_path / "h", progress=False).out
    gen = OrtGenerator(out)
    cache = gen.empty_cache(1)
    allocated = sum(c.nbytes for c in cache) // MAX_CONTEXT
    code, text, _ = cli("inspect", src, "--json", "--dtype", "fp16")
    assert code == 0
    assert allocated == json.loads(text)["kv_bytes_per_token"] == _graph(out)[1]["kv_bytes_per_token"]
    full = describe(json.loads((tiny_folder("qwen2") / "config.json").read_text()))
    assert allocated < 0.6 * full.kv_bytes_per_token("fp16")


@pytest.mark.parametrize("model_type,joint,opset", [("qwen2", False, 17), ("qwen3", True, 24)])
def test_ort_greedy_equals_latent_generate(latent_folder, tmp_path, model_type, joint, opset):
    """Ragged prompts in one batch; the latent buffers are updated in place (IOBinding) at either opset."""
    src = latent_folder(model_type, joint)
    out = export_onnx(str(src), OnnxExportConfig(max_context=MAX_CONTEXT, validate=False, opset=opset),
                      tmp_path / "g", progress=False).out
    gen = OrtGenerator(out)
    assert gen.in_place
    model = kvconvert.load_latent(src)
    prompts = [[5, 9, 14, 3, 70], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    got = gen.generate(prompts, 12, eos_token_id=None)
    for prompt, seq in zip(prompts, got):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             pad_token_id=0)
        assert seq.tolist() == ref[0].tolist()
    cache = gen.empty_cache(1)
    values = gen.to_ort_values(cache)
    gen.step_in_place(np.array([[7, 8, 9]]), np.array([[0, 1, 2]]), np.array([0]), values)
    assert values[0].data_ptr() == cache[0].ctypes.data
    assert np.abs(cache[0][:, :, :3]).sum() > 0 and np.abs(cache[0][:, :, 3:]).sum() == 0


def _policy_export(src, out, policy, min_prompt, **cfg) -> OrtGenerator:
    """Export `src` under `policy`; the built-in validation against the sparse PyTorch model must pass on a prompt
    long enough for the policy to act."""
    result = export_onnx(str(src), OnnxExportConfig(policy=policy, **cfg), out, progress=False)
    v = result.metrics["validation"]
    assert v["prompt_len"] >= min_prompt and v["max_abs_diff"] <= 1e-4, v
    return OrtGenerator(result.out)


def test_sink_window_policy_on_latent_equals_sparse_reference(latent_folder, tmp_path):
    src = latent_folder("qwen2")
    gen = _policy_export(src, tmp_path / "sw", "sink_window:sink=2,window=4", 10, max_context=MAX_CONTEXT)
    ids = np.arange(3, 15)[None]
    logits, _ = gen.step(ids, np.arange(12)[None], np.array([0]), gen.empty_cache(1))
    dense = kvconvert.load_latent(src)(torch.from_numpy(ids)).logits.detach().numpy()
    assert np.abs(logits - dense).max() > 1e-2  # the policy really restricts attention


def test_page_topk_policy_on_latent_equals_sparse_reference(latent_folder, tmp_path):
    src = latent_folder("qwen3", True)
    gen = _policy_export(src, tmp_path / "pt", "page_topk:page=16,keep=0.25,dense_below=64", 64, max_context=128,
                         validate_decode_steps=2)
    ids = (np.arange(90) * 7 % 150 + 3)[None]
    _, cache = gen.step(ids, np.arange(90)[None], np.array([0]), gen.empty_cache(1))
    step_logits, _ = gen.step(np.array([[5]]), np.array([[90]]), np.array([90]), cache)
    dense = kvconvert.load_latent(src)(torch.from_numpy(np.concatenate([ids, [[5]]], 1))).logits[:, -1]
    assert np.abs(step_logits[:, -1] - dense.detach().numpy()).max() > 1e-3  # pages were really skipped


def test_block_sparse_prefill_policy_on_latent_equals_sparse_reference(latent_folder, tmp_path):
    src = latent_folder("qwen2")
    gen = _policy_export(src, tmp_path / "bs", "block_sparse_prefill:tile=64,density=0.5,dense_below=128", 192,
                         max_context=256, validate_decode_steps=1)
    ids = (np.arange(200) * 11 % 150 + 3)[None]
    logits, _ = gen.step(ids, np.arange(200)[None], np.array([0]), gen.empty_cache(1))
    dense = kvconvert.load_latent(src)(torch.from_numpy(ids)).logits.detach().numpy()
    assert np.abs(logits - dense).max() > 1e-3  # key blocks were really skipped


def test_fp16_latent_export_validates(latent_folder, tmp_path):
    result = export_onnx(str(latent_folder("qwen2")), OnnxExportConfig(max_context=MAX_CONTEXT, dtype="fp16"),
                         tmp_path / "h", progress=False)
    v = result.metrics["validation"]
    assert v["passed"] and v["scaled_max_abs_diff"] <= 5e-2, v


def test_wrong_latent_body_fails_validation(latent_folder, tmp_path, monkeypatch):
    """Keys left unrotated (RoPE skipped) must be caught by the built-in validation; nothing is written."""
    from kvconvert.export.onnx import latent_function_body

    real = latent_function_body._rope

    def no_key_rope(x, cos, sin, out, p):
        return real(x, cos, sin, out, p) if p != "rk_" else [onnx.helper.make_node("Identity", [x], [out])]

    monkeypatch.setattr(latent_function_body, "_rope", no_key_rope)
    with pytest.raises(PassFailed, match="differ from PyTorch"):
        export_onnx(str(latent_folder("qwen2")), OnnxExportConfig(max_context=MAX_CONTEXT), tmp_path / "bad",
                    progress=False)
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def latent_onnx(latent_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("latent-onnx") / "o"
    return export_onnx(str(latent_folder("qwen2")), OnnxExportConfig(max_context=32, validate=False), out,
                       progress=False).out


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt-rtx-cu13 not installed")
def test_cli_builds_engine_from_latent_graph(latent_onnx, tmp_path, cli):
    """The KVLatentAttention plugin binds every latent node (tests/test_export_engine_latent.py checks the plan)."""
    code, _, err = cli("export", "engine", latent_onnx, "--out", tmp_path / "eng")
    assert code == 0, err
    eng = json.loads((tmp_path / "eng" / "kvconvert.json").read_text())["engine"]
    assert eng["plugin"]["name"] == "KVLatentAttention" and eng["aliases"]["present_key_latent_0"] == "past_key_latent_0"


def test_triton_repository_from_latent_onnx_runs_onnxruntime(latent_onnx, tmp_path):
    """The generate model of an ONNX-source repository feeds the latent buffers by their graph names."""
    from kvconvert.export.triton import TritonRepoConfig, export_triton

    export_triton(latent_onnx, TritonRepoConfig(name="lat"), tmp_path / "repo")
    version = tmp_path / "repo" / "lat_generate" / "1"
    assert (version / "model.onnx").is_file() and not (tmp_path / "repo" / "lat").exists()
    text = (tmp_path / "repo" / "lat_generate" / "config.pbtxt").read_text()
    assert "onnxruntime" in text


def test_standard_attention_on_latent_model_keeps_the_latent_cache(latent_folder, tmp_path, cli):
    """--attention standard on a latent model: standard ops rebuild K/V from the latent buffers (latent_standard.py);
    the cache stays the latents and the export validates against the latent PyTorch model."""
    code, _, err = cli("export", "onnx", str(latent_folder("qwen2")), "--attention", "standard", "--out",
                       tmp_path / "o", "--max-context", MAX_CONTEXT)
    assert code == 0, err
    graph, meta = _graph(tmp_path / "o")
    assert meta["cache"]["kind"] == "latent" and not graph.functions
    assert all(name.startswith("past_") and "latent" in name for name in meta["inputs"][3:])
