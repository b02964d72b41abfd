"""A real Triton server (the CPU tritonserver of the nvidia-pytriton wheel) serving generated repositories."""

import importlib.util
import queue
import threading

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


def stream_generate(url, inputs: dict, request_id="1"):
    """-> (token ids, text, error message or None) of one streamed request."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    tensors = []
    for name, (dtype, value) in inputs.items():
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        tensors.append(t)
    client.async_stream_infer("m_generate", tensors, request_id=request_id, enable_empty_final_response=True)
    tokens, text, error = [], "", None
    try:
        while True:
            try:  # after an error the final flag may or may not follow (server-side vs model-side errors)
                result, err = responses.get(timeout=5 if error else 120)
            except queue.Empty:
                break
            if err is not None:
                error = str(err)
                continue
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            tokens.append(int(result.as_numpy("token_ids")[0]))
            text += result.as_numpy("text_output")[0].decode()
    finally:
        client.stop_stream()
        client.close()
    return tokens, text, error


def ids_request(prompt, max_tokens):
    return {"input_ids": ("INT64", np.asarray(prompt, np.int64)), "max_tokens": ("INT32", np.array([max_tokens], np.int32))}


def greedy_reference(model, prompt, n):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tiny_repo(tiny_folder, tmp_path_factory):
    from kvconvert.export.onnx import OnnxExportConfig, export_onnx
    from kvconvert.export.triton import TritonRepoConfig, export_triton

    tmp = tmp_path_factory.mktemp("triton")
    folder = tiny_folder("llama", 2)
    export_onnx(folder, OnnxExportConfig(max_context=48, validate=False), tmp / "onnx")
    export_triton(tmp / "onnx", TritonRepoConfig(name="m", instances=2, max_new_tokens=8), tmp / "repo")
    return folder, tmp / "repo"


def test_tiny_model_served_greedy_concurrent_and_malformed(tiny_repo):
    from transformers import AutoModelForCausalLM

    folder, repo = tiny_repo
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = [[5, 9, 11, 3, 7], [40, 2, 17]]
    want = [greedy_reference(model, p, 10) for p in prompts]
    assert want[0] != want[1]
    server = start_server(repo)
    try:
        tokens, text, error = stream_generate(server.grpc_url, ids_request(prompts[0], 10))
        assert error is None and tokens == want[0] and text

        jobs = [0, 1, 0, 1]  # four concurrent sequences (two instances): each must get its own prompt's tokens
        results = [None] * len(jobs)

        def worker(k):
            results[k] = stream_generate(server.grpc_url, ids_request(prompts[jobs[k]], 10), request_id=str(k))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
        [t.start() for t in threads]
        [t.join(timeout=300) for t in threads]
        assert [r[0] for r in results] == [want[j] for j in jobs] and all(r[2] is None for r in results)

        for bad in ({"max_tokens": ("INT32", np.array([4], np.int32))},                  # no prompt
                    ids_request([10**9], 4),                                            # token id out of vocab
                    ids_request(list(range(10)), 1000),                                 # beyond max_context
                    {"input_ids": ("FP32", np.array([1.0, 2.0], np.float32))}):         # wrong dtype
            tokens, _, error = stream_generate(server.grpc_url, bad)
            assert error and not tokens, bad
        assert server.alive()
        tokens, _, error = stream_generate(server.grpc_url, ids_request(prompts[1], 10))
        assert error is None and tokens == want[1]
    finally:
        server.stop()
    assert not server.alive()


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
