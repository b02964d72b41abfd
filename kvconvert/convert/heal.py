"""Healing: a short knowledge-distillation "uptraining" of a converted model against the original.

The student (any causal LM whose `forward(input_ids).logits` works, including latent models) is trained in
place to match the teacher's next-token distributions (KL(teacher || student) on logits) over calibration
text. By default only the attention blocks are trainable (`trainable="attention"`), as the conversion only
changed them. Both models stay wherever they were placed (CPU, one GPU, or an `accelerate` device map).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from ..config import StrictConfig
from ..data.calibration import CalibConfig, CalibrationData, iterate, load_text, token_stream
from ..errors import UserError
from ..runtime.input_device import input_device


class HealConfig(StrictConfig):
    """KD settings. `steps=0` means no healing. Each step sees `batch` x `seqlen` tokens of `calib.source`."""

    steps: int = Field(0, ge=0)
    lr: float = Field(5e-4, gt=0)
    seqlen: int = Field(256, ge=8)
    batch: int = Field(2, ge=1)
    trainable: Literal["attention", "all"] = "attention"
    seed: int = 0
    calib: CalibConfig = CalibConfig()
    warmup: int = Field(4, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    temperature: float = Field(1.0, gt=0)


def heal_batches(tokenizer, cfg: HealConfig) -> list[torch.Tensor]:
    """`cfg.steps * cfg.batch` windows of `cfg.seqlen` tokens (LongTensor[1, seqlen]) from `cfg.calib.source`.

    Windows are non-overlapping and drawn with `random.Random(cfg.seed)`; a short text is cycled in a new
    random order rather than refused.
    """
    ids = token_stream(tokenizer, load_text(cfg.calib.source))
    n_windows = ids.numel() // cfg.seqlen
    if n_windows < 1:
        raise UserError(f"healing text {cfg.calib.source} has {ids.numel()} tokens, fewer than --heal-seqlen "
                        f"{cfg.seqlen}; use more text or a shorter sequence")
    need, rng, starts = max(cfg.steps * cfg.batch, 1), random.Random(cfg.seed), []
    while len(starts) < need:
        starts += rng.sample(range(n_windows), min(n_windows, need - len(starts)))
    return [ids[s * cfg.seqlen:(s + 1) * cfg.seqlen].unsqueeze(0) for s in starts]


def trainable_parameters(model: torch.nn.Module, trainable: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters healing updates: all of them, or those inside the attention blocks.

    Attention blocks are found through the model's `AttentionView` (`attn_prefix`); a model kvconvert cannot
    describe falls back to modules whose name ends in `attn` / `attention`.
    """
    named = list(model.named_parameters())
    if trainable == "all":
        return named
    prefixes: list[str] = []
    try:
        from ..models import describe

        view = describe(model.config)
        prefixes = [view.layer_prefix(i) + "." for i in range(view.num_layers)] if view.attn_prefix else []
    except Exception:  # noqa: BLE001 - unknown model types fall back to module names
        prefixes = []
    if not prefixes:
        prefixes = [name + "." for name, _ in model.named_modules()
                    if name.rsplit(".", 1)[-1] in ("attn", "self_attn", "attention")]
    chosen = [(n, p) for n, p in named if any(n.startswith(pre) for pre in prefixes)]
    if not chosen:
        raise UserError("healing found no attention parameters in the student; use trainable='all'")
    return chosen


def _batches(data: list[torch.Tensor], batch: int, steps: int) -> Iterator[torch.Tensor]:
    """LongTensor[batch, S] per step, cycling through `data` (each LongTensor[1, S_i], cropped to the min S)."""
    i = 0
    for _ in range(steps):
        rows = [data[(i + k) % len(data)] for k in range(batch)]
        i += batch
        s = min(r.shape[-1] for r in rows)
        yield torch.cat([r.reshape(1, -1)[:, :s] for r in rows])


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the softmax at `temperature`; logits [B, S, V]."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def heal(student: torch.nn.Module, teacher: torch.nn.Module, cfg: HealConfig, calib: CalibrationData | None = None,
         progress: bool = True, on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Distil `teacher` into `student` in place for `cfg.steps` AdamW steps.

    `on_step(step, loss)` is called after each step (1-based), e.g. to evaluate at milestones.

    `calib`: token ids, an iterable of LongTensor[1, S] (or a callable returning one), e.g. from
    `heal_batches(tokenizer, cfg)`; cycled when shorter than `steps * batch`.
    Returns {"losses": [per-step KD loss], "seconds": wall time, "steps", "trainable_parameters"}.
    """
    t0 = time.perf_counter()
    if cfg.steps == 0:
        return {"losses": [], "seconds": 0.0, "steps": 0, "trainable_parameters": 0}
    if calib is None:
        raise UserError("healing needs calibration token ids; pass calib=heal_batches(tokenizer, cfg)")
    data = [torch.as_tensor(x).long() for x in iterate(calib)]
    if not data:
        raise UserError("healing got no calibration sequences")
    torch.manual_seed(cfg.seed)
    params = trainable_parameters(student, cfg.trainable)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    chosen = {n for n, _ in params}
    for n, p in student.named_parameters():
        p.requires_grad_(n in chosen)
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / (cfg.warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    s_dev, t_dev = input_device(student), input_device(teacher)
    was_training = student.training
    student.eval()  # no dropout: the student must match the deterministic teacher
    losses: list[float] = []
    bar = tqdm(_batches(data, cfg.batch, cfg.steps), total=cfg.steps, desc="heal", disable=not progress)
    try:
        for ids in bar:
            with torch.no_grad():
                t_logits = teacher(ids.to(t_dev), use_cache=False).logits.to(s_dev)
            with torch.enable_grad():
                s_logits = student(ids.to(s_dev), use_cache=False).logits
                loss = kd_loss(s_logits, t_logits, cfg.temperature)
                loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if on_step is not None:
                on_step(len(losses), losses[-1])
    finally:
        for n, p in student.named_parameters():
            p.requires_grad_(flags[n])
        student.train(was_training)
    return {"losses": losses, "seconds": round(time.perf_counter() - t0, 2), "steps": len(losses),
            "trainable_parameters": sum(p.numel() for _, p in params)}
