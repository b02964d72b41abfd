import importlib.util
import json

import pytest

from kvconvert.errors import UserError

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx-cu13 not installed (pip install 'kvconvert[tensorrt]')")


@pytest.fixture(scope="module")
def tiny_onnx(tiny_onnx_export):
    return tiny_onnx_export()


@pytest.fixture(scope="module")
def tiny_onnx_sparse(tiny_onnx_export):
    return tiny_onnx_export(dtype="fp16", policy="sink_window:sink=2,window=8")


def _onnx_io(folder):
    import onnx

    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return {v.name for v in m.graph.input}, {v.name for v in m.graph.output}


@needs_rtx
@pytest.mark.parametrize("which", ["dense", "sparse"])
def test_rtx_engine_builds_with_plugin_and_stamps(request, tmp_path, which):
    from kvconvert.export.engine import EngineConfig, export_engine

    onnx_dir = request.getfixturevalue("tiny_onnx" if which == "dense" else "tiny_onnx_sparse")
    res = export_engine(onnx_dir, EngineConfig(max_batch=2, opt_prefill=8), tmp_path / "eng")
    plan = tmp_path / "eng" / "model.plan"
    assert plan.stat().st_size > 1000
    rec = json.loads((tmp_path / "eng" / "kvconvert.json").read_text())
    eng = rec["engine"]
    import tensorrt_rtx

    assert eng["tensorrt_version"] == tensorrt_rtx.__version__
    assert eng["compute_capabilities"] == ["SM80", "SM86", "SM89", "SM120"]
    assert [p["name"] for p in eng["profiles"]] == ["prefill", "decode"]
    ins, outs = _onnx_io(onnx_dir)
    assert {t["name"] for t in eng["io"]["inputs"]} == ins and {t["name"] for t in eng["io"]["outputs"]} == outs
    assert eng["aliases"]["present_key_0"] == "past_key_0"
    assert rec["passes"][-1]["pass"] == "export_engine" and res.metrics["engine"]["plan_bytes"] == plan.stat().st_size
    assert (tmp_path / "eng" / "tokenizer.json").is_file() or (tmp_path / "eng" / "tokenizer_config.json").is_file()


@needs_rtx
@pytest.mark.smollm2
@pytest.mark.slow
def test_rtx_engine_builds_for_smollm2(smollm2_onnx, tmp_path):
    """The real model's exported graph: every layer's KVAttention bound to the plugin, cache aliased in place."""
    from kvconvert.export.engine import EngineConfig, export_engine

    res = export_engine(smollm2_onnx.out, EngineConfig(max_batch=1, opt_prefill=16, max_prefill=64),
                        tmp_path / "eng")
    eng = json.loads((tmp_path / "eng" / "kvconvert.json").read_text())["engine"]
    assert (tmp_path / "eng" / "model.plan").stat().st_size == res.metrics["engine"]["plan_bytes"] > 1_000_000
    assert all(eng["aliases"][f"present_key_{i}"] == f"past_key_{i}" for i in range(30))
    assert all(eng["aliases"][f"present_value_{i}"] == f"past_value_{i}" for i in range(30))
    ins, outs = _onnx_io(smollm2_onnx.out)
    assert {t["name"] for t in eng["io"]["inputs"]} == ins and {t["name"] for t in eng["io"]["outputs"]} == outs


@needs_rtx
@pytest.mark.smollm2
@pytest.mark.slow
def test_rtx_engine_builds_for_smollm2_with_sparse_policy(smollm2_source, tmp_path):
    """The real model with a sink + window decode policy: every layer's sparse KVAttention bound to the plugin."""
    from kvconvert.export.engine import EngineConfig, export_engine
    from kvconvert.export.onnx import OnnxExportConfig, export_onnx

    onnx_dir = export_onnx(smollm2_source, OnnxExportConfig(max_context=96, dtype="fp16", validate=False,
                                                            policy="sink_window:sink=4,window=32"),
                           tmp_path / "onnx", progress=False).out
    export_engine(onnx_dir, EngineConfig(max_batch=1, opt_prefill=16, max_prefill=64), tmp_path / "eng")
    eng = json.loads((tmp_path / "eng" / "kvconvert.json").read_text())["engine"]
    assert eng["plugin"]["name"] == "KVAttention" and eng["plugin"]["needs_python"]
    per_layer = eng["onnx"]["metadata"]["attention"]["per_layer"]
    assert len(per_layer) == 30 and all(a["policy_decode"] == "sink_window" and a["policy_decode_window"] == 32
                                        for a in per_layer)
    assert all(eng["aliases"][f"present_key_{i}"] == f"past_key_{i}" for i in range(30))
    assert (tmp_path / "eng" / "model.plan").stat().st_size > 1_000_000


