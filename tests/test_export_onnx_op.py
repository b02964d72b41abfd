"""kvconvert::KVAttention: the ONNX function body (run by ONNX Runtime) equals the PyTorch reference."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from kvconvert.export.onnx.attention_op import DOMAIN, OP_TYPE, kv_attention_reference, node_attributes
from kvconvert.export.onnx.function_body import INPUTS, OUTPUTS, kv_attention_function


def single_node_model(attrs: dict, opset: int = 17, page_topk: bool = False,
                      block_sparse: bool = False) -> onnx.ModelProto:
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64 if n == "cache_length" else f,
                                            [None] if n == "cache_length" else [None] * 4) for n in INPUTS]
    outputs = [helper.make_tensor_value_info(n, f, [None] * 4) for n in OUTPUTS]
    node = helper.make_node(OP_TYPE, INPUTS, OUTPUTS, domain=DOMAIN, **attrs)
    graph = helper.make_graph([node], "kv_attention", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)],
                              functions=[kv_attention_function(sorted(attrs), opset, page_topk, block_sparse)])
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
    out, _, _ = kv_attention_reference(q, k, v, past_k, past_v, torch.tensor([4]), attrs)
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


PAGE_TOPK = {"kind": "page_topk", "decode": "page_topk", "decode_page": 4, "decode_keep": 0.4,
             "decode_sink_pages": 1, "decode_recent_pages": 1, "decode_dense_below": 8}


@pytest.mark.parametrize("opset", [17, 24])
@pytest.mark.parametrize("s,budget", [(1, 0), (1, 12), (3, 0)])
def test_page_topk_body_equals_kernel_selection(s, budget, opset):
    """Decode rows at/after dense_below read only the selected pages; prefill and short rows stay dense."""
    torch.manual_seed(3)
    b, heads, kv, t, d = 3, 4, 2, 32, 8
    attrs = node_attributes(num_heads=heads, num_kv_heads=kv, head_dim=d, scale=d ** -0.5,
                            policy={**PAGE_TOPK, "decode_budget": budget})
    q = torch.randn(b, heads, s, d)
    k, v = torch.randn(b, kv, s, d), torch.randn(b, kv, s, d)
    past_k, past_v = torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    cache_length = torch.tensor([3, 21, 28])
    ref = kv_attention_reference(q, k, v, past_k, past_v, cache_length, attrs)
    dense = kv_attention_reference(q, k, v, past_k, past_v, cache_length,
                                   {**attrs, "policy_decode_page": 0})
    model = single_node_model(attrs, opset, page_topk=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, dict(zip(INPUTS, [x.numpy() for x in (q, k, v, past_k, past_v, cache_length)])))
    np.testing.assert_allclose(got[0], ref[0].numpy(), atol=1e-5)
    differs = (ref[0] - dense[0]).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert differs.tolist() == ([False, True, True] if s == 1 else [False, False, False])


BLOCK_SPARSE = {"kind": "block_sparse_prefill", "prefill": "block_sparse_prefill", "prefill_tile": 4,
                "prefill_mass": 0.6, "prefill_sink_blocks": 1, "prefill_local_blocks": 1, "prefill_dense_below": 6}


@pytest.mark.parametrize("opset", [17, 24])
@pytest.mark.parametrize("s,density", [(11, 0.0), (13, 0.5), (4, 0.0), (1, 0.0)])
def test_block_sparse_body_equals_kernel_selection(s, density, opset):
    """Prefill steps of >= dense_below tokens read only the selected key blocks; shorter ones and decode stay dense."""
    torch.manual_seed(4)
    b, heads, kv, t, d = 2, 4, 2, 32, 8
    attrs = node_attributes(num_heads=heads, num_kv_heads=kv, head_dim=d, scale=d ** -0.5,
                            policy={**BLOCK_SPARSE, "prefill_density": density})
    q = torch.randn(b, heads, s, d)
    k, v = torch.randn(b, kv, s, d), torch.randn(b, kv, s, d)
    past_k, past_v = torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    cache_length = torch.tensor([0, 9])
    ref = kv_attention_reference(q, k, v, past_k, past_v, cache_length, attrs)
    dense = kv_attention_reference(q, k, v, past_k, past_v, cache_length, {**attrs, "policy_prefill_tile": 0})
    model = single_node_model(attrs, opset, block_sparse=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, dict(zip(INPUTS, [x.numpy() for x in (q, k, v, past_k, past_v, cache_length)])))
    np.testing.assert_allclose(got[0], ref[0].numpy(), atol=1e-5)
    assert bool((ref[0] - dense[0]).abs().max() > 1e-4) == (s >= 6)


def lowered_model(attrs: dict, opset: int, fused_ok: bool):
    """A one-node graph whose node carries the function overload the exporter would pick for `attrs`."""
    from kvconvert.export.onnx.function_body import layer_lowering

    low = layer_lowering(attrs, fused_ok)
    model = single_node_model(attrs, opset)
    del model.functions[:]
    model.functions.append(kv_attention_function(sorted(attrs), opset, lowering=low))
    model.graph.node[0].overload = low.overload
    model.ir_version = 10
    if low.fused:
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(model, full_check=True)
    return model, low


@pytest.mark.parametrize("opset", [17, 24])
@pytest.mark.parametrize("fused_ok", [True, False])
@pytest.mark.parametrize("heads,kv,s,softcap,window,policy,cache_length", [
    (4, 2, 3, 0.0, 0, None, [0, 7]), (4, 2, 1, 0.0, 0, None, [3, 12]), (6, 2, 5, 5.0, 4, None, [0, 9]),
    (2, 1, 2, 0.0, 3, None, [4, 0]), (4, 2, 1, 0.0, 0, SINK_WINDOW, [0, 7]), (4, 2, 4, 0.0, 0, SINK_WINDOW, [5, 2])])
def test_each_lowering_equals_reference(heads, kv, s, softcap, window, policy, cache_length, opset, fused_ok):
    """The per-layer function overloads (GroupQueryAttention for dense layers, the standard-op body with only the
    parts the layer uses) equal the reference on ragged cache_length, chunks included; the cache is updated in
    place when present_* is bound to past_*."""
    torch.manual_seed(0)
    b, t, d = 2, 16, 8
    attrs = node_attributes(num_heads=heads, num_kv_heads=kv, head_dim=d, scale=d ** -0.5, softcap=softcap,
                            sliding_window=window, policy=policy)
    q = torch.randn(b, heads, s, d)
    k, v = torch.randn(b, kv, s, d), torch.randn(b, kv, s, d)
    past_k, past_v = torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    cl = torch.tensor(cache_length)
    ref = kv_attention_reference(q, k, v, past_k, past_v, cl, attrs)
    model, low = lowered_model(attrs, opset, fused_ok)
    assert low.fused == (fused_ok and policy is None)
    ops = {n.op_type for n in model.functions[0].node}
    if not low.fused:
        assert ("Tanh" in ops) == (softcap > 0)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    past = [ort.OrtValue.ortvalue_from_numpy(x.numpy().copy()) for x in (past_k, past_v)]
    binding = sess.io_binding()
    binding.bind_output("output")
    for name, x in zip(INPUTS, (q, k, v, None, None, cl)):
        if x is not None:
            binding.bind_cpu_input(name, x.numpy())
    for name, present, value in zip(INPUTS[3:5], OUTPUTS[1:], past):
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(present, value)
    sess.run_with_iobinding(binding)
    np.testing.assert_allclose(binding.copy_outputs_to_cpu()[0], ref[0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(past[0].numpy(), ref[1].numpy())
    np.testing.assert_array_equal(past[1].numpy(), ref[2].numpy())
