import copy

import pytest
import torch

from kvconvert.convert.heal import HealConfig, heal, heal_batches, kd_loss, trainable_parameters
from kvconvert.errors import UserError
from tiny_models import perturbed_pair


def _pair():
    return perturbed_pair()


def _kl(student, teacher, ids):
    with torch.no_grad():
        return float(kd_loss(student(ids).logits, teacher(ids).logits))


def test_heal_lowers_kl_and_only_trains_attention():
    student, teacher = _pair()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    data = [torch.randint(3, 150, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(40)]
    held = torch.randint(3, 150, (8, 32), generator=torch.Generator().manual_seed(99))
    kl0 = _kl(student, teacher, held)
    out = heal(student, teacher, HealConfig(steps=40, lr=3e-3, batch=4, seqlen=32), calib=data, progress=False)
    assert len(out["losses"]) == out["steps"] == 40 and out["seconds"] >= 0
    assert _kl(student, teacher, held) < 0.75 * kl0
    assert out["losses"][-1] < out["losses"][0]
    for n, p in student.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == ("self_attn" in n), n
        assert p.requires_grad  # flags restored
    assert all(not p.requires_grad for p in teacher.parameters())


def test_heal_all_trains_mlp_and_zero_steps_is_noop():
    student, teacher = _pair()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    assert heal(student, teacher, HealConfig(steps=0))["losses"] == []
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())
    data = [torch.randint(3, 150, (1, 16))]
    heal(student, teacher, HealConfig(steps=2, trainable="all", batch=1, seqlen=16), calib=lambda: data,
         progress=False)
    assert not torch.equal(student.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])


def test_heal_needs_data_and_finds_attention():
    student, teacher = _pair()
    with pytest.raises(UserError):
        heal(student, teacher, HealConfig(steps=1))
    names = [n for n, _ in trainable_parameters(student, "attention")]
    assert names and all(".self_attn." in n for n in names)
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= {n.split(".")[-2] for n in names}


def test_heal_batches_cycle_short_text(tiny_tok, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 20)
    cfg = HealConfig.parse({"steps": 10, "batch": 3, "seqlen": 16, "calib": {"source": str(text)}})
    batches = heal_batches(tiny_tok, cfg)
    assert len(batches) == 30 and all(b.shape == (1, 16) for b in batches)
    assert heal_batches(tiny_tok, cfg)[0].tolist() == batches[0].tolist()  # seeded


def test_chunked_kd_and_hidden_matching_losses():
    """The chunked KD loss equals the whole-batch one; hidden-state matching adds a term that heals too."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 37, 50, generator=g), torch.randn(2, 37, 50, generator=g)
    whole = kd_loss(s, t, 2.0)
    for chunk in (1, 8, 37, 100):
        torch.testing.assert_close(kd_loss(s, t, 2.0, chunk=chunk), whole, rtol=1e-5, atol=1e-7)
    student, teacher = _pair()
    data = [torch.randint(3, 150, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    a = heal(copy.deepcopy(student), teacher, HealConfig(steps=3, batch=2, seqlen=32, kd_chunk=16), calib=data,
             progress=False)
    b = heal(copy.deepcopy(student), teacher, HealConfig(steps=3, batch=2, seqlen=32), calib=data, progress=False)
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    c = heal(student, teacher, HealConfig(steps=12, lr=3e-3, batch=2, seqlen=32, hidden_weight=1.0), calib=data,
             progress=False)
    assert c["losses"][0] > c["kd_losses"][0] and c["losses"][-1] < c["losses"][0]
    assert c["teacher_seconds"] > 0 and c["tokens"] == 12 * 2 * 32


def test_interrupted_heal_resumes_to_the_same_weights(tmp_path):
    student, teacher = _pair()
    data = [torch.randint(3, 150, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(5)]
    cfg = HealConfig(steps=6, lr=3e-3, batch=2, seqlen=32, save_every=2)
    whole = copy.deepcopy(student)
    ref = heal(whole, teacher, cfg, calib=data, progress=False)
    cut = copy.deepcopy(student)
    heal(cut, teacher, cfg, calib=data, progress=False, state_dir=tmp_path, on_step=lambda step, loss: step == 3)
    resumed = copy.deepcopy(student)  # a restart loads the original student again
    out = heal(resumed, teacher, cfg, calib=data, progress=False, state_dir=tmp_path, resume=True)
    assert out["losses"] == pytest.approx(ref["losses"], rel=1e-6) and len(out["losses"]) == 6
    for (n, a), b in zip(whole.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
    with pytest.raises(UserError, match="other settings"):
        heal(copy.deepcopy(student), teacher, cfg.merged({"lr": 1e-3}), calib=data, progress=False,
             state_dir=tmp_path, resume=True)


def test_activation_checkpointing_and_chunked_loss_keep_the_losses():
    """Recomputing each decoder layer in backward (and the chunked KD loss) changes no loss and no update."""
    from kvconvert.convert.heal_distributed import decoder_layers

    student, teacher = _pair()
    data = [torch.randint(3, 150, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    cfg = HealConfig(steps=4, lr=3e-3, batch=2, seqlen=32, hidden_weight=0.5)
    plain_model = copy.deepcopy(student)
    plain = heal(plain_model, teacher, cfg, calib=data, progress=False)
    for merged in ({"activation_checkpointing": True}, {"activation_checkpointing": True, "kd_chunk": 7}):
        model = copy.deepcopy(student)
        out = heal(model, teacher, cfg.merged(merged), calib=data, progress=False)
        assert out["losses"] == pytest.approx(plain["losses"], rel=1e-5)
        for (n, a), b in zip(plain_model.named_parameters(), model.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
        assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))  # patch removed
    assert len(decoder_layers(student)) == student.config.num_hidden_layers


def test_checkpointing_recomputes_in_backward():
    """With activation checkpointing each decoder layer runs twice per step (forward, then again in backward)."""
    from kvconvert.convert.heal_distributed import decoder_layers

    student, teacher = _pair()
    calls = []
    layer = decoder_layers(student)[0]
    layer.self_attn.register_forward_pre_hook(lambda *a: calls.append(1))  # (early stop may skip post-hooks)
    data = [torch.randint(3, 150, (1, 32))]
    heal(student, teacher, HealConfig(steps=1, batch=1, seqlen=32), calib=data, progress=False)
    assert len(calls) == 1
    heal(student, teacher, HealConfig(steps=1, batch=1, seqlen=32, activation_checkpointing=True), calib=data,
         progress=False)
    assert len(calls) == 3


def test_bf16_autocast_heals_with_fp32_master_weights():
    student, teacher = _pair()
    data = [torch.randint(3, 150, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    cfg = HealConfig(steps=10, lr=3e-3, batch=2, seqlen=32)
    ref = heal(copy.deepcopy(student), teacher, cfg, calib=data, progress=False)
    out = heal(student, teacher, cfg.merged({"autocast": "bf16"}), calib=data, progress=False)
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert out["losses"][0] == pytest.approx(ref["losses"][0], rel=5e-2)
    assert out["losses"][0] != ref["losses"][0]  # the forward really ran in bf16
    assert out["losses"][-1] < 0.8 * out["losses"][0]
    with pytest.raises(UserError, match="autocast"):
        HealConfig.parse({"autocast": "fp8"})