def test_plugin_receives_the_node_attributes(tiny_onnx_sparse, tmp_path, monkeypatch):
    import onnx

    from kvconvert.export.engine import EngineConfig, export_engine, plugin

    seen = []
    decode = plugin.attrs_from_fields
    monkeypatch.setattr(plugin, "attrs_from_fields", lambda fc: seen.append(decode(fc)) or seen[-1])
    export_engine(tiny_onnx_sparse, EngineConfig(), tmp_path / "eng")
    meta = json.loads(onnx.load(str(tiny_onnx_sparse / "model.onnx"), load_external_data=False).metadata_props[0].value)
    layers = {a["layer"]: a for a in seen if a["num_heads"]}
    assert sorted(layers) == list(range(meta["num_layers"]))
    want = meta["attention"]["attributes"]
    got = layers[0]
    for key in plugin.INT_FIELDS + plugin.STR_FIELDS:
        assert got[key] == want[key], key
    assert got["scale"] == pytest.approx(want["scale"], rel=1e-6)
    assert got["policy_decode"] == "sink_window" and got["policy_decode_window"] == 8


def test_missing_backend_gives_install_hint(tiny_onnx, tmp_path, monkeypatch):
    import sys

    from kvconvert.export.engine import EngineConfig, export_engine

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UserError, match="install"):
        export_engine(tiny_onnx, EngineConfig(backend="tensorrt"), tmp_path / "eng")
    assert not (tmp_path / "eng").exists()


def test_engine_that_cannot_fit_the_ram_is_refused_before_tensorrt_loads(cli, tiny_onnx, tmp_path, monkeypatch):
    import sys

    from kvconvert.export.onnx import footprint

    monkeypatch.setattr(footprint, "ENGINE_RAM_COPIES", 2**40)  # any RAM is too little
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)  # importing the backend would fail differently
    code, _, err = cli("export", "engine", tiny_onnx, "--out", tmp_path / "eng")
    assert code == 2 and "RAM" in err and "trtexec" in err and err.count("\n") == 1, err
    assert not (tmp_path / "eng").exists()


def test_onnx_without_metadata_is_refused(tiny_onnx, tmp_path):
    import onnx

    from kvconvert.export.engine import EngineConfig, export_engine

    m = onnx.load(str(tiny_onnx / "model.onnx"))
    del m.metadata_props[:]
    (tmp_path / "plain").mkdir()
    onnx.save(m, str(tmp_path / "plain" / "model.onnx"))
    with pytest.raises(UserError, match="kvconvert"):
        export_engine(tmp_path / "plain", EngineConfig(), tmp_path / "eng")
    assert not (tmp_path / "eng").exists()


@pytest.mark.parametrize("flags", [["--opt-prefill", "64", "--max-prefill", "16"], ["--max-batch", "2", "--opt-batch", "4"]])
def test_profile_max_below_opt_is_exit_2_nothing_written(cli, tiny_onnx, tmp_path, flags):
    code, _, err = cli("export", "engine", tiny_onnx, "--out", tmp_path / "eng", *flags)
    assert code == 2 and "opt" in err and err.count("\n") == 1
    assert not (tmp_path / "eng").exists()


@needs_rtx
def test_cli_export_engine(cli, tiny_onnx, tmp_path):
    code, _, err = cli("export", "engine", tiny_onnx, "--out", tmp_path / "eng", "--max-batch", "2")
    assert code == 0, err
    assert (tmp_path / "eng" / "model.plan").is_file()


