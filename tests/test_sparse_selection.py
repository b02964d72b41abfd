"""Selections: deterministic tie-breaking, forced pages/blocks, layout, and select-all == dense attention."""

import math

import pytest
import torch

from kvconvert.kernels import (
    all_blocks,
    all_pages,
    block_importance,
    block_sparse_prefill_reference,
    dense_decode_reference,
    page_summaries,
    paged_decode_reference,
    score_pages,
    select_blocks,
    select_pages,
    sink_window_decode_reference,
    sink_window_prefill_reference,
    update_page_summaries,
)
from kvconvert.kernels.sink_window_decode import sink_window_positions


def sdpa_decode(q, k, v, lens):
    """Per-sequence SDPA over the first seq_len cache positions, KV repeated per group (transformers' order)."""
    g = q.shape[1] // k.shape[1]
    outs = []
    for b, n in enumerate(lens.tolist()):
        kk = k[b:b + 1, :, :n].float().repeat_interleave(g, 1)
        vv = v[b:b + 1, :, :n].float().repeat_interleave(g, 1)
        outs.append(torch.nn.functional.scaled_dot_product_attention(q[b:b + 1, :, None].float(), kk, vv)[:, :, 0])
    return torch.cat(outs)


def test_summaries_are_min_max_and_update_on_append():
    torch.manual_seed(0)
    k = torch.randn(2, 3, 50, 8)
    lens = torch.tensor([50, 21])
    kmin, kmax = page_summaries(k, lens, 16)
    assert kmin.shape == (2, 3, 4, 8)
    assert torch.equal(kmin[0, :, 1], k[0, :, 16:32].amin(1))
    assert torch.equal(kmax[1, :, 1], k[1, :, 16:21].amax(1))
    assert torch.equal(kmin[1, :, 2], torch.zeros(3, 8))
    full_min, full_max = page_summaries(k, torch.tensor([50, 50]), 16)
    run_min, run_max = page_summaries(k[:, :, :21], torch.tensor([21, 21]), 16)
    run_min = torch.cat([run_min, torch.zeros(2, 3, 2, 8)], 2)
    run_max = torch.cat([run_max, torch.zeros(2, 3, 2, 8)], 2)
    for start, stop in [(21, 22), (22, 40), (40, 50)]:
        update_page_summaries(run_min, run_max, k[:, :, start:stop], start, 16)
    assert torch.equal(run_min, full_min) and torch.equal(run_max, full_max)


def test_score_is_quest_bound_and_group_max():
    torch.manual_seed(1)
    q = torch.randn(1, 4, 8)
    k = torch.randn(1, 2, 32, 8)
    kmin, kmax = page_summaries(k, torch.tensor([32]), 16)
    s = score_pages(q, kmin, kmax)
    exact = torch.einsum("bgrd,bgtd->bgrt", q.view(1, 2, 2, 8), k).view(1, 2, 2, 2, 16).amax(-1).amax(2)
    assert s.shape == (1, 2, 2) and bool((s >= exact - 1e-5).all())


def test_select_pages_ties_lower_index_first_and_forced():
    scores = torch.zeros(1, 1, 10)
    sel = select_pages(scores, torch.tensor([160]), 16, keep=5, sink_pages=1, recent_pages=2)
    assert sel.indices.tolist() == [[[0, 1, 2, 8, 9, -1, -1, -1, -1, -1]]]
    assert sel.counts.tolist() == [[5]] and sel.indices.dtype == torch.int32
    scores = torch.tensor([[[9.0, 5, 7, 7, 1, -2, 8, 0, 0, 0]]])
    sel = select_pages(scores, torch.tensor([150]), 16, keep=4, sink_pages=1, recent_pages=1)
    assert sel.indices[0, 0, :4].tolist() == [0, 2, 6, 9]
    sel = select_pages(scores, torch.tensor([40]), 16, keep=4, sink_pages=1, recent_pages=1)
    assert sel.indices[0, 0].tolist()[:4] == [0, 1, 2, -1] and sel.counts.tolist() == [[3]]


def test_select_pages_ragged_batch_never_picks_beyond_length():
    torch.manual_seed(2)
    scores = torch.randn(3, 2, 12)
    lens = torch.tensor([190, 33, 64])
    sel = select_pages(scores, lens, 16, keep=torch.tensor([6, 6, 2]), sink_pages=1, recent_pages=1)
    n = (lens + 15) // 16
    for b in range(3):
        for g in range(2):
            c = int(sel.counts[b, g])
            idx = sel.indices[b, g].tolist()
            assert idx[:c] == sorted(idx[:c]) and all(i == -1 for i in idx[c:])
            assert 0 in idx[:c] and int(n[b]) - 1 in idx[:c] and max(idx[:c]) < n[b]
    assert sel.counts[:, 0].tolist() == [6, 3, 2]


