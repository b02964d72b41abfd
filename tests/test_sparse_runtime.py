"""`kvconvert.sparse(model, policy)` on every registered architecture (tiny random models)."""

import pytest
import torch
from tiny_models import tiny_model

import kvconvert
from kvconvert.errors import UserError
from kvconvert.kernels import page_summaries
from kvconvert.models import registered_model_types
from kvconvert.runtime.sparse.state import PageSummaryCache

SELECT_ALL = "page_topk:page=16,keep=1.0,dense_below=0+block_sparse_prefill:tile=64,mass=1.0,dense_below=0"


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 150, (1, 150), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", registered_model_types())
def test_select_all_policy_equals_dense(model_type, ids):
    model = tiny_model(model_type).eval()
    with torch.no_grad():
        want = model(ids).logits
        want_gen = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        before = model.config._attn_implementation
        with kvconvert.sparse(model, SELECT_ALL):
            got = model(ids).logits
            got_gen = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert torch.equal(got_gen, want_gen)
    assert model.config._attn_implementation == before


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_sparse_policies_read_less_and_change_the_output(kv_heads, ids):
    model = tiny_model("llama", kv_heads).eval()
    with torch.no_grad():
        dense = model(ids).logits
        with kvconvert.sparse(model, "page_topk:page=16,keep=0.25,dense_below=0") as s:
            model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        frac = s.stats()["decode"]["kv_read_fraction"]
        assert frac < 0.45 and s.stats()["prefill"]["kv_read_fraction"] == 1.0
        with kvconvert.sparse(model, "sink_window:sink=4,window=16") as s:
            windowed = model(ids).logits
        assert not torch.allclose(windowed, dense, atol=1e-3)
        torch.testing.assert_close(windowed[:, :16], dense[:, :16], atol=2e-5, rtol=1e-4)
        with kvconvert.sparse(model, "block_sparse_prefill:tile=64,density=0.5,dense_below=0,sink_blocks=0") as s:
            model(ids)
        assert s.stats()["prefill"]["kv_read_fraction"] < 1.0


def test_decode_selection_uses_incremental_summaries():
    torch.manual_seed(0)
    keys = torch.randn(2, 2, 90, 8)
    cache = PageSummaryCache(16)
    cache.refresh(keys[:, :, :40], 40)
    for n in range(41, 91):
        kmin, kmax = cache.refresh(keys[:, :, :n], 1)
    want_min, want_max = page_summaries(keys, torch.tensor([90, 90]), 16)
    assert torch.equal(kmin, want_min) and torch.equal(kmax, want_max)


def test_bad_use_is_a_clear_error(ids):
    model = tiny_model("llama", 2).eval()
    with pytest.raises(UserError, match="dense_layers"), kvconvert.sparse(model, "page_topk:dense_layers=[7]"):
        pass
    mask = torch.ones_like(ids)
    mask[:, :3] = 0
    with pytest.raises(UserError, match="unpadded"), torch.no_grad(), \
            kvconvert.sparse(model, "page_topk:dense_below=0"):
        model(ids, attention_mask=mask)
    assert model.config._attn_implementation != "kvconvert_sparse"


def test_latent_model_runs_sparse(tiny_folder, tmp_path, ids):
    """A latent-KV model (keys rebuilt from the cached latents) under sparse attention."""
    from kvconvert.convert.latent import LatentConfig, fit_latent

    calib = [torch.randint(3, 150, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    result = fit_latent(str(tiny_folder("llama", 2)), LatentConfig(evaluate=False, kv_ratio=0.5), tmp_path / "lat",
                        calib=calib, progress=False)
    model = kvconvert.load_latent(result.out).eval()
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        with kvconvert.sparse(model, SELECT_ALL):
            got = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        with kvconvert.sparse(model, "page_topk:page=16,keep=0.25,dense_below=0") as s:
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert s.stats()["decode"]["kv_read_fraction"] < 0.45
