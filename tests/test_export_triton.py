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
    assert {t.name for t in gen.input} == {"text_input", "input_ids", "max_tokens", "temperature", "top_k", "seed",
                                          "ignore_eos"}
    assert all(t.optional for t in gen.input)
    meta = json.loads(gen.parameters["kvconvert"].string_value)
    assert meta["max_context"] == 32 and meta["inputs"][3:] and meta["logits"] == "all"
    limits = {k: gen.parameters[k].string_value for k in ("max_active", "max_queued", "queue_timeout_s",
                                                            "prefill_chunk", "ort_threads", "max_new_tokens")}
    assert limits == {"max_active": "8", "max_queued": "64", "queue_timeout_s": "30.0", "prefill_chunk": "128",
                      "ort_threads": "0", "max_new_tokens": "64"}
    assert "max_tokens_limit" not in gen.parameters  # None: max_context
    readme = (repo / "README.md").read_text()
    assert "--allow-metrics=true" in readme and "--metrics-address=127.0.0.1" in readme
    assert all(f"`{k}` | {v} |" in readme for k, v in limits.items() if k != "queue_timeout_s")
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "generated_tokens_total",
                 "queue_depth", "active_sequences"):
        assert f"kvconvert_{name}" in readme
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


def generate_model_module():
    """The repository's model.py template, imported outside Triton (its scheduler needs no pb_utils)."""
    import importlib.util

    from kvconvert.export.triton.repo import TEMPLATE

    spec = importlib.util.spec_from_file_location("kvconvert_generate_model", TEMPLATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Sink:
    """A request's responses as the scheduler sends them; `cancel_after=k` reports cancelled once k tokens went
    out, `delay` seconds per sent token."""

    def __init__(self, cancel_after=None, delay=0.0):
        import threading

        self.tokens, self.error, self.closes = [], None, 0
        self.done = threading.Event()
        self.cancel_after, self.delay = cancel_after, delay

    def send(self, tok, piece):
        import time

        time.sleep(self.delay)
        self.tokens.append(tok)
        return True

    def close(self, error=None):
        self.error, self.closes = error, self.closes + 1
        self.done.set()

    def cancelled(self):
        return self.cancel_after is not None and len(self.tokens) >= self.cancel_after


class Recorder:
    def __init__(self):
        self.calls = {}

    def __getattr__(self, name):
        return lambda value: self.calls.setdefault(name, []).append(value)


def scheduler(gm, folder, max_active, queue_timeout_s=30.0, prefill_chunk=5, max_queued=16):
    from kvconvert.export.onnx.ort_generate import OrtGenerator

    meta = OrtGenerator(folder).meta
    stepper = gm.OrtBatchStepper(str(folder / "model.onnx"), meta, max_active, threads=1)
    return gm.Scheduler(stepper, lambda ids: " ".join(map(str, ids)), set(), max_active, max_queued, queue_timeout_s,
                        prefill_chunk, Recorder()), stepper


@pytest.mark.parametrize("fields", [{}, {"attention": "standard"}, {"logits": "last"}],
                         ids=["kvattention-opset17", "standard-opset24", "logits-last"])
def test_in_flight_batching_equals_one_request_at_a_time(tiny_onnx_export, fields):
    """6 ragged prompts through 3 rows of one batch cache (chunked prefill of 5 tokens per step in all, queued
    requests taking the rows of finished ones) give each prompt's greedy tokens of OrtGenerator alone."""
    import numpy as np

    from kvconvert.export.onnx.ort_generate import OrtGenerator

    folder = tiny_onnx_export(**fields)
    gen = OrtGenerator(folder)
    prompts = [[5, 9, 11], list(range(3, 20)), [40, 2, 17, 8, 99, 31, 7], [7], list(range(50, 62)), [8, 8, 8, 8]]
    lengths = [6, 12, 3, 9, 15, 1]
    want = [gen.generate([np.array(p)], n, eos_token_id=None)[0][len(p):].tolist() for p, n in zip(prompts, lengths)]
    gm = generate_model_module()
    sched, stepper = scheduler(gm, folder, max_active=3)
    sinks = [Sink() for _ in prompts]
    buffers = list(stepper.buffers)
    for p, n, s in zip(prompts, lengths, sinks):
        sched.submit(gm.Sequence(np.array(p, np.int64), n, 0.0, 0, 0, s))
    assert all(s.done.wait(60) for s in sinks)
    sched.stop()
    assert [s.tokens for s in sinks] == want
    assert all(s.error is None and s.closes == 1 for s in sinks)
    assert all(a is b for a, b in zip(buffers, stepper.buffers)) and np.abs(buffers[0]).max() > 0  # written in place
    assert sorted(stepper.free) == [0, 1, 2] and not stepper.row
    calls = sched.metrics.calls
    assert len(calls["first_token"]) == 6 and sum(calls["tokens"]) == sum(lengths)
    assert len(calls["inter_token"]) == sum(lengths) - 6 and max(calls["active"]) == 3


def test_cancelled_sequence_leaves_at_the_next_step_and_queue_times_out(tiny_onnx):
    import numpy as np

    gm = generate_model_module()
    sched, stepper = scheduler(gm, tiny_onnx, max_active=1, queue_timeout_s=0.3, max_queued=1)
    cancelled = Sink(cancel_after=3)
    slow = Sink(delay=0.05)
    late, refused = Sink(), Sink()
    sched.submit(gm.Sequence(np.array([5, 6, 7]), 20, 0.0, 0, 0, cancelled))
    assert cancelled.done.wait(30)
    assert len(cancelled.tokens) == 3 and cancelled.error is None and cancelled.closes == 1
    sched.submit(gm.Sequence(np.array([5, 6, 7]), 20, 0.0, 0, 0, slow))  # ~1 s on the only row
    import time

    while not slow.tokens:
        time.sleep(0.01)
    sched.submit(gm.Sequence(np.array([9]), 4, 0.0, 0, 0, late))
    with pytest.raises(gm.Rejected, match="queue is full"):
        sched.submit(gm.Sequence(np.array([9]), 4, 0.0, 0, 0, refused))
    assert late.done.wait(30) and not late.tokens and "queue" in late.error and late.closes == 1
    assert slow.done.wait(30) and len(slow.tokens) == 20 and slow.error is None
    sched.stop()
    outcomes = sched.metrics.calls["outcome"]
    assert outcomes.count("cancelled") == 1 and outcomes.count("timed_out") == 1 and outcomes.count("completed") == 1


def test_failed_step_ends_its_sequences_with_an_error_and_the_model_keeps_serving(tiny_onnx):
    import numpy as np

    gm = generate_model_module()
    sched, stepper = scheduler(gm, tiny_onnx, max_active=2)
    decode, calls = stepper.decode, []

    def failing_second_call(items):
        calls.append(len(items))
        if len(calls) == 2:
            raise RuntimeError("injected step failure")
        return decode(items)

    stepper.decode = failing_second_call
    first = Sink()
    sched.submit(gm.Sequence(np.array([5, 6, 7]), 10, 0.0, 0, 0, first))
    assert first.done.wait(30)
    assert len(first.tokens) == 2 and "injected step failure" in first.error and first.closes == 1
    after = Sink()
    sched.submit(gm.Sequence(np.array([5, 6, 7]), 10, 0.0, 0, 0, after))
    assert after.done.wait(30)
    sched.stop()
    assert len(after.tokens) == 10 and after.error is None and sorted(stepper.free) == [0, 1]
