"""Healing: a short knowledge-distillation "uptraining" of a converted model against the original.

The student (any causal LM whose `forward(input_ids).logits` works, including latent models) is trained in
place to match the teacher: KL(teacher || student) of the next-token distributions, plus (`hidden_weight`)
the relative squared error of every decoder layer's output hidden state, which gives each converted layer its
own signal instead of only what reaches the logits. By default only the attention blocks are trainable
(`trainable="attention"`), as the conversion only changed them. A step budget (`steps`) and / or a wall-time
budget (`minutes`) bound the run. Both models stay wherever they were placed (CPU, one GPU, or an
`accelerate` device map); under torchrun a `heal_distributed.Parallel` (DDP / FSDP2) splits every global batch
across ranks with the same losses and updates as one process. `autocast="bf16"` runs both forwards in bf16
(fp32 master weights and optimizer state), `activation_checkpointing` recomputes each decoder layer in backward,
`kd_chunk` bounds the fp32 log-softmax to that many tokens. `heal_pass.heal_model` is the pass (`kvconvert heal`)
around this loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path
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
from .heal_distributed import Parallel, checkpoint_layers, decoder_layers, uncheckpoint


class HealConfig(StrictConfig):
    """KD settings. `steps=0` and no `minutes` means no healing. Each step sees `batch` x `seqlen` tokens of
    `calib.source`. With `minutes`, healing stops at that wall time (or after `steps`, if given, first); the
    cosine schedule then runs over the time budget. `save_every` > 0 (with a state folder): the trainable
    weights, optimizer, schedule and data position are saved every that many steps, for `resume`."""

    steps: int = Field(0, ge=0)
    minutes: float | None = Field(None, gt=0)
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
    hidden_weight: float = Field(0.0, ge=0)
    kd_chunk: int = Field(0, ge=0)
    save_every: int = Field(0, ge=0)
    autocast: Literal["none", "bf16"] = "none"
    activation_checkpointing: bool = False

    @property
    def enabled(self) -> bool:
        return self.steps > 0 or self.minutes is not None


def _window_count(cfg: HealConfig) -> int:
    """Windows a heal may consume: steps x batch, or for a time budget without steps an upper bound."""
    if cfg.steps:
        return cfg.steps * cfg.batch
    return 0


def heal_batches(tokenizer, cfg: HealConfig) -> list[torch.Tensor]:
    """Windows of `cfg.seqlen` tokens (LongTensor[1, seqlen]) from `cfg.calib.source`: `cfg.steps * cfg.batch`
    of them, or with only `minutes` every window of the text once (the loop cycles them).

    Windows are non-overlapping and drawn with `random.Random(cfg.seed)`; a short text is cycled in a new
    random order rather than refused.
    """
    ids = token_stream(tokenizer, load_text(cfg.calib.source))
    n_windows = ids.numel() // cfg.seqlen
    if n_windows < 1:
        raise UserError(f"healing text {cfg.calib.source} has {ids.numel()} tokens, fewer than --heal-seqlen "
                        f"{cfg.seqlen}; use more text or a shorter sequence")
    need, rng, starts = max(_window_count(cfg), 1 if cfg.steps else n_windows), random.Random(cfg.seed), []
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


def _batches(data: list[torch.Tensor], batch: int, steps: int | None) -> Iterator[torch.Tensor]:
    """LongTensor[batch, S] per step (forever when `steps` is None), cycling through `data` (each
    LongTensor[1, S_i], cropped to the min S)."""
    i, n = 0, 0
    while steps is None or n < steps:
        rows = [data[(i + k) % len(data)] for k in range(batch)]
        i += batch
        n += 1
        s = min(r.shape[-1] for r in rows)
        yield torch.cat([r.reshape(1, -1)[:, :s] for r in rows])


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            chunk: int = 0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the softmax at `temperature`; logits [B, S, V].

    `chunk` > 0: computed `chunk` tokens at a time, so fp32 log-probabilities exist for one chunk only."""
    v = student_logits.shape[-1]
    s_all, t_all = student_logits.reshape(-1, v), teacher_logits.reshape(-1, v)
    n = s_all.shape[0]
    step = chunk if chunk > 0 else n
    total = student_logits.new_zeros((), dtype=torch.float32)
    for a in range(0, n, step):
        s = F.log_softmax(s_all[a:a + step].float() / temperature, dim=-1)
        t = F.log_softmax(t_all[a:a + step].float() / temperature, dim=-1)
        total = total + F.kl_div(s, t, log_target=True, reduction="sum")
    return total / n * temperature**2


