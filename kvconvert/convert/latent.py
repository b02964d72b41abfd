"""fit-latent: per layer K = B_k A_k x (+b_k), V = B_v A_v x (+b_v) with small inner ranks; the cache stores A x.

Needs calibration data (`LatentConfig.needs_calibration` is always True): the factors minimise the error of
K and V on calibration activations (see `latent_fit`), ranks come from one global budget, allocated
uniformly or by measured sensitivity (KL of the model's next-token distribution per unit of each layer's
K/V error). The output folder is a `kvconvert_latent` checkpoint that `kvconvert.load_latent` (or
AutoModelForCausalLM after `import kvconvert`) runs with a cache of latents.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

from pydantic import Field, model_validator

from ..config import StrictConfig
from ..data.calibration import CalibConfig, calibration_batches, iterate
from ..errors import UserError
from ..eval.evaluate import EvalConfig
from .heal import HealConfig

log = logging.getLogger(__name__)


class LatentConfig(StrictConfig):
    """Exactly one of `rank` (latent width per K and per V, or of the joint KV latent) and `kv_ratio`
    (cached elements / the input's, in (0, 1])."""

    rank: int | None = Field(None, ge=1)
    kv_ratio: float | None = Field(None, gt=0, le=1)
    joint_kv: bool = False
    allocation: Literal["uniform", "sensitivity"] = "sensitivity"
    metric: Literal["fisher", "attention", "none"] = "fisher"
    keep_full_layers: list[int] = []
    min_rank: int = Field(4, ge=1)
    sensitivity_samples: int = Field(4, ge=1)
    damping: float = Field(1e-4, ge=0)
    calib: CalibConfig = CalibConfig()
    heal: HealConfig = HealConfig()
    max_shard_size: str = "5GB"
    evaluate: bool = True
    eval: EvalConfig = EvalConfig()
    device: str = "auto"

    @model_validator(mode="after")
    def _one_size(self):
        if (self.rank is None) == (self.kv_ratio is None):
            raise ValueError("give exactly one of rank and kv_ratio")
        return self

    @property
    def needs_calibration(self) -> bool:
        return True


def fit_latent(model, cfg: LatentConfig, out, *, overwrite: bool = False, calib=None, progress: bool = True):
    """Fit latent K/V factors for `model` (path, spec or ModelSource) and write the latent folder to `out`.

    `calib`: iterable of LongTensor[1, S] (or a callable returning one); default `cfg.calib` text.
    Returns PassResult(out, metrics, record).
    """
    from ..models import describe
    from .latent_build import latent_config_dict, needs_probe
    from .pass_skeleton import PassRun

    run = PassRun.start("fit_latent", model, cfg.model_dump(), out, overwrite,
                        check=lambda source, view: _check_input(view, cfg))
    source, config, view = run.source, run.config, run.view
    in_ram = cfg.heal.steps > 0 or needs_probe(cfg, view)
    if in_ram:  # healing trains the whole student; KL probes edit a whole model: both hold it in RAM
        run.check_room(student=True,
                       hint="healing and KL-probe sensitivity hold both in RAM on the CPU: use --heal-steps 0 "
                            "and --metric fisher (run layer by layer), or a machine with more memory")
    tokenizer = None
    if calib is None or cfg.heal.steps:
        from ..eval.evaluate import load_eval_tokenizer

        tokenizer = load_eval_tokenizer(source, cfg.eval)
    batches = [b for b in iterate(calib)] if calib is not None else calibration_batches(tokenizer, cfg.calib)
    if not batches:
        raise UserError("no calibration sequences given; pass --calib with some text")

    from .latent_build import build_latent_model, fit_factors, save_latent, save_latent_streaming

    t_fit = time.perf_counter()
    if in_ram:
        base = source.load_model()
        fit = fit_factors(base, view, cfg, batches, progress=progress)
    else:
        from ..runtime.layerwise import LayerwiseModel

        fit = fit_factors(LayerwiseModel(source, device=cfg.device, progress=progress), view, cfg, batches,
                          progress=progress)
    calib_seconds = time.perf_counter() - t_fit
    latent_view = describe(latent_config_dict(config, fit))
    metrics = run.metrics
    metrics.update({
        "kv_bytes_per_token": [view.kv_bytes_per_token("bf16"), latent_view.kv_bytes_per_token("bf16")],
        "ranks": fit.widths, "kv_fraction": fit.kv_fraction, "calibration_seconds": round(calib_seconds, 2),
        "calibration_tokens": fit.tokens, "sensitivity": fit.sensitivity,
    })
    with run.output() as tmp:
        if in_ram:
            student = build_latent_model(base, view, config, fit)
            if cfg.heal.steps:
                from .heal import heal, heal_batches

                metrics["heal"] = heal(student, base, cfg.heal, heal_batches(tokenizer, cfg.heal), progress=progress)
            save_latent(student, source, tmp, cfg, fit)
            del student, base
        else:
            save_latent_streaming(source, tmp, cfg, fit, view, progress)
        run.write_record(tmp)
    if cfg.evaluate:  # from the written checkpoints, layer by layer; skipped with one line when it cannot run
        run.evaluate(cfg.eval, progress, aliases={"eval_base": "baseline_eval"})
    return run.result()


def _check_input(view, cfg: LatentConfig) -> None:
    if view.model_type == "kvconvert_latent":
        raise UserError("the input is already a latent checkpoint; run fit-latent on the original model")
    if not view.supports_gqa:
        raise UserError(f"fit-latent supports {view.model_type} only through GQA-capable classes: {view.gqa_note}")
    width = view.kv_width
    limit = min(2 * width, view.hidden_size) if cfg.joint_kv else width
    if cfg.rank is not None and cfg.rank > limit:
        what = "joint KV latent (2 x KV width, at most hidden size)" if cfg.joint_kv else "KV width (kv_heads x head_dim)"
        raise UserError(f"rank {cfg.rank} is larger than the {what} {limit}; choose --rank <= {limit}")
    for layer in cfg.keep_full_layers:
        if not -view.num_layers <= layer < view.num_layers:
            raise UserError(f"keep_full_layers: layer {layer} does not exist ({view.num_layers} layers)")
