"""The skeleton every conversion pass shares, so a pass writes only what is its own (its checks, data, fit, files).

    run = PassRun.start("fit_latent", model, cfg.model_dump(), out, overwrite, check=check_input)
    run.check_room(student=True, hint=...)        # only where the pass holds whole models in RAM
    data = ...                                    # the pass's calibration data, loaded before anything is written
    with run.output() as tmp:                     # a temporary folder beside `out`, renamed into place on success
        ...                                       # the fit, the tensors, config.json; figures into run.metrics
        run.write_record(tmp)                     # kvconvert.json: source, inherited passes, this pass
    if cfg.evaluate:
        run.evaluate(cfg.eval, progress)          # held-out figures of output and input, into the record
    return run.result()                           # PassResult(out, metrics, record)

Order of the refusals (one line each, before anything is loaded or written): the source (`as_source`), the
pass's own config check (`check(source, view)`), the output folder (`io.output_dir.check_target`), the room.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import ModelSource, PassResult, atomic_output_dir, check_target, provenance, resolve_source
from ..io.output_dir import KIND_OF_PASS
from ..models import AttentionView, describe


def as_source(model, what: str | None = None) -> ModelSource:
    """`model` (spec, path or ModelSource) as a ModelSource; `what` ("student", "teacher") prefixes its error."""
    if isinstance(model, ModelSource):
        return model
    try:
        return resolve_source(model)
    except UserError as exc:
        if what is None:
            raise
        raise UserError(f"{what}: {exc}") from None


@dataclass
class PassRun:
    """One run of pass `name` from `source` into `out`: its inputs, its metrics and its provenance record.

    `inputs`: every folder the pass reads (the source first); the output may overlap none of them.
    `params`: the resolved config recorded in kvconvert.json. `metrics`: the pass's figures, recorded with it.
    """

    name: str
    source: ModelSource
    out: Path
    params: dict[str, Any]
    overwrite: bool | str = False
    inputs: tuple[Path, ...] = ()
    t0: float = field(default_factory=time.perf_counter)
    config: dict[str, Any] = field(default_factory=dict)
    view: AttentionView | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] | None = None

    @classmethod
    def start(cls, name: str, model, params: dict[str, Any], out, overwrite: bool | str = False, *,
              check: Callable[[ModelSource, AttentionView], Any] | None = None, extra_inputs: tuple = (),
              source_name: str | None = None) -> PassRun:
        """Resolve the source, run the pass's `check(source, view)`, then refuse an output folder it may not write.

        `check` may return more input folders (a teacher it resolved): the output may overlap none of them."""
        t0 = time.perf_counter()
        source = as_source(model, source_name)
        config = source.config_dict()
        view = describe(config)
        named = check(source, view) if check is not None else None
        inputs = (source.path, *(Path(p) for p in (*extra_inputs, *(named or ()))))
        check_target(out, overwrite, inputs, kind=KIND_OF_PASS.get(name))
        return cls(name, source, Path(out), params, overwrite, inputs, t0, config, view)

    @property
    def kind(self) -> str | None:
        return KIND_OF_PASS.get(self.name)

    def check_room(self, placement=None, *, student: bool, hint: str | None = None) -> None:
        """UserError, before anything is loaded, when the reference (plus a fp32 student) cannot fit in RAM."""
        from .placement import PlacementConfig, check_fits_in_ram

        check_fits_in_ram(self.source.reader().num_parameters(), placement or PlacementConfig(), student=student,
                          hint=hint)

    @contextmanager
    def output(self) -> Iterator[Path]:
        """The temporary folder to write into; it replaces `out` when the block ends without error."""
        with atomic_output_dir(self.out, self.overwrite, self.inputs, self.kind) as tmp:
            yield tmp

    def write_record(self, folder: Path, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """kvconvert.json in `folder`: the source, the source's own passes, then this one with its params and
        `metrics` (default: `self.metrics`, the same dict, so later figures reach the pass entry too)."""
        self.record = provenance.new_record(self.source.provenance(), parent=provenance.read(self.source.path))
        provenance.add_pass(self.record, self.name, self.params, time.perf_counter() - self.t0,
                            self.metrics if metrics is None else metrics)
        provenance.write(folder, self.record)
        return self.record

    def evaluate(self, cfg, progress: bool = True, aliases: dict[str, str] | None = None) -> dict[str, Any]:
        """After `out` is in place: held-out figures of output and input (`evaluate_pass_output`), merged into
        the metrics and the written record (whose `output` listing is kept). `aliases`: new key -> figure key."""
        figures = evaluate_pass_output(self.source, self.out, cfg, progress)
        for new, old in (aliases or {}).items():
            if old in figures:
                figures[new] = figures[old]
        self.metrics.update(figures)
        self.record["passes"][-1]["metrics"].update(figures)
        self.record["metrics"].update(figures)
        self.record["passes"][-1]["seconds"] = round(time.perf_counter() - self.t0, 3)
        written = provenance.read(self.out) or {}
        if "output" in written:
            self.record["output"] = written["output"]
        provenance.write(self.out, self.record)
        return figures

    def result(self) -> PassResult:
        return PassResult(self.out.resolve(), self.metrics, self.record or {})


def evaluate_pass_output(source: ModelSource, out: Path, cfg, progress: bool) -> dict[str, Any]:
    """Held-out figures of a pass's output and of its input (each run layer by layer from its checkpoint), for
    kvconvert.json `metrics`; where they cannot run (no tokenizer, no room) one line says so and how to run them."""
    from ..eval.evaluate import eval_room, evaluate_source, load_eval_tokenizer

    try:
        tokenizer = load_eval_tokenizer(source, cfg)
        why = eval_room(source, cfg)
        if why:
            raise UserError(why)
        converted = evaluate_source(resolve_source(out), cfg, progress, tokenizer)
        base = evaluate_source(source, cfg, progress, tokenizer)
    except (UserError, MemoryError) as exc:
        reason = str(exc) or type(exc).__name__
        print(f"kvconvert: evaluation skipped ({reason}); run it with: kvconvert eval {out} --baseline "
              f"{source.spec}", file=sys.stderr)
        return {"eval_skipped": reason}
    return {"eval": converted, "baseline_eval": base, "perplexity_ratio": converted["perplexity"] / base["perplexity"]}
