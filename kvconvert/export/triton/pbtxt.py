"""config.pbtxt text for the engine model and the generation model (Triton's model_config schema)."""

from __future__ import annotations

import json
from typing import Any

TRT_TO_TRITON = {"FLOAT": "TYPE_FP32", "HALF": "TYPE_FP16", "BF16": "TYPE_BF16", "INT64": "TYPE_INT64",
                 "INT32": "TYPE_INT32", "BOOL": "TYPE_BOOL", "INT8": "TYPE_INT8", "UINT8": "TYPE_UINT8"}
STATE_PREFIXES = ("past_key_", "past_value_", "past_kv_latent_")  # K/V, latent (past_key_latent_...), joint latent


def _dims(dims: list[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


def _tensor(name: str, dtype: str, dims: list[int], extra: str = "") -> str:
    return f'  {{ name: "{name}" data_type: {dtype} dims: {_dims(dims)}{extra} }}'


def is_state(name: str) -> bool:
    return name.startswith(STATE_PREFIXES)


def present_of(past: str) -> str:
    return past.replace("past_", "present_", 1)


def engine_config(name: str, io: dict[str, list[dict[str, Any]]], max_batch: int, instances: int,
                  idle_us: int) -> str:
    """platform tensorrt_plan; the batch axis is Triton's (max_batch_size), past_*/present_* pairs are
    implicit sequence state sharing one buffer, everything else is a plain input/output."""
    inputs, outputs, states = [], [], []
    for t in io["inputs"]:
        dtype, dims = TRT_TO_TRITON[t["dtype"]], t["shape"][1:]
        if is_state(t["name"]):
            states.append(
                f'    {{ input_name: "{t["name"]}" output_name: "{present_of(t["name"])}" data_type: {dtype} '
                f"dims: {_dims(dims)}\n      initial_state: {{ name: \"zeros\" data_type: {dtype} "
                f"dims: {_dims(dims)} zero_data: true }}\n      use_same_buffer_for_input_output: true }}")
        elif dims:
            inputs.append(_tensor(t["name"], dtype, dims))
        else:
            inputs.append(_tensor(t["name"], dtype, [1], " reshape: { shape: [ ] }"))
    for t in io["outputs"]:
        if not is_state(t["name"].replace("present_", "past_", 1)):
            outputs.append(_tensor(t["name"], TRT_TO_TRITON[t["dtype"]], t["shape"][1:]))
    return "\n".join([
        f'name: "{name}"', 'platform: "tensorrt_plan"', f"max_batch_size: {max_batch}",
        "input [\n" + ",\n".join(inputs) + "\n]", "output [\n" + ",\n".join(outputs) + "\n]",
        "sequence_batching {", f"  max_sequence_idle_microseconds: {idle_us}",
        "  state [\n" + ",\n".join(states) + "\n  ]", "}",
        f"instance_group [ {{ kind: KIND_GPU count: {instances} profile: [ \"0\" ] }} ]", ""])


GENERATE_INPUTS = [("text_input", "TYPE_STRING", [1]), ("input_ids", "TYPE_INT64", [-1]),
                   ("max_tokens", "TYPE_INT32", [1]), ("temperature", "TYPE_FP32", [1]),
                   ("top_k", "TYPE_INT32", [1]), ("seed", "TYPE_INT64", [1])]
GENERATE_OUTPUTS = [("token_ids", "TYPE_INT64", [-1]), ("text_output", "TYPE_STRING", [1])]


def generate_config(name: str, params: dict[str, Any], instances: int, gpu: bool) -> str:
    """Python backend, decoupled: one streamed response per generated token, then a final empty one."""
    ins = ",\n".join(_tensor(n, t, d, " optional: true") for n, t, d in GENERATE_INPUTS)
    outs = ",\n".join(_tensor(n, t, d) for n, t, d in GENERATE_OUTPUTS)
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    pars = ",\n".join(f'  {{ key: "{k}" value: {{ string_value: {json.dumps(str(v))} }} }}' for k, v in params.items())
    return "\n".join([
        f'name: "{name}"', 'backend: "python"', "max_batch_size: 0",
        "model_transaction_policy { decoupled: true }",
        f"input [\n{ins}\n]", f"output [\n{outs}\n]",
        f"instance_group [ {{ kind: {kind} count: {instances} }} ]",
        f"parameters [\n{pars}\n]", ""])
