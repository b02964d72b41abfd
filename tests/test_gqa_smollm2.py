"""Real-weights end-to-end checks of mha-to-gqa on SmolLM2-135M (9 query heads, 3 KV heads)."""

import pytest
import torch

from gqa_helpers import expand_kv, logits_of
from kvconvert.convert.gqa import GQAConfig, mha_to_gqa

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def ids(smollm2_source):
    tok = smollm2_source.load_tokenizer()
    return tok("The quick brown fox jumps over the lazy dog. " * 3, return_tensors="pt")["input_ids"]


@pytest.fixture(scope="module")
def reference(smollm2_model, ids):
    with torch.no_grad():
        return smollm2_model(ids).logits


def test_groups_equal_kv_heads_reproduces_logits(smollm2_source, reference, ids, tmp_path):
    res = mha_to_gqa(smollm2_source, GQAConfig(groups=3, evaluate=False), tmp_path / "g3", progress=False)
    assert torch.equal(logits_of(res.out, ids), reference)


def test_expand_to_mha_and_merge_back(smollm2_source, reference, ids, tmp_path):
    wide = expand_kv(smollm2_source.path, tmp_path / "mha", 9)
    res = mha_to_gqa(str(wide), GQAConfig(groups=3, method="mean", evaluate=False), tmp_path / "g3",
                     progress=False)
    torch.testing.assert_close(logits_of(res.out, ids), reference, rtol=1e-4, atol=1e-4)
