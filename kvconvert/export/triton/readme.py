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
    limit = cfg.max_tokens_limit if cfg.max_tokens_limit is not None else "max_context"
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
    --http-port 8000 --grpc-port 8001 \\
    --allow-metrics=true --allow-gpu-metrics=false --metrics-address=127.0.0.1 --metrics-port=8002
```
Everything listens on loopback only; put a proxy in front to serve other hosts. `{gen}` is a Python-backend
model: the server's Python needs `numpy`, `tokenizers` and `onnxruntime` (in ONNX Runtime mode). With the
CPU-only server of the `nvidia-pytriton` wheel (what kvconvert's tests use) run
`python -m kvconvert.export.triton.server --repo $PWD` from kvconvert's checkout instead (same flags and ports:
`--http-port`, `--grpc-port`, `--metrics-port`): it puts that wheel's Python backend stub in place and sets the
library paths (`scripts/install.sh dev` creates its `.venv-tritonserver`).

## Load limits (per instance of `{gen}`; `count: {cfg.instances}` instance(s))
Each instance runs one scheduler thread with in-flight batching: `execute()` only checks a request and queues
it; between decode steps the scheduler admits queued requests, prefills them (at most `prefill_chunk` prompt
tokens per step in all, shortest prompt first, so a long prompt does not stall running sequences) and then
decodes every active sequence in ONE batched call, each sequence in its own row of one preallocated batch cache
(updated in place). In engine mode the same scheduler sends the step of every active sequence to the engine
model at once (one BLS request per sequence, its cache kept by Triton as sequence state). A finished,
cancelled or disconnected sequence leaves at the next step.

| parameter (config.pbtxt) | value | meaning |
|---|---|---|
| `max_active` | {cfg.max_active} | sequences decoded together (the batch cache holds `max_active` x max_context slots) |
| `max_queued` | {cfg.max_queued} | requests waiting for a free row; one more is refused at once ("the queue is full") |
| `queue_timeout_s` | {cfg.queue_timeout_s:g} | a request waiting longer gets an error |
| `max_tokens_limit` | {limit} | the largest `max_tokens` a request may ask |
| `prefill_chunk` | {cfg.prefill_chunk} | prompt tokens per scheduler step, summed over the sequences being prefilled |
| `ort_threads` | {cfg.ort_threads} | ONNX Runtime intra-op threads of the instance (0 = one per core) |
| `max_new_tokens` | {cfg.max_new_tokens} | `max_tokens` of a request that sends none |

Every refusal or failure the model sees (no prompt, ids outside the vocabulary, prompt + `max_tokens` beyond
max_context, a limit above, a failed step, unloading) is an error response followed by the final response
(`triton_final_response`), so a streaming client never waits forever. Errors Triton raises before the model
sees the request (a wrong dtype or an unknown input) come as a stream error without a final response: treat
any error as the end of that request. Cancelling (`client.stop_stream(cancel_requests=True)`, or the client
going away) stops the sequence at the next step and frees its row.

## Metrics (Prometheus text, `http://127.0.0.1:8002/metrics`)
Triton's own (`nv_inference_*`, CPU and memory) plus, from `{gen}`, labelled `model`, `version`, `instance`:

| metric | kind |
|---|---|
| `kvconvert_time_to_first_token_seconds` | histogram: request arrival to its first token |
| `kvconvert_inter_token_latency_seconds` | histogram: between consecutive tokens of a sequence |
| `kvconvert_generated_tokens_total` | counter |
| `kvconvert_queue_depth` | gauge: requests waiting for a row |
| `kvconvert_active_sequences` | gauge: sequences being prefilled or decoded |
| `kvconvert_requests_total{{outcome=...}}` | counter: completed, cancelled, rejected, timed_out, failed |

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
{cfg.max_new_tokens}), `temperature` (FP32, 0 = greedy), `top_k` (INT32), `seed` (INT64), `ignore_eos` (BOOL:
generate exactly `max_tokens`, for load tests). One response per token: `token_ids` (INT64 [1]) and
`text_output` (BYTES [1], the text that token adds), then the final response.
{engine_note}"""
