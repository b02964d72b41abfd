"""config.pbtxt of the engine model and the generation model: Triton's `ModelConfig` protobuf message (from
tritonclient's model_config_pb2) printed with `google.protobuf.text_format`."""

from __future__ import annotations

from typing import Any

from ...errors import UserError

TRT_TO_TRITON = {"FLOAT": "TYPE_FP32", "HALF": "TYPE_FP16", "BF16": "TYPE_BF16", "INT64": "TYPE_INT64",
                 "INT32": "TYPE_INT32", "BOOL": "TYPE_BOOL", "INT8": "TYPE_INT8", "UINT8": "TYPE_UINT8"}
STATE_PREFIXES = ("past_key_", "past_value_", "past_kv_latent_")  # K/V, latent (past_key_latent_...), joint latent


def _pb():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise UserError("export triton writes config.pbtxt with Triton's model_config schema: "
                        "pip install 'kvconvert[serve]' (tritonclient[grpc])") from None
    return model_config_pb2


def _text(msg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(msg)


def is_state(name: str) -> bool:
    return name.startswith(STATE_PREFIXES)


def present_of(past: str) -> str:
    return past.replace("past_", "present_", 1)


def engine_config(name: str, io: dict[str, list[dict[str, Any]]], max_batch: int, instances: int,
                  idle_us: int) -> str:
    """platform tensorrt_plan; the batch axis is Triton's (max_batch_size), past_*/present_* pairs are
    implicit sequence state sharing one buffer, everything else is a plain input/output."""
    pb = _pb()
    cfg = pb.ModelConfig(name=name, platform="tensorrt_plan", max_batch_size=max_batch)
    cfg.sequence_batching.max_sequence_idle_microseconds = idle_us
    for t in io["inputs"]:
        dtype, dims = pb.DataType.Value(TRT_TO_TRITON[t["dtype"]]), t["shape"][1:]
        if is_state(t["name"]):
            cfg.sequence_batching.state.add(
                input_name=t["name"], output_name=present_of(t["name"]), data_type=dtype, dims=dims,
                use_same_buffer_for_input_output=True,
                initial_state=[pb.ModelSequenceBatching.InitialState(name="zeros", data_type=dtype, dims=dims,
                                                                     zero_data=True)])
        elif dims:
            cfg.input.add(name=t["name"], data_type=dtype, dims=dims)
        else:
            cfg.input.add(name=t["name"], data_type=dtype, dims=[1], reshape=pb.ModelTensorReshape(shape=[]))
    for t in io["outputs"]:
        if not is_state(t["name"].replace("present_", "past_", 1)):
            cfg.output.add(name=t["name"], data_type=pb.DataType.Value(TRT_TO_TRITON[t["dtype"]]), dims=t["shape"][1:])
    cfg.instance_group.add(kind=pb.ModelInstanceGroup.KIND_GPU, count=instances, profile=["0"])
    return _text(cfg)


GENERATE_INPUTS = [("text_input", "TYPE_STRING", [1]), ("input_ids", "TYPE_INT64", [-1]),
                   ("max_tokens", "TYPE_INT32", [1]), ("temperature", "TYPE_FP32", [1]),
                   ("top_k", "TYPE_INT32", [1]), ("seed", "TYPE_INT64", [1]), ("ignore_eos", "TYPE_BOOL", [1])]
GENERATE_OUTPUTS = [("token_ids", "TYPE_INT64", [-1]), ("text_output", "TYPE_STRING", [1])]


def generate_config(name: str, params: dict[str, Any], instances: int, gpu: bool) -> str:
    """Python backend, decoupled: one streamed response per generated token, then a final empty one."""
    pb = _pb()
    cfg = pb.ModelConfig(name=name, backend="python", max_batch_size=0)
    cfg.model_transaction_policy.decoupled = True
    for n, t, d in GENERATE_INPUTS:
        cfg.input.add(name=n, data_type=pb.DataType.Value(t), dims=d, optional=True)
    for n, t, d in GENERATE_OUTPUTS:
        cfg.output.add(name=n, data_type=pb.DataType.Value(t), dims=d)
    kind = pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU
    cfg.instance_group.add(kind=kind, count=instances)
    for k, v in params.items():
        cfg.parameters[k].string_value = str(v)
    return _text(cfg)
