import pytest
import torch

from kvconvert.errors import UserError
from kvconvert.models import describe, get_adapter, gqa_capable_model_types, registered_model_types
from tiny_models import MHA_ONLY, TINY, tiny_model


def test_every_registered_adapter_has_a_tiny_model():
    missing = set(registered_model_types()) - set(TINY)
    assert not missing, f"registered adapters without a tiny test model: {missing}"


def test_required_architectures_registered():
    need = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2"}
    assert need <= set(gqa_capable_model_types())
    assert MHA_ONLY <= set(registered_model_types()) - set(gqa_capable_model_types())


@pytest.mark.parametrize("model_type", registered_model_types())
def test_view_matches_the_real_module(model_type):
    """Names, head counts and biases of the view are those of the instantiated transformers model."""
    model = tiny_model(model_type)
    view = describe(model.config)
    params = dict(model.named_parameters())
    pre = view.layer_prefix(0)
    assert f"{pre}.{view.names.o}.weight" in params
    if view.fused_qkv:
        w = params[f"{pre}.{view.names.qkv}.weight"]
        rows = w.shape[1] if model_type == "gpt2" else w.shape[0]  # gpt2 uses Conv1D (in, out)
        assert rows == (view.num_heads + 2 * view.num_kv_heads) * view.head_dim
    else:
        assert params[f"{pre}.{view.names.q}.weight"].shape[0] == view.num_heads * view.head_dim
        for proj, has_bias in (("k", view.k_bias), ("v", view.v_bias)):
            name = getattr(view.names, proj)
            assert params[f"{pre}.{name}.weight"].shape[0] == view.num_kv_heads * view.head_dim
            assert (f"{pre}.{name}.bias" in params) == has_bias
        assert (f"{pre}.{view.names.q}.bias" in params) == view.q_bias
        assert (f"{pre}.{view.names.o}.bias" in params) == view.o_bias
    if view.qk_norm:
        assert f"{pre}.{view.names.k_norm}.weight" in params
    assert all(f"{view.layer_prefix(i)}.{view.names.o}.weight" in params for i in range(view.num_layers))
    assert f"{view.layer_prefix(view.num_layers)}.{view.names.o}.weight" not in params


@pytest.mark.parametrize("model_type", registered_model_types())
def test_kv_bytes_formula_and_real_cache(model_type):
    """KV bytes/token = 2 x layers x kv_heads x head_dim x dtype bytes, and equals what the cache allocates."""
    model = tiny_model(model_type)
    view = describe(model.config)
    assert view.kv_bytes_per_token("bf16") == 2 * view.num_layers * view.num_kv_heads * view.head_dim * 2
    assert view.kv_bytes_per_token("fp32") == 2 * view.num_layers * view.num_kv_heads * view.head_dim * 4
    tokens = 9
    out = model(torch.randint(3, 100, (1, tokens)), use_cache=True)
    cache = out.past_key_values
    allocated = 0
    for layer in cache.layers:
        allocated += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    assert allocated == view.kv_bytes_per_token("fp32") * tokens


def test_unknown_model_type_is_one_clear_line():
    with pytest.raises(UserError, match="unsupported model_type 'mamba'"):
        get_adapter("mamba")


def test_mha_only_classes_say_why():
    view = describe(tiny_model("gpt2").config)
    assert not view.supports_gqa and "num_key_value_heads" in view.gqa_note
