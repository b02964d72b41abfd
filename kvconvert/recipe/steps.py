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

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import StrictConfig
from ..eval.evaluate import EvalConfig
from ..models import AttentionView

ARTIFACTS = ("model", "policy", "onnx", "engine", "triton")
FIGURES = ("perplexity", "needle", "export_diff", "engine_bytes")


@dataclass
class StepContext:
    """What a step sees: its own empty-or-stale folder `out` and the artifacts it reads."""

    out: Path
    inputs: dict[str, Any]
    kv_dtype: str = "bf16"
    progress: bool = True

    def model(self):
        """The current model as a `ModelSource` (the recipe's model, or an earlier step's output folder)."""
        from ..io import ModelSource, resolve_source

        m = self.inputs["model"]
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
    plan: Callable[[AttentionView, Any], AttentionView] | None = None
    doc: str = ""


STEPS: dict[str, StepSpec] = {}


def register(name: str, config: type[StrictConfig], *, reads: tuple[str, ...] = ("model",),
             writes: str | None = None, plan: Callable[[AttentionView, Any], AttentionView] | None = None):
    """Decorator adding a step to `STEPS`; `plan(view, cfg)` predicts the model's view after the step."""
    assert writes is None or writes in ARTIFACTS and all(r in ARTIFACTS for r in reads)

    def deco(fn: Callable[[Any, StepContext], StepResult]):
        STEPS[name] = StepSpec(name, config, fn, tuple(reads), writes, plan, (fn.__doc__ or "").strip())
        return fn

    return deco


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


@register("eval", EvalConfig, reads=("model",))
def _eval(cfg: EvalConfig, ctx: StepContext) -> StepResult:
    """Held-out perplexity, KV bytes/token and parameters of the current model (kvconvert.eval)."""
    from ..eval.evaluate import evaluate_source

    metrics = evaluate_source(ctx.model(), cfg, progress=ctx.progress)
    write_json(ctx.out / "eval.json", metrics)
    return StepResult(metrics=metrics, figures={"perplexity": metrics["perplexity"]})
