import importlib.util
import json

import pytest

from kvconvert.errors import UserError

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx-cu13 not installed (pip install 'kvconvert[tensorrt]')")


@pytest.fixture(scope="module")
def tiny_onnx(tiny_folder, tmp_path_factory):
    from kvconvert.export.onnx import OnnxExportConfig, export_onnx

    out = tmp_path_factory.mktemp("onnx") / "tiny"
    export_onnx(tiny_folder("llama", 2), OnnxExportConfig(max_context=32, validate=False), out)
    return out


@pytest.fixture(scope="module")
def tiny_onnx_sparse(tiny_folder, tmp_path_factory):
    from kvconvert.export.onnx import OnnxExportConfig, export_onnx

    out = tmp_path_factory.mktemp("onnx") / "tiny_sparse"
    export_onnx(tiny_folder("llama", 2), OnnxExportConfig(max_context=32, validate=False, dtype="fp16",
                                                           policy="sink_window:sink=2,window=8"), out)
    return out


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
    code, out, err = cli("export", "engine", tiny_onnx, "--out", tmp_path / "eng", "--max-batch", "2")
    assert code == 0, err
    assert (tmp_path / "eng" / "model.plan").is_file()
