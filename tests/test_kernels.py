"""Triton kernels == eager references on the same selection (CPU: TRITON_INTERPRET=1; GPU: real kernels).

Random shapes over GQA ratios 1/4/8, ragged sequence lengths, odd head dims and page sizes, fp32/fp16/bf16.
"""

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from kvconvert.kernels import (
    all_blocks,
    all_pages,
    block_importance,
    block_sparse_prefill,
    block_sparse_prefill_reference,
    dense_decode,
    dense_decode_reference,
    page_summaries,
    paged_decode,
    paged_decode_reference,
    score_pages,
    select_blocks,
    select_pages,
    sink_window_decode,
    sink_window_decode_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.float16: {"atol": 2e-3, "rtol": 2e-3},
       torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def dtypes(seed: int) -> list:
    """fp32 always, then fp16 or bf16 alternately (the interpreter is slow; both are covered across seeds)."""
    return [torch.float32, torch.float16 if seed % 2 == 0 else torch.bfloat16]


def decode_case(seed: int):
    """Random decode problem: (q, k_cache, v_cache, seq_lens, page)."""
    rng = random.Random(seed)
    ratio = [1, 4, 8][seed % 3]
    hkv = rng.choice([1, 2])
    d = rng.choice([16, 32, 48, 64])
    page = rng.choice([16, 24, 32])
    b = rng.choice([1, 2, 3])
    lmax = rng.randint(page, 6 * page)
    lens = torch.tensor([rng.randint(1, lmax) for _ in range(b)], dtype=torch.int32)
    lens[0] = lmax
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * ratio, d, generator=g)
    k = torch.randn(b, hkv, lmax + rng.randint(0, 5), d, generator=g)
    v = torch.randn(k.shape, generator=g)
    return q, k, v, lens, page


def to(dtype, *ts):
    return [t.to(DEVICE, dtype) for t in ts]


