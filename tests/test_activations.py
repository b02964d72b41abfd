import torch

from kvconvert.convert.activations import attention_input_grams, attention_inputs
from kvconvert.models import describe
from tiny_models import tiny_model


def test_gram_equals_xtx_of_captured_inputs():
    model = tiny_model("qwen2")
    view = describe(model.config)
    batches = [torch.randint(3, 150, (1, 12)) for _ in range(3)]
    grams, n = attention_input_grams(model, view, batches, progress=False)
    xs = attention_inputs(model, view, batches)
    assert n == 36
    for layer in range(view.num_layers):
        x = xs[layer].double()
        assert x.shape == (36, view.hidden_size)
        torch.testing.assert_close(grams[layer], x.T @ x)
        k = model.model.layers[layer].self_attn.k_proj
        ref = x.float() @ k.weight.T + k.bias  # the captured x really is what k_proj sees
        assert ref.shape == (36, view.num_kv_heads * view.head_dim)
