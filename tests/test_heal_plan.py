"""The heal memory plan: arithmetic on config.json (no weights), checked against real parameter counts."""

import json

import pytest

from kvconvert.convert.heal_plan import heal_memory_plan, parameter_counts
from tiny_models import TINY, tiny_model

LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
             "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False}
LLAMA2_70B = {**LLAMA2_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
              "num_key_value_heads": 8, "num_hidden_layers": 80}


@pytest.mark.parametrize("config, known", [(LLAMA2_7B, 6.74e9), (LLAMA2_70B, 6.9e10)])
def test_plan_parameter_counts_of_7b_and_70b(config, known):
    plan = heal_memory_plan(config, 1, "none")
    assert plan.parameters == pytest.approx(known, rel=5e-3)
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    assert plan.trainable == layers * (2 * h * h + 2 * h * kv)  # q, o square; k, v [kv, h]
    assert plan.params == 4 * plan.parameters and plan.optimizer == 8 * plan.trainable
    assert f"{plan.parameters / 1e9:.2f}B parameters" in plan.line()


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_plan_counts_equal_the_models_parameters(model_type):
    from kvconvert.convert.heal import trainable_parameters

    model = tiny_model(model_type)
    counts = parameter_counts(model.config.to_dict())
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["attention"] == sum(p.numel() for _, p in trainable_parameters(model, "attention"))


def test_plan_scales_with_world_size_and_settings():
    one = heal_memory_plan(LLAMA2_70B, 1, "none", batch=8, seqlen=2048)
    ddp = heal_memory_plan(LLAMA2_70B, 8, "ddp", batch=8, seqlen=2048)
    fsdp = heal_memory_plan(LLAMA2_70B, 8, "fsdp", batch=8, seqlen=2048)
    for term in ("params", "grads", "optimizer", "teacher"):
        assert getattr(ddp, term) == getattr(one, term)
        assert getattr(fsdp, term) == pytest.approx(getattr(one, term) / 8)
    assert ddp.activations < one.activations  # one sequence per rank instead of eight
    assert fsdp.activations > ddp.activations  # plus one all-gathered layer
    small = heal_memory_plan(LLAMA2_70B, 8, "fsdp", batch=8, seqlen=2048, autocast="bf16",
                             activation_checkpointing=True, kd_chunk=512)
    assert small.activations < 0.5 * fsdp.activations and small.params == fsdp.params
    every = heal_memory_plan(LLAMA2_70B, 8, "fsdp", trainable="all", batch=8, seqlen=2048)
    assert every.trainable == every.parameters and every.total > fsdp.total
    cpu, gpu = (heal_memory_plan(LLAMA2_7B, 1, "none", device=d) for d in ("cpu", "cuda"))
    assert cpu.teacher == 4 * cpu.parameters and gpu.teacher == 2 * gpu.parameters  # as the pass loads it
    gqa = {**LLAMA2_7B, "num_key_value_heads": 8}  # a GQA student of the MHA teacher
    mixed = heal_memory_plan(gqa, 1, "none", teacher=LLAMA2_7B)
    assert mixed.parameters == gpu.parameters - 32 * 2 * 4096 * (4096 - 1024) and mixed.teacher == gpu.teacher


def test_cli_plan_reads_only_config_json(cli, tmp_path):
    folder = tmp_path / "llama-70b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA2_70B))  # no weights at all
    code, out, err = cli("heal", folder, "--teacher", folder, "--out", tmp_path / "o", "--plan", "--world-size", "8",
                         "--parallel", "fsdp", "--device", "cuda", "--batch", "8", "--seqlen", "2048")
    assert code == 0, err
    assert out.startswith("heal memory plan: 68.98B parameters") and "8 x fsdp" in out and out.count("\n") == 1
    assert not (tmp_path / "o").exists()
    code, out, _ = cli("heal", folder, "--teacher", folder, "--out", tmp_path / "o", "--plan", "--json")
    assert code == 0 and json.loads(out)["parameters"] == 68976648192
    code, _, err = cli("heal", folder, "--teacher", folder, "--out", tmp_path / "o", "--plan", "--world-size", "0")
    assert code == 2 and err.count("\n") == 1 and "--world-size" in err
