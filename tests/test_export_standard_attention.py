"""`--attention standard`: attention as ONNX TensorScatter + Attention ops, validated in ONNX Runtime, built into a
TensorRT-RTX engine without any plugin (in-place KV-cache-update layers)."""

import importlib.util
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from test_export_onnx_op import SINK_WINDOW, single_node_model
from tiny_models import TINY

from kvconvert.errors import PassFailed, UserError
from kvconvert.export.onnx import OnnxExportConfig, OrtGenerator, export_onnx
from kvconvert.export.onnx.attention_op import DOMAIN, kv_attention_reference, node_attributes
from kvconvert.export.onnx.function_body import INPUTS, OUTPUTS
from kvconvert.export.onnx.standard_attention import lower_to_standard
from kvconvert.models import gqa_capable_model_types, registered_model_types

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx-cu13 not installed (pip install 'kvconvert[tensorrt]')")
MAX_CONTEXT = 32
STANDARD = {"TensorScatter", "Attention"}
EXPORTABLE = sorted(set(registered_model_types()) & set(TINY) - {"kvconvert_latent"})


def _load(folder):
    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


def _meta(folder):
    return json.loads({p.key: p.value for p in _load(folder).metadata_props}["kvconvert"])


@pytest.fixture(scope="module")
def std_onnx(tiny_folder, tmp_path_factory):
    """{dtype: folder} of tiny llama (4 query heads, 2 KV heads) exported with standard attention."""
    out = {}
    for dtype in ("fp16", "bf16"):
        out[dtype] = tmp_path_factory.mktemp("std") / dtype
        export_onnx(tiny_folder("llama", 2), OnnxExportConfig(max_context=MAX_CONTEXT, dtype=dtype,
                                                               attention="standard", validate=dtype == "fp16"),
                    out[dtype], progress=False)
    return out


@pytest.mark.parametrize("model_type", EXPORTABLE)
def test_standard_export_matches_transformers(tiny_folder, tmp_path, model_type):
    """Every architecture: only standard ops, same I/O as the KVAttention export, ORT == PyTorch at fp32 1e-4."""
    kv = 2 if model_type in gqa_capable_model_types() else None
    res = export_onnx(str(tiny_folder(model_type, kv)), OnnxExportConfig(max_context=MAX_CONTEXT, attention="standard"),
                      tmp_path / "onnx", progress=False)
    assert res.metrics["validation"]["passed"] and res.metrics["validation"]["max_abs_diff"] <= 1e-4
    model = _load(res.out)
    graph, meta = model.graph, _meta(res.out)
    ops = [n.op_type for n in graph.node]
    assert not any(n.domain == DOMAIN for n in graph.node) and not model.functions
    assert {o.domain for o in model.opset_import} == {""} and model.opset_import[0].version == 24
    assert ops.count("Attention") == meta["num_layers"] and ops.count("TensorScatter") == 2 * meta["num_layers"]
    layers = range(meta["num_layers"])
    inputs = ["input_ids", "position_ids", "cache_length"] + [f"past_{k}_{i}" for i in layers for k in ("key", "value")]
    outputs = ["logits"] + [f"present_{k}_{i}" for i in layers for k in ("key", "value")]
    assert [v.name for v in graph.input] == inputs and [v.name for v in graph.output] == outputs
    assert meta["attention"]["mode"] == "standard" and meta["attention"]["op_type"] == "Attention"
    assert meta["opset"] == 24 and res.record["passes"][-1]["params"]["opset"] == 24
    produced = {o: n.op_type for n in graph.node for o in n.output}
    assert all(produced[name] == "TensorScatter" for name in outputs[1:])


def test_standard_equals_kvattention_graph_on_ragged_batch(tiny_folder, tmp_path):
    """The same model exported both ways (the KVAttention body in standard ops): equal logits and caches on ragged
    rows (prefill, then decode)."""
    src = tiny_folder("qwen3", 2)
    gens = [OrtGenerator(export_onnx(str(src), OnnxExportConfig(max_context=MAX_CONTEXT, attention=mode, opset=24,
                                                                 validate=False, runtime="any"),
                                     tmp_path / mode, progress=False).out) for mode in ("kvconvert", "standard")]
    rng = np.random.default_rng(0)
    ids, lengths = rng.integers(0, 160, (3, 6)), np.array([6, 2, 4])
    pos = np.broadcast_to(np.arange(6), (3, 6))
    results = [g.step(ids, pos, np.zeros(3, np.int64), g.empty_cache(3)) for g in gens]
    np.testing.assert_allclose(results[1][0], results[0][0], atol=1e-5)
    nxt = rng.integers(0, 160, (3, 1))
    steps = [g.step(nxt, lengths[:, None], lengths, cache) for g, (_, cache) in zip(gens, results)]
    np.testing.assert_allclose(steps[1][0], steps[0][0], atol=1e-5)
    for want, got in zip(steps[0][1], steps[1][1]):
        np.testing.assert_allclose(got, want, atol=1e-6)


