"""Engines and Triton repositories for latent-KV models (kvconvert fit-latent): the KVLatentAttention plugin graph
and the standard-op latent graph both build with TensorRT-RTX (no GPU needed), latent buffers aliased in place;
the Triton config parses with Triton's schema and matches the engine I/O (latent buffers as sequence state)."""

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch

import kvconvert
from kvconvert.convert.latent import LatentConfig, fit_latent
from kvconvert.errors import UserError
from kvconvert.export.onnx import OnnxExportConfig, OrtGenerator, export_onnx

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
HAS_CLIENT = importlib.util.find_spec("tritonclient") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx-cu13 not installed (pip install 'kvconvert[tensorrt]')")
needs_client = pytest.mark.skipif(not HAS_CLIENT, reason="tritonclient[grpc] not installed")
MAX_CONTEXT = 32


def _calib(n=2, length=32, vocab=150):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (1, length), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def latent_onnx(tiny_folder, tmp_path_factory):
    """latent_onnx(model_type, joint, attention) -> fp16 ONNX folder of a fit-latent tiny model (cached)."""
    cache, models = {}, {}

    def make(model_type, joint, attention="kvconvert", **fields):
        if (model_type, joint) not in models:
            out = tmp_path_factory.mktemp(f"lat-{model_type}-{int(joint)}") / "m"
            fit_latent(str(tiny_folder(model_type)), LatentConfig(evaluate=False, kv_ratio=0.5, joint_kv=joint,
                                                                 metric="none"), out, calib=_calib(), progress=False)
            models[(model_type, joint)] = out
        key = (model_type, joint, attention, tuple(sorted(fields.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("onnx") / "o"
            cfg = OnnxExportConfig(**{"max_context": MAX_CONTEXT, "dtype": "fp16", "attention": attention, **fields})
            result = export_onnx(str(models[(model_type, joint)]), cfg, out, progress=False)
            assert result.metrics["validation"]["passed"], result.metrics["validation"]
            cache[key] = out
        return cache[key]

    return make


def _meta(folder):
    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return m, json.loads({p.key: p.value for p in m.metadata_props}["kvconvert"])


def test_standard_latent_graph_has_only_standard_ops(latent_onnx):
    """--attention standard on a latent model: TensorScatter on the latent buffers, K/V rebuilt by MatMul (+
    RMSNormalization for k_norm) + RotaryEmbedding over the filled slots, ONNX Attention; validated in ONNX Runtime."""
    for model_type, joint in (("qwen3", True), ("qwen2", False)):
        folder = latent_onnx(model_type, joint, "standard")
        graph, meta = _meta(folder)
        ops = {n.op_type for n in graph.graph.node}
        assert not any(n.domain == "kvconvert" for n in graph.graph.node) and not graph.functions
        assert {"TensorScatter", "RotaryEmbedding", "Attention", "MatMul"} <= ops
        assert ("RMSNormalization" in ops) == (model_type == "qwen3")
        scatters = [n for n in graph.graph.node if n.op_type == "TensorScatter"]
        assert sorted(n.output[0] for n in scatters) == sorted(b["present"] for b in meta["cache"]["buffers"])
        assert meta["attention"]["mode"] == "standard" and meta["cache"]["kind"] == ("joint_latent" if joint else "latent")


def test_standard_latent_graph_greedy_equals_latent_generate(tiny_folder, tmp_path):
    """fp32 standard-op latent graph, ragged prompts, in-place TensorScatter (IOBinding): the latent model's tokens."""
    src = fit_latent(str(tiny_folder("qwen2")), LatentConfig(evaluate=False, kv_ratio=0.5, metric="none"),
                     tmp_path / "lat", calib=_calib(), progress=False).out
    out = export_onnx(str(src), OnnxExportConfig(max_context=MAX_CONTEXT, attention="standard"), tmp_path / "o",
                      progress=False).out
    gen = OrtGenerator(out)
    assert gen.in_place
    model = kvconvert.load_latent(src)
    prompts = [[5, 9, 14, 3, 70], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    for prompt, seq in zip(prompts, gen.generate(prompts, 10, eos_token_id=None)):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                             pad_token_id=0)
        assert seq.tolist() == ref[0].tolist()
    cache = gen.empty_cache(1)
    values = gen.to_ort_values(cache)
    gen.step_in_place(np.array([[7, 8, 9]]), np.array([[0, 1, 2]]), np.array([0]), values)
    assert np.abs(cache[0][:, :, :3]).sum() > 0 and np.abs(cache[0][:, :, 3:]).sum() == 0


def test_standard_latent_graph_refuses_page_topk(tiny_folder, tmp_path):
    src = fit_latent(str(tiny_folder("qwen2")), LatentConfig(evaluate=False, kv_ratio=0.5, metric="none"),
                     tmp_path / "lat", calib=_calib(), progress=False).out
    with pytest.raises(UserError, match="page_topk"):
        export_onnx(str(src), OnnxExportConfig(max_context=64, attention="standard", policy="page_topk:page=16"),
                    tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def _check_engine(eng, onnx_dir, meta, plugin: bool):
    m, _ = _meta(onnx_dir)
    assert {t["name"] for t in eng["io"]["inputs"]} == {v.name for v in m.graph.input}
    assert {t["name"] for t in eng["io"]["outputs"]} == {v.name for v in m.graph.output}
    assert eng["aliases"] == {b["present"]: b["past"] for b in meta["cache"]["buffers"]}
    shapes = {t["name"]: t["shape"] for t in eng["io"]["inputs"]}
    for b in meta["cache"]["buffers"]:
        assert shapes[b["past"]] == [-1, 1, MAX_CONTEXT, b["width"]]
        assert eng["profiles"][1]["shapes"][b["past"]][2] == [2, 1, MAX_CONTEXT, b["width"]]
    layers = eng["layers"]
    n = meta["num_layers"]
    if plugin:
        assert eng["plugin"]["name"] == "KVLatentAttention" and eng["plugin"]["needs_python"]
        assert sum(v for k, v in layers.items() if k.startswith("PLUGIN")) == n
        assert "ATTENTION_INPUT" not in layers
    else:
        assert eng["plugin"] == {"mode": "none", "needs_python": False}
        assert not any(k.startswith("PLUGIN") for k in layers)
        assert layers["KV_CACHE_UPDATE"] == len(meta["cache"]["buffers"]) and layers["ATTENTION_INPUT"] == n
        assert layers["ROTARY_EMBEDDING"] == 2 * n


@needs_rtx
@pytest.mark.parametrize("attention", ["kvconvert", "standard"])
@pytest.mark.parametrize("model_type,joint", [("qwen3", True), ("qwen2", False)])
def test_rtx_engine_builds_for_latent_graph(latent_onnx, tmp_path, attention, model_type, joint):
    from kvconvert.export.engine import EngineConfig, export_engine

    onnx_dir = latent_onnx(model_type, joint, attention)
    res = export_engine(onnx_dir, EngineConfig(max_batch=2, opt_prefill=8), tmp_path / "eng")
    rec = json.loads((tmp_path / "eng" / "kvconvert.json").read_text())
    assert (tmp_path / "eng" / "model.plan").stat().st_size == res.metrics["engine"]["plan_bytes"] > 1000
    assert rec["engine"]["attention"] == attention
    _check_engine(rec["engine"], onnx_dir, _meta(onnx_dir)[1], plugin=attention == "kvconvert")
    assert (tmp_path / "eng" / "tokenizer.json").is_file() and (tmp_path / "eng" / "config.json").is_file()


@needs_rtx
def test_latent_plugin_receives_the_node_attributes(latent_onnx, tmp_path, monkeypatch):
    from kvconvert.export.engine import EngineConfig, export_engine, plugin

    onnx_dir = latent_onnx("qwen3", True, policy="sink_window:sink=2,window=8")
    seen = []
    decode = plugin.attrs_from_fields
    monkeypatch.setattr(plugin, "attrs_from_fields", lambda fc, spec=plugin.KV: seen.append(decode(fc, spec)) or seen[-1])
    export_engine(onnx_dir, EngineConfig(), tmp_path / "eng")
    meta = _meta(onnx_dir)[1]
    layers = {a["layer"]: a for a in seen if a.get("joint_kv") and a["num_heads"]}
    assert sorted(layers) == list(range(meta["num_layers"]))
    want = meta["attention"]["attributes"]
    for key in plugin.LATENT_INT_FIELDS + plugin.STR_FIELDS:
        assert layers[0][key] == want[key], key
    assert layers[0]["k_norm_eps"] == pytest.approx(want["k_norm_eps"]) and want["k_norm_eps"] > 0
    assert layers[0]["policy_decode"] == "sink_window" and layers[0]["policy_decode_window"] == 8


def test_aot_plugin_refuses_page_topk_latent_graph(latent_onnx, tmp_path):
    from kvconvert.export.engine import EngineConfig, export_engine

    """The fused AOT latent kernel does dense and sink_window only: refused before TensorRT is even imported."""
    onnx_dir = latent_onnx("qwen2", False, policy="page_topk:page=16,dense_below=16", max_context=64)
    with pytest.raises(UserError, match="page_topk"):
        export_engine(onnx_dir, EngineConfig(backend="tensorrt", plugin="aot"), tmp_path / "eng")
    assert not (tmp_path / "eng").exists()


@needs_rtx
@needs_client
@pytest.mark.parametrize("attention", ["kvconvert", "standard"])
def test_latent_engine_triton_repository(latent_onnx, tmp_path, attention):
    """config.pbtxt parses with Triton's ModelConfig; every latent buffer (joint too) is implicit sequence state on one
    buffer with the engine's dtype and dims; the other inputs/outputs are the engine's."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    from kvconvert.export.engine import EngineConfig, export_engine
    from kvconvert.export.triton import TritonRepoConfig, export_triton

    onnx_dir = latent_onnx("qwen3", True, attention)
    export_engine(onnx_dir, EngineConfig(max_batch=2, opt_prefill=8), tmp_path / "eng")
    export_triton(tmp_path / "eng", TritonRepoConfig(name="lat"), tmp_path / "repo")
    cfg = text_format.Parse((tmp_path / "repo" / "lat" / "config.pbtxt").read_text(), pb.ModelConfig())
    eng = json.loads((tmp_path / "eng" / "kvconvert.json").read_text())["engine"]
    dtypes = {"HALF": "TYPE_FP16", "FLOAT": "TYPE_FP32", "INT64": "TYPE_INT64", "BF16": "TYPE_BF16"}
    states = {s.input_name: s for s in cfg.sequence_batching.state}
    inputs = {t.name: t for t in cfg.input}
    for t in eng["io"]["inputs"]:
        if t["name"] in eng["aliases"].values():
            s = states.pop(t["name"])
            assert s.output_name == t["name"].replace("past_", "present_") and s.use_same_buffer_for_input_output
            assert pb.DataType.Name(s.data_type) == dtypes[t["dtype"]] and list(s.dims) == t["shape"][1:]
        else:
            i = inputs.pop(t["name"])
            assert pb.DataType.Name(i.data_type) == dtypes[t["dtype"]] and list(i.dims) == (t["shape"][1:] or [1])
    assert not states and not inputs
    assert [t.name for t in cfg.output] == ["logits"]
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 2


@needs_rtx
@pytest.mark.smollm2
@pytest.mark.slow
def test_rtx_engines_for_fit_latent_smollm2(smollm2_source, tmp_path):
    """The real model after fit-latent (half the KV): both the plugin graph and the standard-op graph build."""
    from kvconvert.export.engine import EngineConfig, export_engine

    tok = smollm2_source.load_tokenizer()
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids[:, :64]
    src = fit_latent(smollm2_source, LatentConfig(evaluate=False, kv_ratio=0.5, metric="none", allocation="uniform"),
                     tmp_path / "lat", calib=[ids], progress=False).out
    for attention in ("kvconvert", "standard"):
        onnx_dir = export_onnx(str(src), OnnxExportConfig(max_context=MAX_CONTEXT, dtype="fp16", validate=False,
                                                          attention=attention), tmp_path / f"onnx-{attention}",
                               progress=False).out
        export_engine(onnx_dir, EngineConfig(max_batch=1, opt_prefill=8, max_prefill=16), tmp_path / f"eng-{attention}")
        eng = json.loads((tmp_path / f"eng-{attention}" / "kvconvert.json").read_text())["engine"]
        meta = _meta(onnx_dir)[1]
        assert meta["num_layers"] == 30 and len(meta["cache"]["buffers"]) == 60
        assert meta["kv_bytes_per_token"] <= 0.55 * 30 * 2 * 3 * 64 * 2
        _check_engine_smollm2(eng, meta, attention)
        assert (tmp_path / f"eng-{attention}" / "model.plan").stat().st_size > 1_000_000


def _check_engine_smollm2(eng, meta, attention):
    assert eng["aliases"] == {b["present"]: b["past"] for b in meta["cache"]["buffers"]}
    if attention == "kvconvert":
        assert sum(v for k, v in eng["layers"].items() if k.startswith("PLUGIN")) == 30
    else:
        assert eng["layers"]["KV_CACHE_UPDATE"] == 60 and eng["layers"]["ATTENTION_INPUT"] == 30