@pytest.mark.gpu
@needs_rtx
@pytest.mark.parametrize("which", ["tiny_onnx", "tiny_onnx_sparse"])
def test_engine_greedy_equals_onnxruntime(request, tmp_path, which):
    """Needs an SM80/86/89/120 GPU (TensorRT-RTX targets; not Hopper): the plugin's kernels inside the engine
    against ONNX Runtime running the KVAttention function body (the reference). Not run on our machines."""
    from kvconvert.export.engine import EngineConfig, Runner, export_engine
    from kvconvert.export.onnx.ort_generate import OrtGenerator

    onnx_dir = request.getfixturevalue(which)
    export_engine(onnx_dir, EngineConfig(max_batch=2, opt_prefill=8), tmp_path / "eng")
    prompts = [[5, 9, 11, 3, 7], [40, 2, 17]]
    want = OrtGenerator(onnx_dir, providers=["CPUExecutionProvider"]).generate(prompts, 12, eos_token_id=None)
    got = Runner(tmp_path / "eng").generate(prompts, 12)
    assert got == [list(w[len(p):]) for w, p in zip(want, prompts)]


@needs_rtx
def test_runner_refuses_a_plan_from_another_tensorrt_version(tiny_onnx, tmp_path):
    from kvconvert.export.engine import EngineConfig, Runner, export_engine

    export_engine(tiny_onnx, EngineConfig(), tmp_path / "eng")
    rec_path = tmp_path / "eng" / "kvconvert.json"
    rec = json.loads(rec_path.read_text())
    rec["engine"]["tensorrt_version"] = "0.0.1"
    rec_path.write_text(json.dumps(rec))
    with pytest.raises(UserError, match="built with"):
        Runner(tmp_path / "eng")


@pytest.mark.gpu
@needs_rtx
@pytest.mark.parametrize("which", ["tiny_onnx", "tiny_onnx_sparse"])
def test_plugin_step_equals_reference_step(request, tmp_path, which):
    """Needs an SM80/86/89/120 GPU; not run on our machines. Inside the engine, the plugin's kernels (prefill, then
    decode steps on ragged rows) give the logits and cache buffers ONNX Runtime gives with the function body."""
    import numpy as np
    import torch

    from kvconvert.export.engine import EngineConfig, Runner, export_engine
    from kvconvert.export.onnx.ort_generate import OrtGenerator

    onnx_dir = request.getfixturevalue(which)
    export_engine(onnx_dir, EngineConfig(max_batch=2, opt_prefill=8), tmp_path / "eng")
    ort, eng = OrtGenerator(onnx_dir, providers=["CPUExecutionProvider"]), Runner(tmp_path / "eng")
    ort_cache, eng_cache = ort.empty_cache(2), eng.empty_cache(2)
    ids = np.array([[5, 9, 11, 3, 7, 2], [40, 2, 17, 8, 0, 0]])
    lengths = np.array([6, 4])
    steps = [(ids, np.broadcast_to(np.arange(6), (2, 6)), np.zeros(2, np.int64))]
    steps += [(np.array([[12 + t], [30 + t]]), (lengths + t)[:, None], lengths + t) for t in range(3)]
    tol = 1e-3 if ort.meta["dtype"] == "fp32" else 3e-2
    for step_ids, pos, cache_length in steps:
        want, ort_cache = ort.step(step_ids, pos, cache_length, ort_cache)
        cuda = [torch.from_numpy(np.ascontiguousarray(a)).cuda() for a in (step_ids, pos, cache_length)]
        got = eng.step(*cuda, eng_cache).float().cpu().numpy()
        rows = lengths if step_ids.shape[1] > 1 else np.ones(2, np.int64)
        for b, n in enumerate(rows):  # padded prompt slots are never attended, their logits are free
            scale = max(1.0, float(np.abs(want[b, :n]).max()))
            assert np.abs(got[b, :n] - want[b, :n].astype(np.float32)).max() / scale <= tol
    for mine, ref in zip(eng_cache, ort_cache):
        for b, n in enumerate(lengths + 3):
            torch.testing.assert_close(mine[b, :, :n].float().cpu(), torch.from_numpy(ref[b, :, :n]).float(),
                                       rtol=tol, atol=tol)
