"""The heal pass: `heal_model(student, HealPassConfig, out)` distils a converted model towards its teacher and
writes a normal checkpoint (stock-transformers loadable, or a latent folder) with provenance.

Usable after any conversion (`kvconvert heal STUDENT --teacher SRC --out DIR`); the recipe `heal` step calls
it too. The loop itself is `heal.heal` (also what the passes' `--heal-steps` run). Under `torchrun` every rank
runs `heal_model` with the same arguments: `parallel` ("auto": FSDP when WORLD_SIZE > 1) shards (FSDP2) or
replicates (DDP) the student, each rank takes its rows of the global batch, and rank 0 writes the gathered
checkpoint, the provenance and the resumable state. `heal_plan` is the memory each device will need.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch

from ..data.calibration import CalibrationData, iterate
from ..errors import UserError
from ..io.writer import parse_size
from ..eval.evaluate import EvalConfig
from .heal import HealConfig, heal, heal_batches
from .heal_distributed import ParallelMode, env_world_size, resolve_mode, setup
from .heal_plan import MemoryPlan, heal_memory_plan

PROBE = "The quick brown fox jumps over the lazy dog. 0123456789 ()[]{} naïve café"


class HealPassConfig(HealConfig):
    """`kvconvert heal` settings: the teacher (MODEL spec of the model the student was converted from), the
    HealConfig fields, the output's shard size, the device, data parallelism under torchrun (`parallel`), and
    the before/after evaluation."""

    teacher: str
    device: Literal["auto", "cpu", "cuda"] = "auto"
    parallel: ParallelMode = "auto"
    max_shard_size: str = "5GB"
    evaluate: bool = True
    eval: EvalConfig = EvalConfig()

    def loop(self) -> HealConfig:
        """The HealConfig part (what `heal.heal` reads)."""
        return HealConfig.parse(self.model_dump(include=set(HealConfig.model_fields)))


def _resolve(model, what: str):
    from ..io import ModelSource, resolve_source

    if isinstance(model, ModelSource):
        return model
    try:
        return resolve_source(model)
    except UserError as exc:
        raise UserError(f"{what}: {exc}") from None


def check_pair(student, teacher) -> None:
    """Refuse a teacher the student cannot be distilled towards: other vocabulary size or tokenizer."""
    sv, tv = student.config_dict().get("vocab_size"), teacher.config_dict().get("vocab_size")
    if sv != tv:
        raise UserError(f"the teacher's vocabulary ({tv} tokens) differs from the student's ({sv}); "
                        "heal against the model the student was converted from")
    try:
        s_tok, t_tok = student.load_tokenizer(), teacher.load_tokenizer()
    except Exception:  # noqa: BLE001 - a folder without tokenizer files: the vocabulary size check stands
        return
    if s_tok(PROBE)["input_ids"] != t_tok(PROBE)["input_ids"]:
        raise UserError("the teacher's tokenizer encodes text differently from the student's; heal against the "
                        "model the student was converted from")


def _device(cfg: HealPassConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
    return cfg.device


def _config_only(model) -> dict[str, Any]:
    import json

    if isinstance(model, dict):
        return model
    if isinstance(model, (str, Path)):
        path = Path(model)
        path = path / "config.json" if path.is_dir() else path
        if path.name.endswith(".json") and path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise UserError(f"{path}: not a readable config.json ({exc})") from None
    return _resolve(model, "student").config_dict()


def heal_plan(model, cfg: HealPassConfig, world_size: int | None = None) -> MemoryPlan:
    """The per-device memory plan of healing `model` (spec, path, ModelSource, a folder or file holding just
    config.json, or the config dict) with `cfg` on `world_size` processes (default WORLD_SIZE): arithmetic on
    config.json, no weights read."""
    config = _config_only(model)
    try:
        teacher = _config_only(cfg.teacher)
    except UserError:  # a teacher that does not resolve here: planned as large as the student
        teacher = None
    world = env_world_size() if world_size is None else world_size
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    return heal_memory_plan(config, world, resolve_mode(cfg.parallel, world), trainable=cfg.trainable,
                            batch=cfg.batch, seqlen=cfg.seqlen, autocast=cfg.autocast,
                            activation_checkpointing=cfg.activation_checkpointing, kd_chunk=cfg.kd_chunk,
                            device=device, hidden_weight=cfg.hidden_weight, teacher=teacher)


def state_folder(out) -> Path:
    """Where `save_every` keeps the resumable state of a heal writing `out`: the sibling `<out>.heal-state`."""
    out = Path(out)
    return out.with_name(out.name + ".heal-state")


def heal_model(model, cfg: HealPassConfig, out, *, calib: CalibrationData | None = None, progress: bool = True,
               overwrite: bool = False, resume: bool = False):
    """Heal `model` (spec, path or ModelSource: any converted checkpoint) towards `cfg.teacher`, written
    atomically into `out`. `calib`: token ids (iterable of LongTensor[1, S] or a callable); default windows
    of `cfg.calib.source`. With `cfg.save_every` the state is saved in `state_folder(out)` (removed once `out`
    is written); `resume=True` continues an interrupted heal from it. Returns PassResult(out, metrics, record)."""
    from ..io import PassResult, atomic_output_dir, check_target, copy_side_files, provenance

    t0 = time.perf_counter()
    if not cfg.enabled:
        raise UserError("nothing to heal: give --steps N (N > 0) or --minutes M")
    source = _resolve(model, "student")
    teacher_src = _resolve(cfg.teacher, "teacher")
    if source.path.resolve() == teacher_src.path.resolve():
        raise UserError("the teacher is the student itself; pass the model the student was converted from")
    check_pair(source, teacher_src)
    check_target(Path(out), overwrite, (source.path, teacher_src.path))
    states = state_folder(out)
    if resume and not (states / "heal-state.pt").is_file():
        raise UserError(f"--resume: no saved heal state in {states} (a heal saves one with --save-every N)")
    loop = cfg.loop()
    par, device = setup(cfg.parallel, _device(cfg))
    par.check_batch(cfg.batch)
    if progress and par.main:
        print(heal_plan(source, cfg, par.world_size).line(), file=sys.stderr)
    if calib is None:
        data = heal_batches(source.load_tokenizer(), loop)
    else:
        data = [torch.as_tensor(x).long().reshape(1, -1) for x in iterate(calib)]
        if not data:
            raise UserError("no healing sequences were given")
    on_cuda = device.startswith("cuda")
    place = (lambda m: m) if par.mode == "fsdp" else (lambda m: m.to(device))  # fully_shard moves the shards
    student = place(source.load_model())
    teacher = place(teacher_src.load_model(dtype=torch.bfloat16 if on_cuda else None)).eval()
    result = heal(student, teacher, loop, calib=data, progress=progress,
                  state_dir=states if cfg.save_every or resume else None, resume=resume, parallel=par)
    metrics: dict[str, Any] = {"heal": {k: result[k] for k in ("steps", "seconds", "tokens", "teacher_seconds",
                                                                "trainable_parameters")},
                               "losses": result["losses"]}
    metrics["heal"].update(first_loss=result["losses"][0], last_loss=result["losses"][-1],
                           tokens_per_second=round(result["tokens"] / max(result["seconds"], 1e-9), 1))
    if cfg.evaluate:
        from ..eval.evaluate import evaluate_model

        tokenizer = source.load_tokenizer()
        metrics["eval"] = evaluate_model(student, tokenizer, cfg.eval, progress)
        metrics["baseline_eval"] = {"model": teacher_src.spec, **evaluate_model(teacher, tokenizer, cfg.eval,
                                                                                 progress)}
        metrics["perplexity_ratio"] = metrics["eval"]["perplexity"] / metrics["baseline_eval"]["perplexity"]
    del teacher
    record = provenance.new_record(source.provenance(), parent=provenance.read(source.path))
    params = {**cfg.model_dump(mode="json"), "teacher": teacher_src.provenance(), "parallel": par.mode,
              "world_size": par.world_size}
    provenance.add_pass(record, "heal", params, time.perf_counter() - t0,
                        {k: v for k, v in metrics.items() if k != "losses"})
    if par.world_size > 1:  # gathered tensor by tensor (collectives on every rank), written by rank 0
        with (atomic_output_dir(out, overwrite, inputs=(source.path, teacher_src.path)) if par.main
              else contextlib.nullcontext(None)) as tmp:
            par.write_checkpoint(student, tmp, cfg.max_shard_size)
            if par.main:
                copy_side_files(source.path, tmp, skip=("config.json", "generation_config.json"))
                provenance.write(tmp, record)
    else:
        with atomic_output_dir(out, overwrite, inputs=(source.path, teacher_src.path)) as tmp:
            student.to("cpu").save_pretrained(tmp, safe_serialization=True,
                                                max_shard_size=parse_size(cfg.max_shard_size))
            copy_side_files(source.path, tmp, skip=("config.json", "generation_config.json"))
            provenance.write(tmp, record)
    if par.main:
        if states.is_dir():  # written by this heal only: its state file and nothing else
            (states / "heal-state.pt").unlink(missing_ok=True)
            if not any(states.iterdir()):
                states.rmdir()
    par.barrier()
    return PassResult(Path(out).resolve(), metrics, record)
