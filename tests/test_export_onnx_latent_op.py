"""kvconvert::KVLatentAttention: the ONNX function body (run by ONNX Runtime) equals the PyTorch reference, and
the reference equals KVAttention on the keys/values rebuilt from the latents."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from kvconvert.export.onnx.attention_op import DOMAIN, attend, node_attributes
from kvconvert.export.onnx.latent_function_body import kv_latent_attention_function
from kvconvert.export.onnx.latent_op import (LATENT_OP_TYPE, kv_latent_attention_reference, latent_io,
                                             latent_node_attributes)


def single_node_model(attrs: dict, opset: int, page_topk: bool = False) -> onnx.ModelProto:
    joint = bool(attrs["joint_kv"])
    inputs, outputs = latent_io(joint)
    f = TensorProto.FLOAT
    rank = {"cache_length": 1, "k_bias": 1, "v_bias": 1, "k_norm_weight": 1, "k_up": 2, "v_up": 2, "rope_cos": 2,
            "rope_sin": 2}
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64 if n == "cache_length" else f, [None] * rank.get(n, 4))
           for n in inputs]
    outs = [helper.make_tensor_value_info(n, f, [None] * 4) for n in outputs]
    node = helper.make_node(LATENT_OP_TYPE, inputs, outputs, domain=DOMAIN, **attrs)
    graph = helper.make_graph([node], "kv_latent_attention", ins, outs)
    fn = kv_latent_attention_function(sorted(attrs), opset, joint, attrs["k_norm_eps"] > 0, page_topk)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)],
                              functions=[fn])
    model.ir_version = 8 if opset < 21 else 10
    onnx.checker.check_model(model, full_check=True)
    return model


def rope_tables(t: int, r: int):
    inv = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
    freqs = torch.arange(t).float()[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def make_inputs(joint, b=3, heads=4, kv=2, s=3, t=16, d=8, rk=5, rv=3, rotary=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)
    cos, sin = rope_tables(t, rotary)
    weights = [r(rk, kv * d), r(kv * d), r(rk if joint else rv, kv * d), r(kv * d), 1 + 0.1 * r(d), cos, sin]
    cache_length = torch.tensor([0, 6, 11][:b])
    if joint:
        return [r(b, heads, s, d), r(b, 1, s, rk), r(b, 1, t, rk), cache_length, *weights]
    return [r(b, heads, s, d), r(b, 1, s, rk), r(b, 1, s, rv), r(b, 1, t, rk), r(b, 1, t, rv), cache_length, *weights]


PAGE_TOPK = {"kind": "page_topk", "decode": "page_topk", "decode_page": 4, "decode_keep": 0.4,
             "decode_sink_pages": 1, "decode_recent_pages": 1, "decode_dense_below": 8}
SINK_WINDOW = {"kind": "sink_window", "decode": "sink_window", "decode_sink": 2, "decode_window": 3,
               "prefill": "sink_window", "prefill_sink": 1, "prefill_window": 4}


@pytest.mark.parametrize("opset", [17, 24])
@pytest.mark.parametrize("joint,s,eps,rotary,softcap,window,policy", [
    (False, 3, 0.0, 8, 0.0, 0, None), (True, 1, 1e-6, 8, 0.0, 0, None), (False, 1, 1e-6, 4, 5.0, 4, None),
    (True, 4, 0.0, 4, 0.0, 0, SINK_WINDOW), (False, 1, 0.0, 8, 0.0, 0, SINK_WINDOW),
    (False, 1, 0.0, 8, 0.0, 0, PAGE_TOPK)])
def test_latent_body_equals_reference(joint, s, eps, rotary, softcap, window, policy, opset):
    """Ragged cache_length [0, 6, 11]; separate and joint latents, QK-norm, partial rotary, softcap, policies."""
    inputs = make_inputs(joint, s=s, rotary=rotary)
    attrs = latent_node_attributes(joint_kv=joint, k_norm_eps=eps, num_heads=4, num_kv_heads=2, head_dim=8,
                                   scale=0.3, softcap=softcap, sliding_window=window, policy=policy)
    ref = kv_latent_attention_reference(*inputs, attrs=attrs)
    model = single_node_model(attrs, opset, page_topk=policy is PAGE_TOPK)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, dict(zip(latent_io(joint)[0], [x.numpy() for x in inputs])))
    assert len(got) == (2 if joint else 3)
    for name, r, g in zip(latent_io(joint)[1], ref, got):
        assert g.shape == tuple(r.shape), name
        np.testing.assert_allclose(g, r.numpy(), atol=2e-5, rtol=1e-5, err_msg=name)
    new, past = (inputs[1], inputs[2]) if joint else (inputs[1], inputs[3])
    for row, start in enumerate(inputs[3 if joint else 5].tolist()):
        np.testing.assert_array_equal(got[1][row, :, start:start + s], new[row].numpy())
        untouched = [j for j in range(past.shape[2]) if not start <= j < start + s]
        np.testing.assert_array_equal(got[1][row][:, untouched], past[row][:, untouched].numpy())


def _rotate_half_independent(x, pos, r, theta=10000.0):
    """RoPE written from its definition: pair (i, i + r/2) rotated by angle pos * theta^(-2i/r)."""
    out = x.clone()
    for i in range(r // 2):
        angle = pos.float() * theta ** (-2 * i / r)
        a, b = x[..., i], x[..., i + r // 2]
        out[..., i] = a * angle.cos() - b * angle.sin()
        out[..., i + r // 2] = a * angle.sin() + b * angle.cos()
    return out


def test_reference_is_kv_attention_on_rebuilt_keys_and_values():
    """Independent check: K = RoPE(norm(c_k @ k_up + b)) at each slot, V = c_v @ v_up + b, query rotated at
    cache_length + s, then plain KVAttention over those buffers."""
    b, heads, kv, s, t, d, rk, rv, rotary = 3, 4, 2, 2, 16, 8, 5, 3, 6
    q, ck, cv, pk, pv, cl, k_up, k_b, v_up, v_b, kn, cos, sin = make_inputs(False, b, heads, kv, s, t, d, rk, rv,
                                                                            rotary, seed=2)
    attrs = latent_node_attributes(joint_kv=False, k_norm_eps=1e-5, num_heads=heads, num_kv_heads=kv, head_dim=d,
                                   scale=d ** -0.5)
    out, present_k, present_v = kv_latent_attention_reference(q, ck, cv, pk, pv, cl, k_up, k_b, v_up, v_b, kn, cos,
                                                              sin, attrs=attrs)
    slots = torch.arange(t)
    keys = (present_k[:, 0] @ k_up + k_b).reshape(b, t, kv, d)
    keys = keys / torch.sqrt(keys.pow(2).mean(-1, keepdim=True) + 1e-5) * kn
    keys = _rotate_half_independent(keys.transpose(1, 2), slots[None, None, :], rotary)
    values = (present_v[:, 0] @ v_up + v_b).reshape(b, t, kv, d).transpose(1, 2)
    pos = cl[:, None] + torch.arange(s)[None]
    query = _rotate_half_independent(q, pos[:, None, :], rotary)
    plain = node_attributes(num_heads=heads, num_kv_heads=kv, head_dim=d, scale=d ** -0.5)
    want = attend(query, keys, values, cl, plain)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(present_k[1, :, 6:8], ck[1])
