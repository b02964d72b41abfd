import importlib.util
import json

import pytest

from kvconvert.errors import UserError

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
HAS_CLIENT = importlib.util.find_spec("tritonclient") is not None
needs_client = pytest.mark.skipif(not HAS_CLIENT, reason="tritonclient[grpc] not installed (pip install 'kvconvert[serve]')")

TRITON_DTYPE = {"FLOAT": "TYPE_FP32", "HALF": "TYPE_FP16", "BF16": "TYPE_BF16", "INT64": "TYPE_INT64"}
ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 16: "BF16", 7: "INT64"}


@pytest.fixture(scope="module")
def tiny_onnx(tiny_onnx_export):
    return tiny_onnx_export(dtype="fp16")


@pytest.fixture(scope="module")
def tiny_onnx_standard(tiny_onnx_export):
    return tiny_onnx_export(dtype="fp16", attention="standard")


def parse_config(path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def onnx_io(folder):
    import onnx

    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)

    def row(v):
        t = v.type.tensor_type
        return v.name, ONNX_TO_TRT[t.elem_type], [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]

    return [row(v) for v in m.graph.input], [row(v) for v in m.graph.output]


@needs_client
@pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx-cu13 not installed (pip install 'kvconvert[tensorrt]')")
@pytest.mark.parametrize("attention", ["kvconvert", "standard"])
def test_engine_repository_config_parses_and_matches_engine_io(request, tmp_path, attention):
    """Both engines (plugin / standard ops): config.pbtxt parses with Triton's schema and matches the engine I/O."""
    from google.protobuf import text_format  # noqa: F401

    from kvconvert.export.engine import EngineConfig, export_engine
    from kvconvert.export.triton import TritonRepoConfig, export_triton

    tiny_onnx = request.getfixturevalue("tiny_onnx" if attention == "kvconvert" else "tiny_onnx_standard")

    export_engine(tiny_onnx, EngineConfig(max_batch=4, opt_batch=2, opt_prefill=8), tmp_path / "eng")
    export_triton(tmp_path / "eng", TritonRepoConfig(name="tiny"), tmp_path / "repo")
    cfg = parse_config(tmp_path / "repo" / "tiny" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 4
    assert (tmp_path / "repo" / "tiny" / "1" / "model.plan").read_bytes() == (tmp_path / "eng" / "model.plan").read_bytes()
    ins, outs = onnx_io(tiny_onnx)
    from tritonclient.grpc import model_config_pb2 as pb

    seen_in = {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in cfg.input}
    seen_state = {s.input_name: (s.output_name, pb.DataType.Name(s.data_type), list(s.dims), s.use_same_buffer_for_input_output,
                                 s.initial_state[0].zero_data) for s in cfg.sequence_batching.state}
    for name, dtype, shape in ins:
        if name.startswith("past_"):
            assert seen_state.pop(name) == (name.replace("past_", "present_"), TRITON_DTYPE[dtype], shape[1:], True, True)
        else:
            got_dtype, dims = seen_in.pop(name)
            assert got_dtype == TRITON_DTYPE[dtype]
            assert dims == (shape[1:] or [1])
    assert not seen_in and not seen_state
    seen_out = {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in cfg.output}
    assert seen_out == {n: (TRITON_DTYPE[d], s[1:]) for n, d, s in outs if not n.startswith("present_")}
    gen = parse_config(tmp_path / "repo" / "tiny_generate" / "config.pbtxt")
    assert gen.backend == "python" and gen.model_transaction_policy.decoupled
    assert gen.parameters["mode"].string_value == "engine" and gen.parameters["engine_model"].string_value == "tiny"
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "tiny_generate" in readme
    assert ("cannot load it" in readme) == (attention == "kvconvert")
    assert ("has no plugin" in readme) == (attention == "standard")


@needs_client
def test_onnx_repository_generate_config(tiny_onnx, tmp_path, cli):
    code, _, err = cli("export", "triton", tiny_onnx, "--repo", tmp_path / "repo", "--name", "tiny")
    assert code == 0, err
    repo = tmp_path / "repo"
    gen = parse_config(repo / "tiny_generate" / "config.pbtxt")
    assert gen.name == "tiny_generate" and gen.parameters["mode"].string_value == "onnxruntime"
    assert {t.name for t in gen.input} == {"text_input", "input_ids", "max_tokens", "temperature", "top_k", "seed"}
    assert all(t.optional for t in gen.input)
    meta = json.loads(gen.parameters["kvconvert"].string_value)
    assert meta["max_context"] == 32
    assert (repo / "tiny_generate" / "1" / "model.onnx").is_file() and (repo / "tiny_generate" / "1" / "model.py").is_file()
    assert not (repo / "tiny").exists()


def test_bad_sources_are_refused(tmp_path, tiny_onnx):
    from kvconvert.export.triton import TritonRepoConfig, export_triton

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither"):
        export_triton(tmp_path / "empty", TritonRepoConfig(), tmp_path / "repo")
    with pytest.raises(UserError, match="engine"):
        export_triton(tiny_onnx, TritonRepoConfig(generate_backend="engine"), tmp_path / "repo")
    with pytest.raises(UserError):
        TritonRepoConfig.parse({"name": "bad name/"})
    assert not (tmp_path / "repo").exists()