@pytest.mark.parametrize("h, hkv", [(4, 4), (8, 2), (8, 1)])
def test_select_all_equals_dense_decode(h, hkv):
    torch.manual_seed(3)
    lens = torch.tensor([77, 128, 5], dtype=torch.int32)
    q, k, v = torch.randn(3, h, 16), torch.randn(3, hkv, 130, 16), torch.randn(3, hkv, 130, 16)
    want = sdpa_decode(q, k, v, lens)
    sel = all_pages(lens, 16, hkv)
    torch.testing.assert_close(paged_decode_reference(q, k, v, *sel.args()), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_decode_reference(q, k, v, lens), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sink_window_decode_reference(q, k, v, lens, 4, 200), want, atol=1e-5, rtol=1e-5)
    kmin, kmax = page_summaries(k, lens, 16)
    sel = select_pages(score_pages(q, kmin, kmax), lens, 16, keep=100, sink_pages=1, recent_pages=1)
    torch.testing.assert_close(paged_decode_reference(q, k, v, *sel.args()), want, atol=1e-5, rtol=1e-5)


def test_paged_reference_reads_exactly_the_selected_tokens():
    torch.manual_seed(4)
    lens = torch.tensor([100], dtype=torch.int32)
    q, k, v = torch.randn(1, 4, 8), torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8)
    sel = select_pages(torch.randn(1, 2, 7), lens, 16, keep=3, sink_pages=1, recent_pages=1)
    out = paged_decode_reference(q, k, v, *sel.args())
    for g in range(2):
        toks = torch.cat([torch.arange(p * 16, min(p * 16 + 16, 100)) for p in sel.indices[0, g, :3].tolist()])
        want = sdpa_decode(q[:, 2 * g:2 * g + 2], k[:, g:g + 1, toks], v[:, g:g + 1, toks], torch.tensor([len(toks)]))
        torch.testing.assert_close(out[:, 2 * g:2 * g + 2], want, atol=1e-5, rtol=1e-5)


def test_sink_window_positions():
    pos, valid = sink_window_positions(torch.tensor([100, 6, 3]), sink=4, window=5)
    assert pos[0][valid[0]].tolist() == [0, 1, 2, 3, 95, 96, 97, 98, 99]
    assert pos[1][valid[1]].tolist() == [0, 1, 2, 3, 4, 5]
    assert pos[2][valid[2]].tolist() == [0, 1, 2]


@pytest.mark.parametrize("sq, sk, block", [(150, 150, 64), (100, 230, 64), (128, 128, 128)])
def test_select_all_blocks_equals_causal_attention(sq, sk, block):
    torch.manual_seed(5)
    q, k, v = torch.randn(2, 8, sq, 16), torch.randn(2, 2, sk, 16), torch.randn(2, 2, sk, 16)
    mask = torch.arange(sk)[None, :] <= (sk - sq + torch.arange(sq))[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                            attn_mask=mask)
    sel = all_blocks(2, 2, sq, sk, block)
    torch.testing.assert_close(block_sparse_prefill_reference(q, k, v, *sel.args()), want, atol=1e-5, rtol=1e-5)
    full = select_blocks(block_importance(q, k, block), sq, sk, block, mass=1.0)
    assert torch.equal(full.counts, sel.counts) and torch.equal(full.indices, sel.indices)
    torch.testing.assert_close(sink_window_prefill_reference(q, k, v, 4, 10 ** 6, chunk=48), want,
                               atol=1e-5, rtol=1e-5)


def test_sink_window_prefill_matches_a_mask():
    torch.manual_seed(6)
    q, k, v = torch.randn(1, 2, 90, 8), torch.randn(1, 1, 90, 8), torch.randn(1, 1, 90, 8)
    t, j = torch.arange(90)[:, None], torch.arange(90)[None, :]
    mask = (j <= t) & ((j < 3) | (t - j < 10))
    want = torch.nn.functional.scaled_dot_product_attention(q, k.expand(1, 2, 90, 8), v.expand(1, 2, 90, 8),
                                                            attn_mask=mask)
    torch.testing.assert_close(sink_window_prefill_reference(q, k, v, 3, 10, chunk=32), want, atol=1e-5, rtol=1e-5)


def test_block_selection_forced_mass_and_density():
    torch.manual_seed(7)
    sq = sk = 64 * 8
    q, k = torch.randn(1, 4, sq, 16), torch.randn(1, 2, sk, 16)
    probs = block_importance(q, k, 64)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 2, 8))
    sel = select_blocks(probs, sq, sk, 64, mass=0.6, sink_blocks=1, local_blocks=2)
    for i in range(8):
        c = int(sel.counts[0, 0, i])
        idx = sel.indices[0, 0, i].tolist()
        assert idx[:c] == sorted(idx[:c]) and max(idx[:c]) <= i and all(x == -1 for x in idx[c:])
        assert {0, i, max(i - 1, 0)} <= set(idx[:c])
        kept_mass = float(probs[0, 0, i, idx[:c]].sum())
        assert kept_mass >= 0.6 - 1e-6 or c == i + 1
    dens = select_blocks(probs, sq, sk, 64, mass=None, density=0.5, sink_blocks=1, local_blocks=1)
    allowed = torch.arange(1, 9)
    want = torch.maximum(torch.ceil(0.5 * allowed.double()).long(), torch.tensor([1, 2, 2, 2, 2, 2, 2, 2]))
    assert dens.counts[0, 0].tolist() == want.tolist()
    tie = select_blocks(torch.full((1, 1, 4, 4), 0.25), 256, 256, 64, mass=None, density=0.75,
                        sink_blocks=0, local_blocks=1)
    assert tie.indices[0, 0, 3].tolist() == [0, 1, 3, -1]
    assert math.isclose(float(tie.counts.float().mean()), (1 + 2 + 3 + 3) / 4)
