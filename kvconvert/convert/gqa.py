"""The mha-to-gqa pass: fewer KV heads, same architecture class, loadable by stock transformers.

`mha_to_gqa(model, cfg, out)`:
- `method="mean"` (data-free, streams layer by layer): K/V rows of each group averaged, after a similarity
  grouping and a RoPE-compatible alignment of the heads (`gqa_mean`).
- `method="calibrated"`: closed-form fit on calibration activations (`gqa_calibrated`): shared K/V per group,
  key compensation folded into q_proj (per RoPE pair a 2x2 rotation-scaling), value compensation into o_proj.
- `heal.steps > 0`: KD healing of the converted model against the original before writing (`heal`).
- `evaluate`: held-out perplexity of the output and of the input, recorded in the output's kvconvert.json.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from typing import Any, Literal

import torch
from pydantic import Field

from ..config import StrictConfig
from ..data.calibration import CalibConfig, CalibrationData, calibration_batches, iterate
from ..errors import UserError
from ..eval.evaluate import EvalConfig
from ..io import ModelSource, PassResult, copy_side_files, parse_size
from ..io.writer import write_json
from ..models import AttentionView, describe
from .gqa_mean import LayerMerger
from .gqa_stream import check_source_weights, iter_source_tensors, write_converted
from .heal import HealConfig, heal, heal_batches
from .pass_skeleton import PassRun
from .placement import PlacementConfig, load_reference

log = logging.getLogger(__name__)


class GQAConfig(StrictConfig):
    """mha-to-gqa settings. `groups`: KV heads of the output (must divide the input's KV head count)."""

    groups: int = Field(..., ge=1)
    method: Literal["mean", "calibrated"] = "mean"
    grouping: Literal["consecutive", "similarity"] = "similarity"
    align: bool = True
    calib: CalibConfig = CalibConfig()
    heal: HealConfig = HealConfig()
    max_shard_size: str = "5GB"
    evaluate: bool = True
    eval: EvalConfig = EvalConfig()
    damping: float = Field(1e-3, ge=0)
    placement: PlacementConfig = PlacementConfig()
    device: str = "auto"

    @property
    def needs_calibration(self) -> bool:
        """Calibrated fitting and healing read calibration text; plain mean pooling does not."""
        return self.method == "calibrated" or self.heal.steps > 0


def check_groups(view: AttentionView, groups: int) -> None:
    """Refuse group counts and architectures the output could not honour (one line each)."""
    if not view.supports_gqa:
        raise UserError(f"cannot write a GQA checkpoint for {view.gqa_note}")
    valid = ", ".join(str(g) for g in view.valid_group_counts())
    if groups > view.num_heads:
        raise UserError(f"--groups {groups} is larger than the model's {view.num_heads} attention heads; "
                        f"valid values: {valid}")
    if groups > view.num_kv_heads:
        raise UserError(f"--groups {groups} exceeds the model's {view.num_kv_heads} KV heads (mha-to-gqa only "
                        f"merges heads); valid values: {valid}")
    if view.num_kv_heads % groups:
        raise UserError(f"--groups {groups} does not divide the model's {view.num_kv_heads} KV heads; "
                        f"valid values: {valid}")


def output_config(config: dict[str, Any], groups: int) -> dict[str, Any]:
    return {**config, "num_key_value_heads": groups}


def build_model(config: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """A transformers model (fp32, eval) from a config dict and a full name -> tensor map."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {sorted(set(missing) - tied)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    return model.eval()


def _mean_merger(source: ModelSource, view: AttentionView, cfg: GQAConfig) -> LayerMerger:
    return LayerMerger(source.reader().get, view, cfg.groups, cfg.grouping, cfg.align)


def _mean_replacements(source: ModelSource, view: AttentionView, cfg: GQAConfig) -> dict[str, torch.Tensor]:
    return _mean_merger(source, view, cfg).replacements()


def mha_to_gqa(model, cfg: GQAConfig, out, *, overwrite: bool = False, calib: CalibrationData | None = None,
               progress: bool = True) -> PassResult:
    """Convert `model` (spec, path or ModelSource) to `cfg.groups` KV heads, written atomically into `out`.

    `calib`: calibration token ids (iterable of LongTensor[1, S] or a callable), used for the calibrated fit
    and for healing; when None they are drawn from `cfg.calib` / `cfg.heal.calib` with the model's tokenizer.
    """
    run = PassRun.start("mha_to_gqa", model, cfg.model_dump(), out, overwrite,
                        check=lambda source, view: check_groups(view, cfg.groups))
    source, config, view = run.source, run.config, run.view
    check_source_weights(source)
    if cfg.heal.steps:  # healing holds the reference and the student; the calibrated fit runs layer by layer
        run.check_room(cfg.placement, student=True)
    fit_data, heal_data = _calibration(source, cfg, calib)
    hashing = threading.Thread(target=source.content_hash, daemon=True)  # overlaps the conversion's I/O
    hashing.start()
    max_shard = parse_size(cfg.max_shard_size)
    new_config = output_config(config, cfg.groups)
    metrics = run.metrics
    metrics["kv_heads"] = [view.num_kv_heads, cfg.groups]

    with run.output() as tmp, contextlib.ExitStack() as stack:
        teacher = None
        if cfg.method == "mean" and cfg.heal.steps == 0:
            convert = merger = _mean_merger(source, view, cfg)
            changed = merger.changes
        else:
            if cfg.heal.steps:
                teacher = stack.enter_context(load_reference(source, cfg.placement))
            if cfg.method == "calibrated":
                from .gqa_calibrated import TensorSpill, fit_calibrated

                if teacher is None:  # one decoder layer at a time; fitted tensors spill to the output's temp folder
                    from ..runtime.layerwise import LayerwiseModel

                    runner = LayerwiseModel(source, device=cfg.device, progress=progress)
                    replacements, fit_metrics = fit_calibrated(runner, view, cfg, fit_data, progress,
                                                               store=TensorSpill(tmp / ".fit-spill"))
                else:
                    replacements, fit_metrics = fit_calibrated(teacher, view, cfg, fit_data, progress,
                                                               weights=source.reader().get)
                metrics["fit"] = fit_metrics
            else:
                merger = _mean_merger(source, view, cfg)
                replacements = merger.replacements()
                metrics["mean"] = merger.metrics()
            if cfg.heal.steps:
                student = build_model(new_config, {**dict(iter_source_tensors(source)), **replacements})
                result = heal(student, teacher, cfg.heal, calib=heal_data, progress=progress)
                metrics["heal"] = {"steps": result["steps"], "seconds": result["seconds"],
                                   "first_loss": result["losses"][0], "last_loss": result["losses"][-1]}
                replacements = dict(student.state_dict())
                del student

            def convert(name: str, t: torch.Tensor) -> torch.Tensor:
                return replacements[name].to(t.dtype) if name in replacements else t

            changed = replacements.__contains__

        written = write_converted(source, tmp, convert, max_shard, progress, changes=changed)
        if cfg.method == "mean" and "mean" not in metrics:
            metrics["mean"] = merger.metrics()
        copy_side_files(source.path, tmp, skip=("config.json",))
        write_json(tmp / "config.json", new_config)
        metrics["bytes_written"] = written["bytes_written"]
        metrics["kv_bytes_per_token"] = [view.kv_bytes_per_token(cfg.eval.kv_dtype),
                                         describe(new_config).kv_bytes_per_token(cfg.eval.kv_dtype)]
        shutil.rmtree(tmp / ".fit-spill", ignore_errors=True)
        hashing.join()
        run.write_record(tmp)
    if cfg.evaluate:  # after the output is in place: an evaluation that cannot run never costs the conversion
        run.evaluate(cfg.eval, progress)
    return run.result()


def _calibration(source: ModelSource, cfg: GQAConfig, calib: CalibrationData | None):
    """(fit batches, heal batches), loaded before anything is written so missing data fails early."""
    if not cfg.needs_calibration:
        return None, None
    if calib is not None:
        data = [torch.as_tensor(x).long().reshape(1, -1) for x in iterate(calib)]
        if not data:
            raise UserError("no calibration sequences were given")
        return data, data
    from ..eval.evaluate import load_eval_tokenizer

    tokenizer = load_eval_tokenizer(source, cfg.eval)
    fit = calibration_batches(tokenizer, cfg.calib) if cfg.method == "calibrated" else None
    healing = heal_batches(tokenizer, cfg.heal) if cfg.heal.steps else None
    return fit, healing
