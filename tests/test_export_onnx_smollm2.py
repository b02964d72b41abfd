"""SmolLM2-135M exported to ONNX: greedy generation in ONNX Runtime == transformers, token for token."""

import pytest

from kvconvert.export.onnx import OrtGenerator

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]


def test_smollm2_greedy_32_tokens_equal(smollm2_source, smollm2_model, smollm2_onnx):
    # the built-in validation is exercised on the tiny grid; here the stronger check is 32 greedy tokens
    result = smollm2_onnx
    assert result.metrics["external_data"]
    tok = smollm2_source.load_tokenizer()
    ids = tok("Once upon a time, in a small village by the sea,", return_tensors="pt").input_ids
    ref = smollm2_model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                 pad_token_id=tok.eos_token_id)
    got = OrtGenerator(result.out).generate(ids, 32, eos_token_id=None)
    assert got.shape == (1, ids.shape[1] + 32) and tuple(ref.shape) == got.shape
    assert got[0].tolist() == ref[0].tolist()
