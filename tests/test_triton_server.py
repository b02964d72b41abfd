"""A real Triton server (the CPU tritonserver of the nvidia-pytriton wheel) serving generated repositories."""

import importlib.util
import queue
import re
import statistics
import threading
import time

import numpy as np
import pytest

from kvconvert.export.triton.server import configured_server_python

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                       reason="tritonclient[grpc] not installed (pip install 'kvconvert[serve]')"),
    pytest.mark.skipif(not configured_server_python().exists(),
                       reason=f"no CPU tritonserver environment at {configured_server_python()}; "
                              "run `bash scripts/install.sh dev` (creates .venv-tritonserver)"),
]


def start_server(repo):
    from kvconvert.export.triton.server import TritonServer

    return TritonServer(repo).start()


class Stream:
    """One streamed request on its own gRPC stream: .tokens, .text, .error, .final (the final response came),
    .ttft (seconds from sending to the first token)."""

    def __init__(self, url, inputs: dict, request_id="1"):
        import tritonclient.grpc as grpcclient

        self.tokens, self.text, self.error, self.final, self.ttft = [], "", None, False, None
        self.events = []
        self.client = grpcclient.InferenceServerClient(url)
        self.responses = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))
        tensors = []
        for name, (dtype, value) in inputs.items():
            t = grpcclient.InferInput(name, list(value.shape), dtype)
            t.set_data_from_numpy(value)
            tensors.append(t)
        self.t0 = time.perf_counter()
        self.client.async_stream_infer("m_generate", tensors, request_id=request_id, enable_empty_final_response=True)

    def read(self, tokens=None, timeout=120):
        """Take responses until the final one (or `tokens` tokens); an error without a final response (Triton's
        own rejections, e.g. a wrong dtype) ends after 5 s."""
        while not self.final and (tokens is None or len(self.tokens) < tokens):
            try:
                result, err = self.responses.get(timeout=5 if self.error else timeout)
            except queue.Empty:
                break
            self.events.append("error" if err is not None else "response")
            if err is not None:
                self.error = str(err)
            elif result.get_response().parameters["triton_final_response"].bool_param:
                self.final = True
            else:
                self.ttft = time.perf_counter() - self.t0 if self.ttft is None else self.ttft
                self.tokens.append(int(result.as_numpy("token_ids")[0]))
                self.text += result.as_numpy("text_output")[0].decode()
        return self

    def close(self, cancel=False):
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()
        return self

    def wait(self):
        return self.read().close()


def stream_generate(url, inputs: dict, request_id="1"):
    """-> (token ids, text, error message or None) of one streamed request."""
    s = Stream(url, inputs, request_id).wait()
    return s.tokens, s.text, s.error


def ids_request(prompt, max_tokens):
    return {"input_ids": ("INT64", np.asarray(prompt, np.int64)), "max_tokens": ("INT32", np.array([max_tokens], np.int32))}


