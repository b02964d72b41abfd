"""kvconvert::KVAttention: the ONNX function body (run by ONNX Runtime) equals the PyTorch reference."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from kvconvert.export.onnx.attention_op import DOMAIN, OP_TYPE, kv_attention_reference, node_attributes
from kvconvert.export.onnx.function_body import INPUTS, OUTPUTS, kv_attention_function


def single_node_model(attrs: dict, opset: int = 17) -> onnx.ModelProto:
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64 if n == "cache_length" else f,
                                            [None] if n == "cache_length" else [None] * 4) for n in INPUTS]
    outputs = [helper.make_tensor_value_info(n, f, [None] * 4) for n in OUTPUTS]
    node = helper.make_node(OP_TYPE, INPUTS, OUTPUTS, domain=DOMAIN, **attrs)
    graph = helper.make_graph([node], "kv_attention", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)],
                              functions=[kv_attention_function(sorted(attrs), opset)])
    model.ir_version = 8 if opset < 21 else 10
    onnx.checker.check_model(model, full_check=True)
    return model


SINK_WINDOW = {"kind": "sink_window", "decode": "sink_window", "decode_sink": 2, "decode_window": 3,
               "prefill": "sink_window", "prefill_sink": 1, "prefill_window": 4}


@pytest.mark.parametrize("opset", [17, 24])
@pytest.mark.parametrize("heads,kv,s,softcap,window,policy", [
    (4, 2, 3, 0.0, 0, None), (4, 4, 1, 0.0, 0, None), (6, 2, 5, 5.0, 4, None), (2, 1, 2, 0.0, 3, None),
    (4, 2, 1, 0.0, 0, SINK_WINDOW), (4, 2, 4, 0.0, 0, SINK_WINDOW)])
def test_function_body_equals_reference(heads, kv, s, softcap, window, policy, opset):
    torch.manual_seed(0)
    b, t, d = 2, 16, 8
    attrs = node_attributes(num_heads=heads, num_kv_heads=kv, head_dim=d, scale=d ** -0.5, softcap=softcap,
                            sliding_window=window, policy=policy)
    q = torch.randn(b, heads, s, d)
    k, v = torch.randn(b, kv, s, d), torch.randn(b, kv, s, d)
    past_k, past_v = torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    cache_length = torch.tensor([0, 7])
    ref = kv_attention_reference(q, k, v, past_k, past_v, cache_length, attrs)
    sess = ort.InferenceSession(single_node_model(attrs, opset).SerializeToString(), providers=["CPUExecutionProvider"])
    feed = dict(zip(INPUTS, [x.numpy() for x in (q, k, v, past_k, past_v, cache_length)]))
    got = sess.run(None, feed)
    for name, r, g in zip(OUTPUTS, ref, got):
        assert g.shape == tuple(r.shape), name
        np.testing.assert_allclose(g, r.numpy(), atol=1e-5, err_msg=name)
    present_k = got[1]
    for row, start in enumerate(cache_length.tolist()):
        np.testing.assert_array_equal(present_k[row, :, start:start + s], k[row].numpy())
        untouched = [j for j in range(t) if not start <= j < start + s]
        np.testing.assert_array_equal(present_k[row][:, untouched], past_k[row][:, untouched].numpy())


def test_reference_is_causal_attention_over_written_slots():
    """Independent check of the reference: equals softmax attention over slots 0..cache_length+s."""
    torch.manual_seed(1)
    b, h, kv, s, t, d = 1, 4, 2, 3, 10, 8
    attrs = node_attributes(num_heads=h, num_kv_heads=kv, head_dim=d, scale=0.3)
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, kv, s, d), torch.randn(b, kv, s, d)
    past_k, past_v = torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    out, pk, pv = kv_attention_reference(q, k, v, past_k, past_v, torch.tensor([4]), attrs)
    keys = torch.cat([past_k[:, :, :4], k], 2).repeat_interleave(h // kv, 1)
    vals = torch.cat([past_v[:, :, :4], v], 2).repeat_interleave(h // kv, 1)
    mask = torch.ones(s, 4 + s, dtype=torch.bool).tril(4)
    expect = torch.nn.functional.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, expect.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_sink_window_mask_matches_the_sparse_kernel_rule():
    """key j visible from position t iff j <= t and (j < sink or t - j < window) (kvconvert.kernels)."""
    from kvconvert.export.onnx.attention_op import allowed_slots

    attrs = node_attributes(num_heads=2, num_kv_heads=1, head_dim=4, scale=1.0, policy=SINK_WINDOW)
    for s, (sink, window) in ((1, (2, 3)), (4, (1, 4))):
        got = allowed_slots(torch.tensor([5]), s, 12, attrs)[0]
        for r in range(s):
            t = 5 + r
            want = [j <= t and (j < sink or t - j < window) for j in range(12)]
            assert got[r].tolist() == want
