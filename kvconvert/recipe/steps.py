"""The step registry: one small entry per pass, mapping a recipe step onto one library call.

A step's YAML fields ARE its pass's `StrictConfig` (the same class the library and the CLI use). An entry
says which artifacts the step reads (`model`, `policy`, `onnx`, `engine`) and which one it writes; the
runner passes them in a `StepContext` and hashes them to decide whether a finished step can be skipped.
Only passes that exist in this kvconvert have an entry: a step whose pass has not landed is unknown.

To add a step, write one `@register(...)` function below:
    @register("my_pass", MyConfig, reads=("model",), writes="model", plan=lambda view, cfg: ...)
    def _my_pass(cfg: MyConfig, ctx: StepContext) -> StepResult:
        res = my_pass(ctx.model(), cfg, ctx.out, overwrite=True, progress=ctx.progress)
        return StepResult(metrics=res.metrics, artifact=res.out, figures={"perplexity": ...})
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..config import StrictConfig
from ..convert.gqa import GQAConfig
from ..convert.heal import HealConfig
from ..convert.latent import LatentConfig
from ..eval.evaluate import EvalConfig
from ..eval.needle import NeedleConfig
from ..export.engine import EngineConfig
from ..export.onnx import OnnxExportConfig
from ..export.triton import TritonRepoConfig
from ..io.json_file import write_json
from ..models import AttentionView
from ..runtime.sparse import SparsePolicy

ARTIFACTS = ("model", "source", "policy", "onnx", "engine", "triton")  # "source": the recipe's model
FIGURES = ("perplexity", "needle", "decode_read", "export_diff", "engine_bytes")


@dataclass
class StepContext:
    """What a step sees: its own empty-or-stale folder `out` and the artifacts it reads."""

    out: Path
    inputs: dict[str, Any]
    kv_dtype: str = "bf16"
    context: int = 32768
    batch: int = 8
    progress: bool = True

    def model(self, kind: str = "model"):
        """The current model (or with kind="source" the recipe's model) as a `ModelSource`."""
        from ..io import ModelSource, resolve_source

        m = self.inputs[kind]
        return m if isinstance(m, ModelSource) else resolve_source(m)


@dataclass
class StepResult:
    """`artifact`: the folder/file the step produced (for its `writes` kind); `figures`: report columns
    (subset of FIGURES); `metrics`: everything else the pass measured (kept in the run state)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    artifact: Path | None = None
    figures: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StepSpec:
    name: str
    config: type[StrictConfig]
    run: Callable[[Any, StepContext], StepResult]
    reads: tuple[str, ...] = ("model",)
    writes: str | None = None
    plan: Callable[[AttentionView, Any], AttentionView | None] | None = None
    doc: str = ""
    optional: tuple[str, ...] = ()


STEPS: dict[str, StepSpec] = {}


def register(name: str, config: type[StrictConfig], *, reads: tuple[str, ...] = ("model",),
             writes: str | None = None, plan: Callable[[AttentionView, Any], AttentionView] | None = None,
             optional: tuple[str, ...] = ()):
    """Decorator adding a step to `STEPS`. `reads`: artifacts an earlier step (or the recipe) must provide;
    `optional`: artifacts used when present (e.g. a sparse policy); `plan(view, cfg)` predicts the model's
    view after the step for --dry-run."""
    assert writes is None or writes in ARTIFACTS and all(r in ARTIFACTS for r in reads + optional)

    def deco(fn: Callable[[Any, StepContext], StepResult]):
        STEPS[name] = StepSpec(name, config, fn, tuple(reads), writes, plan, (fn.__doc__ or "").strip(),
                               tuple(optional))
        return fn

    return deco


def pass_perplexity(metrics: dict[str, Any]) -> dict[str, float]:
    """The `perplexity` figure from a pass's own evaluation (`metrics["eval"]`), if it ran one."""
    ev = metrics.get("eval")
    return {"perplexity": ev["perplexity"]} if isinstance(ev, dict) and "perplexity" in ev else {}


@register("eval", EvalConfig, reads=("model",))
def _eval(cfg: EvalConfig, ctx: StepContext) -> StepResult:
    """Held-out perplexity, KV bytes/token and parameters of the current model (kvconvert.eval)."""
    from ..eval.evaluate import evaluate_source

    metrics = evaluate_source(ctx.model(), cfg, progress=ctx.progress)
    write_json(ctx.out / "eval.json", metrics)
    return StepResult(metrics=metrics, figures={"perplexity": metrics["perplexity"]})


@register("heal", HealConfig, reads=("model", "source"), writes="model")
def _heal(cfg: HealConfig, ctx: StepContext) -> StepResult:
    """KL distillation of the current model towards the recipe's source model (kvconvert.heal_model)."""
    from ..convert.heal_pass import HealPassConfig, heal_model
    from . import model_io

    teacher = ctx.model("source")
    pass_cfg = HealPassConfig.parse({**cfg.model_dump(), "teacher": teacher.spec, "evaluate": False})
    res = heal_model(ctx.model(), pass_cfg, ctx.out, overwrite=True, progress=ctx.progress)
    h, losses = res.metrics["heal"], res.metrics["losses"]
    metrics = {"steps": h["steps"], "seconds": h["seconds"], "trainable_parameters": h["trainable_parameters"],
               "tokens": h["tokens"], "loss_first": h["first_loss"], "loss_last": h["last_loss"]}
    model_io.plot_losses(losses, ctx.out / "heal-loss.png", f"healing: {h['steps']} steps, {h['seconds']:.0f} s")
    return StepResult(metrics={**metrics, "losses": losses}, artifact=ctx.out)


class UseSourceConfig(StrictConfig):
    """No fields: the step only makes the recipe's model current again."""


@register("use_source", UseSourceConfig, reads=("source",), writes="model", plan=lambda view, cfg: None)
def _use_source(cfg: UseSourceConfig, ctx: StepContext) -> StepResult:
    """Branch back to the recipe's model: later steps act on the source again (e.g. a latent fit beside an
    MQA conversion). The folder holds links to (or copies of) the source's files."""
    import os
    import shutil

    source = ctx.model("source")
    ctx.out.mkdir(parents=True, exist_ok=True)
    for f in sorted(source.path.iterdir()):
        if not f.is_file():
            continue
        dst = ctx.out / f.name
        if dst.exists():
            dst.unlink()
        try:
            os.link(f, dst)
        except OSError:
            shutil.copy2(f, dst)
    return StepResult(metrics={"source": source.spec}, artifact=ctx.out)


def _gqa_plan(view: AttentionView, cfg: GQAConfig) -> AttentionView:
    """The group count is checked against the model as the real run checks it."""
    from ..convert.gqa import check_groups

    check_groups(view, cfg.groups)
    return replace(view, num_kv_heads=cfg.groups, kv_widths=())


@register("mha_to_gqa", GQAConfig, writes="model", plan=_gqa_plan)
def _mha_to_gqa(cfg: GQAConfig, ctx: StepContext) -> StepResult:
    """Merge KV heads into `groups` (mean or calibrated, optional healing) (kvconvert.convert.gqa)."""
    from ..convert.gqa import mha_to_gqa

    res = mha_to_gqa(ctx.model(), cfg, ctx.out, overwrite=True, progress=ctx.progress)
    return StepResult(metrics=res.metrics, artifact=res.out, figures=pass_perplexity(res.metrics))


def _policy_plan(view: AttentionView, cfg: SparsePolicy) -> AttentionView:
    """The layers a policy names must exist in the model (the real run checks the same)."""
    from ..errors import UserError

    named = set(cfg.layers) | {i for p in (cfg.decode, cfg.prefill) for i in getattr(p, "dense_layers", [])}
    if any(not 0 <= i < view.num_layers for i in named):
        raise UserError(f"sparse_policy names layers {sorted(named)} but the model has {view.num_layers} layers "
                        f"(0..{view.num_layers - 1})")
    return view


@register("sparse_policy", SparsePolicy, writes="policy", plan=_policy_plan)
def _sparse_policy(cfg: SparsePolicy, ctx: StepContext) -> StepResult:
    """Choose the sparse attention policy later steps use (written as policy.yaml; kvconvert.runtime.sparse)."""
    from ..models import describe
    from .sparse_read import decode_read_fraction

    view = _policy_plan(describe(ctx.model().config_dict()), cfg)
    path = ctx.out / "policy.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    read = decode_read_fraction(cfg, view.num_layers, ctx.context)
    return StepResult(metrics={"policy": cfg.name, "decode_read_fraction": read, "context": ctx.context},
                      artifact=path, figures={"decode_read": read})


@register("export_onnx", OnnxExportConfig, writes="onnx", optional=("policy",))
def _export_onnx(cfg: OnnxExportConfig, ctx: StepContext) -> StepResult:
    """ONNX decoder with kvconvert::KVAttention nodes, validated in ONNX Runtime (kvconvert.export.onnx);
    `policy` defaults to the one chosen by an earlier sparse_policy step."""
    from ..export.onnx import export_onnx
    from ..runtime.sparse import parse_policy_spec

    if cfg.policy is None and "policy" in ctx.inputs and not parse_policy_spec(ctx.inputs["policy"]).is_dense:
        cfg = cfg.merged({"policy": str(ctx.inputs["policy"])})
    res = export_onnx(ctx.model(), cfg, ctx.out, overwrite=True, progress=ctx.progress)
    val = res.metrics.get("validation") or {}
    return StepResult(metrics=res.metrics, artifact=res.out,
                      figures={"export_diff": val["max_abs_diff"]} if "max_abs_diff" in val else {})


def _latent_plan(view: AttentionView, cfg: LatentConfig) -> AttentionView:
    """Uniform widths with the same total budget fit_latent allocates (per layer ranks may differ); the
    input is checked as the real run checks it."""
    from ..convert.latent import _check_input

    _check_input(view, cfg)
    width = view.kv_width
    per = 2 * width if cfg.joint_kv else width
    r = cfg.rank if cfg.rank is not None else max(1, round(cfg.kv_ratio * per))
    widths = ((r, 0) if cfg.joint_kv else (r, r),) * view.num_layers
    return replace(view, kv_widths=widths)


@register("fit_latent", LatentConfig, writes="model", plan=_latent_plan)
def _fit_latent(cfg: LatentConfig, ctx: StepContext) -> StepResult:
    """Low-rank latent K/V fitted on calibration activations (kvconvert.convert.latent)."""
    from ..convert.latent import fit_latent

    res = fit_latent(ctx.model(), cfg, ctx.out, overwrite=True, progress=ctx.progress)
    return StepResult(metrics=res.metrics, artifact=res.out, figures=pass_perplexity(res.metrics))


@register("needle", NeedleConfig, optional=("policy",))
def _needle(cfg: NeedleConfig, ctx: StepContext) -> StepResult:
    """Passkey retrieval, dense and with the earlier sparse_policy if any; heatmap needle.png
    (kvconvert.eval.needle, as `kvconvert eval --needle`). Figure: retrieval of the policy (else dense)."""
    from ..eval.needle import plot_needle, run_needle

    source = ctx.model()
    model = source.load_model()
    policies = [str(ctx.inputs["policy"])] if "policy" in ctx.inputs else []
    result = run_needle(model, source.load_tokenizer(), cfg, policies, ctx.progress)
    ctx.out.mkdir(parents=True, exist_ok=True)
    plot_needle(result, ctx.out / "needle.png")
    write_json(ctx.out / "needle.json", result)
    name = result["policies"][-1]
    metrics = {k: result[k] for k in ("lengths", "depths", "policies", "retrieval", "kv_read_fraction", "seconds")}
    return StepResult(metrics=metrics, figures={"needle": result["retrieval"][name]})


@register("export_engine", EngineConfig, reads=("onnx",), writes="engine")
def _export_engine(cfg: EngineConfig, ctx: StepContext) -> StepResult:
    """TensorRT / TensorRT-RTX engine (model.plan) from the earlier ONNX export (kvconvert.export.engine)."""
    from ..export.engine import export_engine

    res = export_engine(ctx.inputs["onnx"], cfg, ctx.out, overwrite=True, progress=ctx.progress)
    return StepResult(metrics=res.metrics, artifact=res.out,
                      figures={"engine_bytes": res.metrics["engine"]["plan_bytes"]})


@register("export_triton", TritonRepoConfig, reads=("onnx",), writes="triton", optional=("engine",))
def _export_triton(cfg: TritonRepoConfig, ctx: StepContext) -> StepResult:
    """Triton Inference Server model repository from the earlier engine, else the ONNX export
    (kvconvert.export.triton)."""
    from ..export.triton import export_triton

    src = ctx.inputs.get("engine") or ctx.inputs["onnx"]
    res = export_triton(src, cfg, ctx.out, overwrite=True)
    return StepResult(metrics={**res.metrics, "from": str(src)}, artifact=Path(res.out))