def greedy_reference(model, prompt, n):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def metric(text, name, **labels):
    """Sum of the samples of metric `name` whose labels include `labels`."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


LIMITS = dict(max_active=4, max_queued=2, max_tokens_limit=1000, prefill_chunk=16)
LONG = 1000  # tokens of a request that runs until it is cancelled (~2 s of the tiny model)


@pytest.fixture(scope="module")
def tiny_server(tiny_folder, tmp_path_factory):
    """One server for the module: the tiny GQA llama (1024-slot cache) under LIMITS."""
    from kvconvert.export.onnx import OnnxExportConfig, export_onnx
    from kvconvert.export.triton import TritonRepoConfig, export_triton

    tmp = tmp_path_factory.mktemp("triton")
    folder = tiny_folder("llama", 2)
    export_onnx(folder, OnnxExportConfig(max_context=1024, validate=False), tmp / "onnx")
    export_triton(tmp / "onnx", TritonRepoConfig(name="m", max_new_tokens=8, **LIMITS), tmp / "repo")
    server = start_server(tmp / "repo")
    yield folder, server
    server.stop()
    assert not server.alive()


def test_concurrent_ragged_prompts_equal_single_requests_and_metrics(tiny_server):
    from transformers import AutoModelForCausalLM

    folder, server = tiny_server
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = [[5, 9, 11], list(range(3, 40)), [40, 2, 17, 8, 99, 31, 7, 12, 60, 61, 5], list(range(100, 120))]
    want = [greedy_reference(model, p, 10) for p in prompts]
    single = [stream_generate(server.grpc_url, ids_request(p, 10)) for p in prompts]
    assert all(e is None for _, _, e in single), single
    assert all(t for t, _, _ in single), (single, server.log_tail())
    single = [t for t, _, _ in single]
    assert single == want
    before = server.metrics()

    streams = [Stream(server.grpc_url, ids_request(p, 10), request_id=str(k)) for k, p in enumerate(prompts)]
    results = [None] * len(streams)
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, streams[k].wait())) for k in range(4)]
    [t.start() for t in threads]
    [t.join(timeout=300) for t in threads]
    assert [r.tokens for r in results] == single and all(r.error is None and r.final for r in results)

    after = server.metrics()
    assert metric(after, "kvconvert_generated_tokens_total") - metric(before, "kvconvert_generated_tokens_total") == 40
    assert metric(after, "kvconvert_time_to_first_token_seconds_count") - \
        metric(before, "kvconvert_time_to_first_token_seconds_count") == 4
    assert metric(after, "kvconvert_inter_token_latency_seconds_count") - \
        metric(before, "kvconvert_inter_token_latency_seconds_count") == 36
    assert metric(after, "kvconvert_requests_total", outcome="completed") >= 8
    for gauge in ("kvconvert_queue_depth", "kvconvert_active_sequences"):
        assert re.search(rf'^{gauge}\{{[^}}]*model="m_generate"', after, re.M)
    assert metric(after, "kvconvert_active_sequences") == 0
    assert "nv_inference_request_success" in after  # Triton's own metrics on the same endpoint

    for bad in ({"max_tokens": ("INT32", np.array([4], np.int32))},                  # no prompt
                ids_request([10**9], 4),                                            # token id out of vocab
                ids_request(list(range(100)) * 10, 100)):                           # beyond max_context
        s = Stream(server.grpc_url, bad).wait()
        assert s.error and not s.tokens and s.final, bad
    s = Stream(server.grpc_url, {"input_ids": ("FP32", np.array([1.0, 2.0], np.float32))}).wait()  # Triton rejects
    assert s.error and not s.tokens
    assert server.alive()


def test_cancelled_stream_stops_and_frees_the_server(tiny_server):
    _, server = tiny_server
    short = ids_request([7, 8, 9, 10], 4)
    idle = statistics.median(Stream(server.grpc_url, short).wait().ttft for _ in range(3))
    before = server.metrics()
    long = Stream(server.grpc_url, ids_request([5, 6, 7], LONG)).read(tokens=3).close(cancel=True)
    nxt = Stream(server.grpc_url, short).wait()
    assert len(long.tokens) == 3 and not long.final
    assert nxt.error is None and len(nxt.tokens) == 4
    assert nxt.ttft <= 2 * idle, (nxt.ttft, idle)
    deadline = time.monotonic() + 10
    while metric(server.metrics(), "kvconvert_requests_total", outcome="cancelled") == \
            metric(before, "kvconvert_requests_total", outcome="cancelled") and time.monotonic() < deadline:
        time.sleep(0.05)
    after = server.metrics()
    assert metric(after, "kvconvert_requests_total", outcome="cancelled") - \
        metric(before, "kvconvert_requests_total", outcome="cancelled") == 1
    generated = metric(after, "kvconvert_generated_tokens_total") - metric(before, "kvconvert_generated_tokens_total") - 4
    assert 3 <= generated < LONG // 2, generated  # stopped at the step after the cancellation, not at max_tokens


def test_admission_limits_answer_with_an_error_and_a_final_response(tiny_server):
    _, server = tiny_server
    over = Stream(server.grpc_url, ids_request([5, 6], LIMITS["max_tokens_limit"] + 1)).wait()
    assert over.final and not over.tokens and "max_tokens_limit" in over.error

    busy = [Stream(server.grpc_url, ids_request([5 + k, 6], LONG), request_id=f"busy{k}")
            for k in range(LIMITS["max_active"])]
    [b.read(tokens=1) for b in busy]  # every running sequence has produced a token, so it holds a row
    waiting = [Stream(server.grpc_url, ids_request([9, 9 + k], LONG), request_id=f"wait{k}")
               for k in range(LIMITS["max_queued"])]
    deadline = time.monotonic() + 10
    while metric(server.metrics(), "kvconvert_queue_depth") < LIMITS["max_queued"] and time.monotonic() < deadline:
        time.sleep(0.02)
    full = Stream(server.grpc_url, ids_request([3, 4], 4), request_id="full").wait()
    assert full.final and not full.tokens and "queue is full" in full.error
    [s.close(cancel=True) for s in busy + waiting]
    assert server.alive()


def test_latent_model_served_greedy_equals_latent_generate(tiny_folder, tmp_path):
    """A fit-latent model's ONNX export (latent cache buffers) served in onnxruntime mode."""
    import torch

    import kvconvert
    from kvconvert.convert.latent import LatentConfig, fit_latent
    from kvconvert.export.onnx import OnnxExportConfig, export_onnx
    from kvconvert.export.triton import TritonRepoConfig, export_triton

    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(3, 150, (1, 48), generator=g) for _ in range(3)]
    latent = fit_latent(str(tiny_folder("qwen2")), LatentConfig(evaluate=False, kv_ratio=0.5), tmp_path / "lat",
                        calib=calib, progress=False).out
    export_onnx(latent, OnnxExportConfig(max_context=48, validate=False), tmp_path / "onnx", progress=False)
    export_triton(tmp_path / "onnx", TritonRepoConfig(name="m", max_new_tokens=8), tmp_path / "repo")
    prompt = [5, 9, 11, 3, 7]
    want = greedy_reference(kvconvert.load_latent(latent), prompt, 10)
    server = start_server(tmp_path / "repo")
    try:
        tokens, _, error = stream_generate(server.grpc_url, ids_request(prompt, 10))
    finally:
        server.stop()
    assert error is None and tokens == want


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_served_greedy_equals_transformers(smollm2_source, smollm2_model, tmp_path):
    from kvconvert.export.onnx import OnnxExportConfig, export_onnx
    from kvconvert.export.triton import TritonRepoConfig, export_triton

    export_onnx(smollm2_source, OnnxExportConfig(max_context=64, validate=False), tmp_path / "onnx")
    export_triton(tmp_path / "onnx", TritonRepoConfig(name="m"), tmp_path / "repo")
    tok = smollm2_source.load_tokenizer()
    prompt_text = "The capital of France is"
    prompt = tok(prompt_text)["input_ids"]
    want = greedy_reference(smollm2_model, prompt, 16)
    server = start_server(tmp_path / "repo")
    try:
        tokens, text, error = stream_generate(server.grpc_url, {
            "text_input": ("BYTES", np.array([prompt_text.encode()], dtype=object)),
            "max_tokens": ("INT32", np.array([16], np.int32))})
    finally:
        server.stop()
    assert error is None
    assert tokens == want
    assert text == tok.decode(want)
    if importlib.util.find_spec("tensorrt_rtx") is not None:  # the same export as a TensorRT-RTX engine + repository
        from kvconvert.export.engine import EngineConfig, export_engine

        export_engine(tmp_path / "onnx", EngineConfig(opt_prefill=16), tmp_path / "engine")
        export_triton(tmp_path / "engine", TritonRepoConfig(name="m"), tmp_path / "repo_engine")
        assert (tmp_path / "repo_engine" / "m" / "1" / "model.plan").stat().st_size > 100e6