def hidden_loss(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                parallel: Parallel | None = None) -> torch.Tensor:
    """Mean over decoder layers of ||h_s - h_t||^2 / ||h_t||^2 (hidden states [B, S, hidden], embeddings
    excluded). With `parallel` (each rank holding rows of the global batch) the denominator is the global one
    and the term is scaled by the world size, so the ranks' mean is the single-process loss of the global batch."""
    par = parallel or Parallel()
    dens = par.sum(torch.stack([t.float().pow(2).sum() for t in teacher_hidden[1:]])).clamp_min(1e-30)
    nums = torch.stack([(s.float() - t.float()).pow(2).sum() for s, t in zip(student_hidden[1:], teacher_hidden[1:])])
    return (nums / dens).mean() * par.world_size


STATE = "heal-state.pt"
RESUMABLE = ("steps", "lr", "seqlen", "batch", "trainable", "seed", "calib", "warmup", "schedule", "weight_decay",
             "max_grad_norm", "temperature", "hidden_weight", "autocast")


def _save_state(folder: Path, step: int, model, params, opt, sched, losses, kd_losses, cfg: HealConfig,
                par: Parallel) -> None:
    """Atomically write the resumable state (tensors, numbers and strings only: loads with weights_only). Every
    rank takes part (FSDP gathers the shards); rank 0 writes."""
    full, optim = par.full_params(params), par.optimizer_state(model, opt)
    if par.main:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (STATE + ".tmp")
        torch.save({"step": step, "params": full, "optimizer": optim, "parallel": par.mode,
                    "scheduler": sched.state_dict(), "losses": losses, "kd_losses": kd_losses,
                    "config": json.dumps(cfg.model_dump(include=set(RESUMABLE), mode="json"), sort_keys=True)}, tmp)
        os.replace(tmp, folder / STATE)
    par.barrier()


def _load_state(folder: Path, cfg: HealConfig, par: Parallel) -> dict[str, Any] | None:
    """The saved state (read by every rank: the state folder must be on a filesystem all ranks see)."""
    path = folder / STATE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["config"] != json.dumps(cfg.model_dump(include=set(RESUMABLE), mode="json"), sort_keys=True):
        raise UserError(f"{path} was saved by a heal with other settings; resume with the same settings or "
                        "delete that folder to start over")
    if state.get("parallel", "none") != par.mode and "fsdp" in (state.get("parallel", "none"), par.mode):
        raise UserError(f"{path} was saved with --parallel {state.get('parallel', 'none')}; resume with the same "
                        f"--parallel (not {par.mode})")
    return state


