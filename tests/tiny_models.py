"""Tiny random models, one config per registered architecture (the test grid comes from the registry)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=160,
              max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)

# model_type -> extra config kwargs. Every registered model_type must appear here (see test_registry).
TINY: dict[str, dict] = {
    "llama": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    "mistral": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "phi3": dict(num_attention_heads=4, num_key_value_heads=4),
    "gemma": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    "gemma2": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                   sliding_window=64),
    "gpt2": dict(n_embd=64, n_head=4, n_layer=2, vocab_size=160, n_positions=512, bos_token_id=1, eos_token_id=2),
    "opt": dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=96, vocab_size=160,
                word_embed_proj_dim=64, max_position_embeddings=512),
    "gpt_neox": dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96,
                     vocab_size=160, max_position_embeddings=512),
    # kvconvert fit-latent output (full-rank latents, qwen2 base: K/V biases); registered on `import kvconvert`
    "kvconvert_latent": dict(base_model_type="qwen2", num_attention_heads=4, num_key_value_heads=2),
}
MHA_ONLY = {"gpt2", "opt", "gpt_neox"}


def tiny_config(model_type: str, num_kv_heads: int | None = None, **overrides):
    kwargs = dict(TINY[model_type]) if model_type in MHA_ONLY else {**COMMON, **TINY[model_type]}
    if num_kv_heads is not None:
        kwargs["num_key_value_heads"] = num_kv_heads
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, num_kv_heads: int | None = None, seed: int = 0, **overrides):
    """A random fp32 model; weights are re-drawn so biases and norms are non-trivial."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_kv_heads, **overrides),
                                             dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


def save_tiny(model, folder, tokenizer=None, max_shard_size: str | None = None):
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def tiny_tokenizer():
    """A character-level fast tokenizer whose ids fit the tiny models' 160-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def perturbed_pair(model_type: str = "llama", scale: float = 0.05, seed: int = 1):
    """(student, teacher): a tiny model and a copy whose attention weights carry seeded noise (something to heal)."""
    import copy

    import torch

    teacher = tiny_model(model_type)
    student = copy.deepcopy(teacher)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "self_attn" in name:
                p.add_(scale * torch.randn_like(p))
    return student, teacher
