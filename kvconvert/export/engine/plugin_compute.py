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
        b, _, s, _ = q.shape
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


_LATENT_WEIGHTS: dict = {}


def _write_rows(buffer, new, cache_length) -> None:
    """In place: new [B, 1, S, R] into buffer [B, 1, T, R] at slots cache_length[b] + s."""
    import torch

    b, _, s, _ = new.shape
    slots = cache_length[:, None] + torch.arange(s, device=new.device)[None]
    rows = torch.arange(b, device=new.device)[:, None].expand(b, s)
    buffer[rows, 0, slots] = new[:, 0]


def kv_latent_attention_step(trt, attrs: dict[str, Any], input_desc, output_desc, inputs, outputs, stream) -> None:
    """KVLatentAttention: write the new latents into the aliased buffers, then a decode step (S == 1, dense or
    sink-window, no soft-capping / model window) runs `kernels.latent_decode` on the latents; every other call
    (prefill, page_topk, soft-capping) the op's eager reference (keys and values rebuilt for the T slots)."""
    import torch

    from ...export.onnx.latent_op import kv_latent_attention_reference, latent_io, rotate
    from ...kernels.latent_decode import LatentWeights, latent_decode

    joint = bool(attrs["joint_kv"])
    names = latent_io(joint)[0]
    x = {n: _view(d, p) for n, d, p in zip(names, input_desc, inputs)}
    out = _view(output_desc[0], outputs[0])
    ext = torch.cuda.ExternalStream(stream)
    with torch.cuda.stream(ext):
        cl = x["cache_length"]
        q = x["query"]
        if joint:
            _write_rows(x["past_kv_latent"], x["kv_latent"], cl)
            c_k = c_v = x["past_kv_latent"]
        else:
            _write_rows(x["past_key_latent"], x["key_latent"], cl)
            _write_rows(x["past_value_latent"], x["value_latent"], cl)
            c_k, c_v = x["past_key_latent"], x["past_value_latent"]
        s = q.shape[2]
        policy = attrs["policy_decode"] if s == 1 else attrs["policy_prefill"]
        plain = attrs["softcap"] == 0 and attrs["sliding_window"] == 0
        res = None
        if s == 1 and plain and policy in ("dense", "sink_window"):
            key = tuple(x[n].data_ptr() for n in ("k_up", "v_up", "rope_cos", "k_bias", "k_norm_weight"))
            w = _LATENT_WEIGHTS.get(key)
            if w is None:  # engine weights never move: the prepared tables are made once per layer
                w = _LATENT_WEIGHTS[key] = LatentWeights.from_op_inputs(
                    attrs, x["k_up"], x["k_bias"], x["v_up"], x["v_bias"], x["k_norm_weight"], x["rope_cos"],
                    x["rope_sin"])
            q_rot = rotate(q, x["rope_cos"][cl][:, None, None], x["rope_sin"][cl][:, None, None])[:, :, 0]
            window = attrs["policy_decode_window"] if policy == "sink_window" else 0
            try:
                res = latent_decode(q_rot.contiguous(), c_k, c_v, cl + 1, w,
                                    sink=attrs["policy_decode_sink"] if window else 0, window=window, scale=attrs["scale"])
            except Exception as exc:  # triton OutOfResources: ranks too wide for this GPU's shared memory
                if type(exc).__name__ != "OutOfResources":
                    raise
            if res is not None:
                out.copy_(res.reshape(out.shape).to(out.dtype))
        if res is None:
            # the new latents are already in place: the reference gets zero new rows and attends over the buffers
            weights = [x[n] for n in names[names.index("k_up"):]]
            new = [x[n][:, :, :0] for n in (("kv_latent",) if joint else ("key_latent", "value_latent"))]
            past = [c_k] if joint else [c_k, c_v]
            res = kv_latent_attention_reference(q, *new, *past, cl, *weights, attrs=attrs)[0]
            out.copy_(res)