def heal(student: torch.nn.Module, teacher: torch.nn.Module, cfg: HealConfig, calib: CalibrationData | None = None,
         progress: bool = True, on_step: Callable[[int, float], bool | None] | None = None,
         state_dir: str | os.PathLike | None = None, resume: bool = False,
         parallel: Parallel | None = None) -> dict[str, Any]:
    """Distil `teacher` into `student` in place for `cfg.steps` AdamW steps and / or `cfg.minutes`.

    `on_step(step, loss)` is called after each step (1-based), e.g. to evaluate at milestones; returning
    True stops the run there. `state_dir`: where `cfg.save_every` saves the resumable state; `resume=True`
    continues from the state saved there (same settings; the student given is the original one), so an
    interrupted heal ends with the weights an uninterrupted one would have.

    `calib`: token ids, an iterable of LongTensor[1, S] (or a callable returning one), e.g. from
    `heal_batches(tokenizer, cfg)`; cycled when shorter than `steps * batch`.
    `parallel`: under torchrun, a `heal_distributed.setup(...)` result; every rank passes the same data and
    takes its rows of each global batch. FSDP leaves the student sharded in place (`parallel.write_checkpoint`
    gathers it); the per-step losses are the global batch's.
    Returns {"losses": [per-step loss], "kd_losses", "seconds": wall time, "steps", "trainable_parameters",
    "teacher_seconds": time in the teacher's forward passes, "tokens"}.
    """
    t0 = time.perf_counter()
    if not cfg.enabled:
        return {"losses": [], "kd_losses": [], "seconds": 0.0, "steps": 0, "trainable_parameters": 0,
                "teacher_seconds": 0.0, "tokens": 0}
    if calib is None:
        raise UserError("healing needs calibration token ids; pass calib=heal_batches(tokenizer, cfg)")
    data = [torch.as_tensor(x).long() for x in iterate(calib)]
    if not data:
        raise UserError("healing got no calibration sequences")
    par = parallel or Parallel()
    par.check_batch(cfg.batch)
    torch.manual_seed(cfg.seed)
    params = trainable_parameters(student, cfg.trainable)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    chosen = {n for n, _ in params}
    for n, p in student.named_parameters():
        p.requires_grad_(n in chosen)
    for p in teacher.parameters():
        p.requires_grad_(False)
    ckpt = checkpoint_layers(decoder_layers(student)) if cfg.activation_checkpointing else []
    forward = par.wrap(student, teacher)  # FSDP replaces the parameters by their shards: look them up again
    params = [(n, p) for n, p in student.named_parameters() if n in chosen]
    opt = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.95))
    budget = cfg.minutes * 60 if cfg.minutes is not None else None
    clock = [0.0]  # wall seconds at the last step, the same on every rank (the schedule and the budget use it)

    def tick() -> float:
        clock[0] = float(par.mean(torch.tensor(time.perf_counter() - t0, dtype=torch.float64)))
        return clock[0]

    def progress_fraction(step: int) -> float:
        fractions = []
        if cfg.steps:
            fractions.append((step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1))
        if budget is not None:
            fractions.append(clock[0] / budget)
        return min(max(max(fractions), 0.0), 1.0)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / (cfg.warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_fraction(step)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    s_dev, t_dev = input_device(student), input_device(teacher)
    was_training = student.training
    student.eval()  # no dropout: the student must match the deterministic teacher
    losses: list[float] = []
    kd_losses: list[float] = []
    teacher_seconds, tokens = 0.0, 0
    want_hidden = cfg.hidden_weight > 0
    folder = Path(state_dir) if state_dir is not None else None
    batches = _batches(data, cfg.batch, cfg.steps or None)
    state = _load_state(folder, cfg, par) if resume and folder is not None else None
    if state is not None:
        par.load_params(params, state["params"])
        par.load_optimizer_state(student, opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        losses, kd_losses = list(state["losses"]), list(state["kd_losses"])
        for _ in range(state["step"]):  # the data position: the windows the saved steps consumed
            next(batches)
    bar = tqdm(batches, total=cfg.steps or None, initial=len(losses), desc="heal", disable=not (progress and par.main))

    def autocast():
        if cfg.autocast == "none":
            return contextlib.nullcontext()
        return torch.autocast(device_type=s_dev.type, dtype=torch.bfloat16)

    try:
        for global_ids in bar:
            ids = par.local(global_ids)
            tt = time.perf_counter()
            with torch.no_grad(), autocast():
                t_out = teacher(ids.to(t_dev), use_cache=False, output_hidden_states=want_hidden)
                t_logits = t_out.logits.to(s_dev)
                t_hidden = tuple(h.to(s_dev) for h in t_out.hidden_states) if want_hidden else ()
            del t_out
            teacher_seconds += time.perf_counter() - tt
            with torch.enable_grad():
                with autocast():
                    s_out = forward(ids.to(s_dev), use_cache=False, output_hidden_states=want_hidden)
                kd = kd_loss(s_out.logits, t_logits, cfg.temperature, cfg.kd_chunk)
                loss = kd + cfg.hidden_weight * hidden_loss(s_out.hidden_states, t_hidden, par) if want_hidden else kd
                loss.backward()
            del s_out, t_logits, t_hidden
            torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.max_grad_norm)
            opt.step()
            if budget is not None:
                tick()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(par.mean(loss.detach())))
            kd_losses.append(float(par.mean(kd.detach())))
            tokens += global_ids.numel()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if folder is not None and cfg.save_every and len(losses) % cfg.save_every == 0:
                _save_state(folder, len(losses), student, params, opt, sched, losses, kd_losses, cfg, par)
            stop = bool(on_step(len(losses), losses[-1])) if on_step is not None else False
            stop = stop or (budget is not None and clock[0] >= budget)
            if par.world_size > 1 and on_step is not None:  # every rank stops at the same step
                stop = bool(par.sum(torch.tensor(float(stop))) > 0)
            if stop:
                break
    finally:
        bar.close()
        uncheckpoint(ckpt)
        for n, p in student.named_parameters():
            p.requires_grad_(flags[n])
        student.train(was_training)
    return {"losses": losses, "kd_losses": kd_losses, "seconds": round(time.perf_counter() - t0, 2),
            "steps": len(losses), "trainable_parameters": sum(p.numel() for _, p in params),  # DTensor numel: the global one
            "teacher_seconds": round(teacher_seconds, 2), "tokens": tokens}
