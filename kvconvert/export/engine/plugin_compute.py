"""What the Python plugin executes on the GPU: device pointers viewed as torch tensors, new K/V written into
the aliased cache at cache_length + s, attention by our Triton kernels (decode) or the eager reference."""

from __future__ import annotations

from typing import Any

_TYPESTR = {"FLOAT": ("<f4", None), "HALF": ("<f2", None), "BF16": ("<i2", "bfloat16"), "INT64": ("<i8", None)}


def _view(desc, ptr: int):
    """A torch CUDA tensor over TensorRT's buffer (no copy)."""
    import torch

    typestr, reinterpret = _TYPESTR[desc.type.name]
    holder = type("CudaArray", (), {"__cuda_array_interface__": {
        "shape": tuple(int(d) for d in desc.dims), "typestr": typestr, "data": (int(ptr), False), "version": 3}})()
    t = torch.as_tensor(holder, device="cuda")
    return t.view(getattr(torch, reinterpret)) if reinterpret else t


def kv_attention_step(trt, attrs: dict[str, Any], input_desc, output_desc, inputs, outputs, stream) -> None:
    import torch

    from ...export.onnx.attention_op import kv_attention_reference

    q, k, v, past_k, past_v, cache_length = (_view(d, p) for d, p in zip(input_desc, inputs))
    out = _view(output_desc[0], outputs[0])
    ext = torch.cuda.ExternalStream(stream)
    with torch.cuda.stream(ext):
        b, h, s, _ = q.shape
        slots = cache_length[:, None] + torch.arange(s, device=q.device)[None]
        rows = torch.arange(b, device=q.device)[:, None].expand(b, s)
        past_k[rows, :, slots] = k.permute(0, 2, 1, 3)
        past_v[rows, :, slots] = v.permute(0, 2, 1, 3)
        phase = "decode" if s == 1 else "prefill"
        policy = attrs[f"policy_{phase}"]
        plain = attrs["softcap"] == 0 and attrs["sliding_window"] == 0
        if s == 1 and plain and policy in ("dense", "sink_window"):
            from ...kernels.paged_decode import dense_decode
            from ...kernels.sink_window_decode import sink_window_decode

            seq_lens = cache_length + 1
            if policy == "dense" or attrs["policy_decode_window"] <= 0:
                res = dense_decode(q[:, :, 0], past_k, past_v, seq_lens, scale=attrs["scale"])
            else:
                res = sink_window_decode(q[:, :, 0], past_k, past_v, seq_lens, attrs["policy_decode_sink"],
                                         attrs["policy_decode_window"], scale=attrs["scale"])
            out.copy_(res.reshape(out.shape).to(out.dtype))
        else:
            # the new K/V are already in place: the reference gets zero new tokens and attends over them
            res, _, _ = kv_attention_reference(q, k[:, :, :0], v[:, :, :0], past_k, past_v, cache_length, attrs)
            out.copy_(res)