@pytest.mark.parametrize("seed", range(15))
def test_paged_decode_matches_reference(seed):
    q, k, v, lens, page = decode_case(seed)
    kmin, kmax = page_summaries(k, lens, page)
    keep = torch.clamp((lens + page - 1) // page // 2, min=1)
    sel = select_pages(score_pages(q, kmin, kmax), lens, page, keep, sink_pages=1, recent_pages=1)
    args = [t.to(DEVICE) for t in sel.args()[:3]] + [page]
    for dtype in dtypes(seed):
        qq, kk, vv = to(dtype, q, k, v)
        want = paged_decode_reference(qq, kk, vv, *args)
        for splits in ((None, 1, 3) if dtype == torch.float32 else (None,)):
            got = paged_decode(qq, kk, vv, *args, num_splits=splits)
            assert got.dtype == dtype and got.shape == q.shape
            torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("seed", range(3))
def test_select_all_kernel_equals_dense(seed):
    q, k, v, lens, page = decode_case(100 + seed)
    want = dense_decode_reference(q, k, v, lens)
    sel = all_pages(lens, page, k.shape[1])
    qq, kk, vv = to(torch.float32, q, k, v)
    got = paged_decode(qq, kk, vv, *[t.to(DEVICE) for t in sel.args()[:3]], page)
    torch.testing.assert_close(got.cpu(), want, **TOL[torch.float32])
    torch.testing.assert_close(dense_decode(qq, kk, vv, lens.to(DEVICE), page_size=16).cpu(), want,
                               **TOL[torch.float32])


@pytest.mark.parametrize("seed", range(9))
def test_sink_window_decode_matches_reference(seed):
    q, k, v, lens, _ = decode_case(200 + seed)
    rng = random.Random(seed)
    sink, window = rng.choice([0, 1, 4]), rng.choice([1, 7, 40, 500])
    for dtype in dtypes(seed):
        qq, kk, vv = to(dtype, q, k, v)
        want = sink_window_decode_reference(qq, kk, vv, lens.to(DEVICE), sink, window)
        got = sink_window_decode(qq, kk, vv, lens.to(DEVICE), sink, window)
        torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def prefill_case(seed: int):
    rng = random.Random(seed)
    ratio = [1, 4, 8][seed % 3]
    hkv = 1 if ratio == 8 else rng.choice([1, 2])
    d = rng.choice([16, 32, 48])
    blk = rng.choice([16, 32])
    sq = rng.randint(1, 4 * blk)
    sk = sq + rng.choice([0, 0, rng.randint(1, 3 * blk)])
    g = torch.Generator().manual_seed(seed)
    b = 1 if ratio == 8 else rng.choice([1, 2])
    q = torch.randn(b, hkv * ratio, sq, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g)
    v = torch.randn(k.shape, generator=g)
    return q, k, v, blk


@pytest.mark.parametrize("seed", range(12))
def test_block_sparse_prefill_matches_reference(seed):
    q, k, v, blk = prefill_case(seed)
    sq, sk = q.shape[2], k.shape[2]
    mass = [0.3, 0.7, 0.95][seed % 3]
    sel = select_blocks(block_importance(q, k, blk), sq, sk, blk, mass=mass, sink_blocks=1, local_blocks=1)
    args = [t.to(DEVICE) for t in sel.args()[:2]] + [blk]
    for dtype in dtypes(seed):
        qq, kk, vv = to(dtype, q, k, v)
        want = block_sparse_prefill_reference(qq, kk, vv, *args)
        got = block_sparse_prefill(qq, kk, vv, *args)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("seed", range(3))
def test_block_sparse_select_all_equals_causal_attention(seed):
    q, k, v, blk = prefill_case(300 + seed)
    sq, sk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    mask = torch.arange(sk)[None, :] <= (sk - sq + torch.arange(sq))[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                            attn_mask=mask)
    sel = all_blocks(q.shape[0], k.shape[1], sq, sk, blk)
    got = block_sparse_prefill(*to(torch.float32, q, k, v), *[t.to(DEVICE) for t in sel.args()[:2]], blk)
    torch.testing.assert_close(got.cpu(), want, **TOL[torch.float32])


def test_cpu_outside_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, lens, page = decode_case(0)
    sel = all_pages(lens, page, k.shape[1])
    with pytest.raises(RuntimeError, match="CUDA tensors.*reference"):
        paged_decode(q, k, v, *sel.args())
    with pytest.raises(RuntimeError, match="CUDA"):
        sink_window_decode(q, k, v, lens, 4, 8)


def test_bad_shapes_are_rejected():
    q, k, v, lens, page = decode_case(1)
    sel = all_pages(lens, page, k.shape[1])
    with pytest.raises(ValueError, match="does not match"):
        paged_decode(*to(torch.float32, q[:, :, :8], k, v), *[t.to(DEVICE) for t in sel.args()[:3]], page)
    qp, kp, vp, blk = prefill_case(2)
    sel = all_blocks(qp.shape[0], kp.shape[1], qp.shape[2], kp.shape[2], blk)
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_prefill(*to(torch.float32, qp, kp, vp), *[t.to(DEVICE) for t in sel.args()[:2]], 24)


@pytest.mark.parametrize("page", [16, 24])
def test_paged_decode_split_kv_over_many_pages(page):
    g = torch.Generator().manual_seed(7)
    lens = torch.tensor([40 * page - 5, 13 * page], dtype=torch.int32)
    q = torch.randn(2, 8, 32, generator=g)
    k = torch.randn(2, 2, 40 * page, 32, generator=g)
    v = torch.randn(k.shape, generator=g)
    kmin, kmax = page_summaries(k, lens, page)
    sel = select_pages(score_pages(q, kmin, kmax), lens, page, torch.tensor([22, 9]), sink_pages=1, recent_pages=2)
    args = [t.to(DEVICE) for t in sel.args()[:3]] + [page]
    qq, kk, vv = to(torch.float32, q, k, v)
    want = paged_decode_reference(qq, kk, vv, *args)
    for splits in (1, 2, 3, 6):
        torch.testing.assert_close(paged_decode(qq, kk, vv, *args, num_splits=splits), want, **TOL[torch.float32])