def _lowered(attrs):
    model = single_node_model(attrs, opset=24)
    model.graph.input.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, [None, None]))
    lower_to_standard(model, 16)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("heads,kv,s,softcap,window,policy", [
    (4, 2, 3, 0.0, 0, None), (4, 4, 1, 0.0, 0, None), (6, 2, 5, 5.0, 4, None), (2, 1, 2, 0.0, 3, None),
    (4, 2, 1, 0.0, 0, SINK_WINDOW), (4, 2, 4, 0.0, 0, SINK_WINDOW)])
def test_standard_ops_equal_kvattention_reference(heads, kv, s, softcap, window, policy):
    """Op level: TensorScatter + Attention (+ the shared mask) == kv_attention_reference, ragged cache_length."""
    torch.manual_seed(0)
    b, t, d = 3, 16, 8
    attrs = node_attributes(num_heads=heads, num_kv_heads=kv, head_dim=d, scale=0.3, softcap=softcap,
                            sliding_window=window, policy=policy)
    model = _lowered(attrs)
    assert {n.op_type for n in model.graph.node} >= STANDARD and not model.functions
    q, k, v = torch.randn(b, heads, s, d), torch.randn(b, kv, s, d), torch.randn(b, kv, s, d)
    past_k, past_v = torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    cache_length = torch.tensor([0, 7, t - s])
    ref = kv_attention_reference(q, k, v, past_k, past_v, cache_length, attrs)
    feed = dict(zip(INPUTS, [x.numpy() for x in (q, k, v, past_k, past_v, cache_length)]))
    feed["input_ids"] = np.zeros((b, s), np.int64)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(OUTPUTS, feed)
    for name, r, g in zip(OUTPUTS, ref, got):
        assert g.shape == tuple(r.shape), name
        np.testing.assert_allclose(g, r.numpy(), atol=1e-5, err_msg=name)


def test_layers_with_one_rule_share_one_mask():
    attrs = [node_attributes(num_heads=4, num_kv_heads=2, head_dim=8, scale=0.3, sliding_window=w, layer=i)
             for i, w in enumerate([0, 4, 0, 4, 0])]
    model = single_node_model(attrs[0], opset=24)
    node = model.graph.node[0]
    del model.graph.node[:]
    for a in attrs:
        model.graph.node.append(helper.make_node(node.op_type, node.input, [f"{o}_{a['layer']}" for o in node.output],
                                                 domain=DOMAIN, **a))
    assert lower_to_standard(model, 16) == 2
    masks = {n.input[3] for n in model.graph.node if n.op_type == "Attention"}
    assert len(masks) == 2


def test_standard_fp16_export_validates(std_onnx):
    """fp16 Attention in ONNX Runtime's CPU provider, against PyTorch fp16 at the fp16 tolerance."""
    rec = json.loads((std_onnx["fp16"] / "kvconvert.json").read_text())
    val = rec["passes"][-1]["metrics"]["onnx"]["validation"]
    assert val["passed"] and val["tolerance"] == 5e-2 and val["greedy_tokens_agree"]
    assert _meta(std_onnx["fp16"])["dtype"] == "fp16" and OrtGenerator(std_onnx["fp16"]).in_place


@pytest.mark.parametrize("policy,match", [("page_topk:page=16,keep=0.25,dense_below=16", "page_topk"),
                                          ("block_sparse_prefill:tile=64,dense_below=64", "block_sparse_prefill")])
