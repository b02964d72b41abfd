"""README.md of a generated Triton repository: how to serve it and how to call it."""

from __future__ import annotations

from typing import Any

from .config import TritonRepoConfig


_NO_PYTHON = {
    "aot": "The plugin is embedded (AOT PTX); no Python is needed to load it.\n",
    "none": "The plan has no plugin (standard ONNX Attention and TensorScatter became TensorRT's attention and "
            "KV-cache-update layers); Triton's C++ TensorRT backend loads it as is.\n",
}


def readme_text(cfg: TritonRepoConfig, models: dict[str, Any], eng: dict[str, Any] | None) -> str:
    gen = f"{cfg.name}_generate"
    rows = "\n".join(f"| `{n}` | {', '.join(f'{k}={v}' for k, v in m.items())} |" for n, m in models.items())
    engine_note = ""
    if eng is not None:
        plugin = eng["plugin"]
        engine_note = f"""
## The engine model `{cfg.name}`
Built with {eng['backend']} {eng['tensorrt_version']} for {', '.join(eng['compute_capabilities']) or 'the build GPU'};
a server must run that exact TensorRT version on one of those GPUs. Its KV cache (`past_*` -> `present_*`) is
sequence state kept by Triton between the steps of a sequence (one buffer for input and output). Send every
request of a sequence with the same `sequence_id`, `sequence_start` on the first, `sequence_end` on the last.
""" + (f"""The KVAttention plugin of this plan is the Python IPluginV3 (`plugin: python`): Triton's C++ TensorRT
backend cannot load it. Serve through `{gen}` in engine mode from a Python process that imported kvconvert, or
rebuild with enterprise TensorRT and `--plugin aot` (the kernel's PTX is embedded; no Python needed).
""" if plugin["needs_python"] else _NO_PYTHON[plugin["mode"]])
    return f"""# Triton model repository (kvconvert)

| model | |
|---|---|
{rows}

## Serve
```bash
tritonserver --model-repository=$PWD --http-address 127.0.0.1 --grpc-address 127.0.0.1 \\
    --http-port 8000 --grpc-port 8001 --allow-metrics false
```
`{gen}` is a Python-backend model: the server's Python needs `numpy`, `tokenizers` and `onnxruntime`
(in ONNX Runtime mode). With the CPU-only server of the `nvidia-pytriton` wheel (what kvconvert's tests
use) run `python -m kvconvert.export.triton.server --repo $PWD` from kvconvert's checkout instead: it
puts that wheel's Python backend stub in place and sets the library paths
(`scripts/install.sh dev` creates its `.venv-tritonserver`).

## Call it (streaming, gRPC)
```python
import queue
import numpy as np
import tritonclient.grpc as grpcclient

client = grpcclient.InferenceServerClient("127.0.0.1:8001")
responses = queue.Queue()
client.start_stream(callback=lambda result, error: responses.put((result, error)))
text = grpcclient.InferInput("text_input", [1], "BYTES")
text.set_data_from_numpy(np.array([b"The capital of France is"], dtype=object))
tokens = grpcclient.InferInput("max_tokens", [1], "INT32")
tokens.set_data_from_numpy(np.array([32], np.int32))
client.async_stream_infer("{gen}", [text, tokens], request_id="1", enable_empty_final_response=True)
while True:
    result, error = responses.get()
    if error is not None:
        raise error
    if result.get_response().parameters["triton_final_response"].bool_param:
        break
    print(result.as_numpy("text_output")[0].decode(), end="", flush=True)
client.stop_stream()
```
Inputs: `text_input` (BYTES [1]) or `input_ids` (INT64 [n]); optional `max_tokens` (INT32, default
{cfg.max_new_tokens}), `temperature` (FP32, 0 = greedy), `top_k` (INT32), `seed` (INT64). One response per
token: `token_ids` (INT64 [1]) and `text_output` (BYTES [1], the text that token adds).
{engine_note}"""
