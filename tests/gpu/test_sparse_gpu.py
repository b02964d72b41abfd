"""GPU-only: compiled Triton kernels at realistic sizes == references, and the runtime using them."""

import pytest
import torch

from kvconvert.kernels import (
    all_pages,
    block_importance,
    block_sparse_prefill,
    block_sparse_prefill_reference,
    dense_decode,
    page_summaries,
    paged_decode,
    paged_decode_reference,
    score_pages,
    select_blocks,
    select_pages,
    sink_window_decode,
    sink_window_decode_reference,
)

pytestmark = pytest.mark.gpu
TOL = {torch.float16: {"atol": 3e-3, "rtol": 3e-3}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
       torch.float32: {"atol": 1e-4, "rtol": 1e-4}}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads, kv_heads", [(32, 32), (32, 8), (32, 4)])
def test_paged_decode_long_context_split_kv(dtype, heads, kv_heads):
    torch.manual_seed(0)
    b, d, page, lmax = 2, 128, 16, 32768
    q = torch.randn(b, heads, d, device="cuda", dtype=dtype)
    k = torch.randn(b, kv_heads, lmax, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    lens = torch.tensor([lmax, 20001], dtype=torch.int32, device="cuda")
    kmin, kmax = page_summaries(k, lens, page)
    sel = select_pages(score_pages(q, kmin, kmax), lens, page, 256, 1, 2)
    want = paged_decode_reference(q, k, v, *sel.args())
    for splits in (None, 1, 16):
        torch.testing.assert_close(paged_decode(q, k, v, *sel.args(), num_splits=splits).float(), want.float(),
                                   **TOL[dtype])
    full = all_pages(lens, page, kv_heads)
    torch.testing.assert_close(dense_decode(q, k, v, lens).float(),
                               paged_decode_reference(q, k, v, *full.args()).float(), **TOL[dtype])
    torch.testing.assert_close(sink_window_decode(q, k, v, lens, 4, 4096).float(),
                               sink_window_decode_reference(q, k, v, lens, 4, 4096).float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_sparse_prefill_4k(dtype):
    torch.manual_seed(1)
    q = torch.randn(1, 32, 4096, 128, device="cuda", dtype=dtype)
    k = torch.randn(1, 8, 4096, 128, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    sel = select_blocks(block_importance(q, k, 64), 4096, 4096, 64, mass=0.9)
    torch.testing.assert_close(block_sparse_prefill(q, k, v, *sel.args()).float(),
                               block_sparse_prefill_reference(q, k, v, *sel.args()).float(), **TOL[dtype])


def test_runtime_uses_kernels_and_select_all_equals_dense():
    from tiny_models import tiny_model

    import kvconvert

    model = tiny_model("llama", 2).cuda().eval()
    ids = torch.randint(3, 150, (1, 200), device="cuda")
    policy = "page_topk:page=16,keep=1.0,dense_below=0+block_sparse_prefill:tile=64,mass=1.0,dense_below=0"
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        with kvconvert.sparse(model, policy) as s:
            got = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert s.use_kernels and torch.equal(got, want)