def test_sparse_policy_with_standard_attention_is_refused(cli, capsys, tiny_folder, tmp_path, policy, match):
    src = tiny_folder("llama", 2)
    capsys.readouterr()
    code, _, err = cli("export", "onnx", src, "--out", tmp_path / "o", "--attention", "standard",
                       "--max-context", "128", "--policy", policy)
    assert code == 2 and match in err and "--attention kvconvert" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_standard_attention_below_opset_24_is_refused(tiny_folder, tmp_path):
    with pytest.raises(UserError, match="--opset 24"):
        export_onnx(str(tiny_folder("llama", 2)), OnnxExportConfig(attention="standard", opset=17), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_sink_window_policy_in_standard_ops_changes_logits(tiny_folder, tmp_path):
    """The policy reaches the mask: validated against kvconvert.sparse, and different from dense."""
    src, cfg = tiny_folder("qwen2", 2), {"max_context": MAX_CONTEXT, "attention": "standard"}
    sparse = export_onnx(str(src), OnnxExportConfig(policy="sink_window:sink=2,window=4", **cfg), tmp_path / "sw",
                         progress=False)
    assert sparse.metrics["validation"]["max_abs_diff"] <= 1e-4
    dense = export_onnx(str(src), OnnxExportConfig(validate=False, **cfg), tmp_path / "dense", progress=False)
    ids = np.arange(3, 15)[None]
    pos = np.arange(12)[None]
    a, b = (OrtGenerator(r.out) for r in (sparse, dense))
    diff = np.abs(a.step(ids, pos, np.zeros(1, np.int64), a.empty_cache(1))[0]
                  - b.step(ids, pos, np.zeros(1, np.int64), b.empty_cache(1))[0])
    assert diff[0, :6].max() < 1e-5 and diff[0, 6:].max() > 1e-4


def _check_standard_engine(eng, onnx_dir, num_layers):
    assert eng["attention"] == "standard"
    assert eng["plugin"] == {"mode": "none", "needs_python": False}
    layers = eng["layers"]
    assert layers["KV_CACHE_UPDATE"] == 2 * num_layers and layers["ATTENTION_INPUT"] == num_layers
    assert not {k for k in layers if k.startswith("PLUGIN")}
    assert eng["aliases"] == {f"present_{k}_{i}": f"past_{k}_{i}" for i in range(num_layers) for k in ("key", "value")}
    graph = _load(onnx_dir).graph
    assert [t["name"] for t in eng["io"]["inputs"]] == [v.name for v in graph.input]
    assert [t["name"] for t in eng["io"]["outputs"]] == [v.name for v in graph.output]


@needs_rtx
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_rtx_engine_from_standard_ops_needs_no_plugin(std_onnx, tmp_path, monkeypatch, dtype):
    """Built with the plugin unregistrable: TensorScatter -> KV-cache-update layers on past_*/present_*."""
    from kvconvert.export.engine import EngineConfig, export_engine, plugin

    monkeypatch.setattr(plugin, "register", lambda trt: pytest.fail("the plugin was registered"))
    res = export_engine(std_onnx[dtype], EngineConfig(max_batch=2, opt_prefill=8), tmp_path / "eng")
    assert (tmp_path / "eng" / "model.plan").stat().st_size == res.metrics["engine"]["plan_bytes"] > 1000
    eng = json.loads((tmp_path / "eng" / "kvconvert.json").read_text())["engine"]
    _check_standard_engine(eng, std_onnx[dtype], 2)
    assert {t["dtype"] for t in eng["io"]["inputs"] if t["name"].startswith("past_")} == {
        {"fp16": "HALF", "bf16": "BF16"}[dtype]}


@needs_rtx
def test_engine_refuses_a_cache_that_is_not_updated_in_place(std_onnx, tmp_path):
    """present_key_0 behind an Identity: TensorRT's cache-update output is no longer the network output."""
    import shutil

    from kvconvert.export.engine import EngineConfig, export_engine

    shutil.copytree(std_onnx["fp16"], tmp_path / "o")
    model = onnx.load(str(tmp_path / "o" / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "TensorScatter" and n.output[0] == "present_key_0")
    node.output[0] = "present_key_0_raw"
    model.graph.node.append(helper.make_node("Identity", ["present_key_0_raw"], ["present_key_0"]))
    onnx.save(model, str(tmp_path / "o" / "model.onnx"))
    with pytest.raises(PassFailed, match=r"\['present_key_0'\] is not a KV-cache-update layer"):
        export_engine(tmp_path / "o", EngineConfig(), tmp_path / "eng")
    assert not (tmp_path / "eng").exists()


@needs_rtx
def test_rtx_refuses_fp32_standard_attention_unless_decomposed(tiny_folder, tmp_path, monkeypatch):
    from kvconvert.export.engine import EngineConfig, export_engine

    onnx_dir = export_onnx(str(tiny_folder("llama", 2)), OnnxExportConfig(max_context=MAX_CONTEXT, validate=False,
                                                                          attention="standard"),
                           tmp_path / "fp32", progress=False).out
    with pytest.raises(UserError, match="--dtype fp16.*--decompose-attention"):
        export_engine(onnx_dir, EngineConfig(), tmp_path / "eng")
    assert not (tmp_path / "eng").exists()
    res = export_engine(onnx_dir, EngineConfig(decompose_attention=True), tmp_path / "eng")
    _check_standard_engine(res.record["engine"], onnx_dir, 2)
    monkeypatch.setattr("kvconvert.export.engine.build.check_standard_graph", lambda cfg, meta: None)
    with pytest.raises(PassFailed, match="could not build"):  # why the refusal exists: no fused fp32 kernel
        export_engine(onnx_dir, EngineConfig(), tmp_path / "eng2")


@needs_rtx
def test_rtx_refuses_softcapped_standard_attention(cli, capsys, tiny_folder, tmp_path):
    onnx_dir = export_onnx(str(tiny_folder("gemma2", 2)), OnnxExportConfig(max_context=MAX_CONTEXT, validate=False,
                                                                           attention="standard", dtype="fp16"),
                           tmp_path / "g2", progress=False).out
    capsys.readouterr()
    code, _, err = cli("export", "engine", onnx_dir, "--out", tmp_path / "eng")
    assert code == 2 and "soft-capping" in err and "--attention kvconvert" in err and err.count("\n") == 1
    assert not (tmp_path / "eng").exists()


@needs_rtx
def test_cli_standard_export_and_engine(cli, tiny_folder, tmp_path):
    code, out, err = cli("export", "onnx", tiny_folder("mistral", 2), "--out", tmp_path / "o", "--attention", "standard",
                         "--dtype", "fp16", "--max-context", "32")
    assert code == 0, err
    assert "opset ai.onnx 24" in out and _meta(tmp_path / "o")["attention"]["mode"] == "standard"
    code, out, err = cli("export", "engine", tmp_path / "o", "--out", tmp_path / "eng", "--max-batch", "2")
    assert code == 0, err
    assert json.loads((tmp_path / "eng" / "kvconvert.json").read_text())["engine"]["plugin"]["needs_python"] is False


@needs_rtx
@pytest.mark.smollm2
@pytest.mark.slow
def test_rtx_engine_from_standard_ops_for_smollm2(smollm2_onnx_standard, tmp_path):
    """SmolLM2-135M (9 query heads, 3 KV heads, 30 layers), fp16, 512-token cache: validated in ORT, then an
    engine with no plugin whose every cache is a KV-cache-update layer."""
    from kvconvert.export.engine import EngineConfig, export_engine

    val = smollm2_onnx_standard.metrics["validation"]
    assert val["passed"] and val["greedy_tokens_agree"]
    res = export_engine(smollm2_onnx_standard.out, EngineConfig(max_batch=1, opt_prefill=64), tmp_path / "eng")
    eng = res.record["engine"]
    assert (tmp_path / "eng" / "model.plan").stat().st_size == res.metrics["engine"]["plan_bytes"] > 100_000_000
    _check_standard_engine(eng, smollm2_onnx_standard.out, 30)
    past = next(t for t in eng["io"]["inputs"] if t["name"] == "past_key_0")
    assert past["shape"] == [-1, 3, 512, 64] and past["dtype"] == "HALF"


@pytest.mark.gpu
@needs_rtx
def test_standard_engine_greedy_equals_onnxruntime(std_onnx, tmp_path):
    """Needs an SM80/86/89/120 GPU: TensorRT's attention and in-place cache update against ONNX Runtime on the
    same graph, ragged prompts. Not run on our machines."""
    from kvconvert.export.engine import EngineConfig, Runner, export_engine

    export_engine(std_onnx["fp16"], EngineConfig(max_batch=2, opt_prefill=8), tmp_path / "eng")
    prompts = [[5, 9, 11, 3, 7], [40, 2, 17]]
    want = OrtGenerator(std_onnx["fp16"], providers=["CPUExecutionProvider"]).generate(prompts, 12, eos_token_id=None)
    got = Runner(tmp_path / "eng").generate(prompts, 12)
    assert got == [list(w[len(p):]) for w, p in zip(want, prompts)]
