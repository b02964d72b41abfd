"""Run a recipe: each step into `OUT/NN-step/`, resumable, logged, then the report.

Resumption: before a step runs, its key = sha256(step name, resolved config, content hashes of the
artifacts it reads) is compared with the key recorded in `OUT/run-state.json` when it last finished; an
equal key (and the folder still present) skips it unless `force`. Artifact hashes are content hashes
(file BLAKE3 hashes memoised by path/size/mtime), so a changed upstream output re-runs everything below it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import UserError
from ..io.hashing import folder_hash
from ..models import describe
from .schema import Recipe
from .steps import STEPS, StepContext

STATE = "run-state.json"
RESOLVED = "recipe.resolved.yaml"
LOG = "run.log"
log = logging.getLogger("kvconvert.recipe.run")  # run.log only (the terminal gets `echo` lines)
log.propagate = False


@dataclass
class RunResult:
    out: Path
    records: list[dict[str, Any]]
    report: dict[str, Any]


def artifact_hash(value: Any) -> str:
    """Content hash of an artifact: a ModelSource, a folder (all files) or a file."""
    from ..io import ModelSource

    if isinstance(value, ModelSource):
        return value.content_hash()
    path = Path(value)
    if path.is_file():
        return folder_hash([path], path.parent)
    files = [p for p in sorted(path.rglob("*")) if p.is_file()]
    return folder_hash(files, path)


def step_key(name: str, config: dict[str, Any], input_hashes: dict[str, str]) -> str:
    blob = json.dumps({"step": name, "config": config, "inputs": input_hashes}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_state(out: Path) -> dict[str, Any]:
    f = out / STATE
    if not f.is_file():
        return {"steps": {}}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return {"steps": {}}


def save_state(out: Path, state: dict[str, Any]) -> None:
    tmp = out / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=2, default=_json_default) + "\n")
    os.replace(tmp, out / STATE)


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)


def kv_figures(model: Any, kv_dtype: str, context: int, batch: int) -> dict[str, Any]:
    """KV bytes/token and GiB of a model (ModelSource or folder), from its config alone."""
    from ..io import ModelSource

    cfg = model.config_dict() if isinstance(model, ModelSource) else json.loads((Path(model) / "config.json").read_text())
    bpt = describe(cfg).kv_bytes_per_token(kv_dtype)
    return {"kv_bytes_per_token": bpt, "kv_gib": bpt * context * batch / 2**30}


def run_recipe(recipe: Recipe, out: str | os.PathLike, *, force: bool = False, progress: bool = True,
               echo: Callable[[str], None] = print) -> RunResult:
    """Run every step of `recipe` under `out`; returns the per-step records and the report summary."""
    from ..io import resolve_source
    from .report import write_report

    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / STATE).is_file() and not (out / RESOLVED).is_file():
        raise UserError(f"--out {out} is not empty and is not a kvconvert run folder; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / RESOLVED).write_text(f"# resolved recipe written by kvconvert run (from {recipe.path or 'memory'})\n"
                                + recipe.dump())
    handler = _file_log(out / LOG)
    h = recipe.header
    try:
        source = resolve_source(h.model)
        state = load_state(out)
        state["recipe"] = recipe.to_dict()
        state.setdefault("steps", {})
        state["source"] = {"spec": h.model, **kv_figures(source, h.kv_dtype, h.context, h.batch)}
        artifacts: dict[str, Any] = {"model": source, "source": source}
        hashes = {"model": artifact_hash(source)}
        hashes["source"] = hashes["model"]
        model_at = "source"
        records = []
        log.info("run %s -> %s (%d steps)", recipe.name, out, len(recipe.steps))
        bar = tqdm(total=len(recipe.steps), desc=recipe.name, unit="step", disable=not progress)
        for folder_name, step in zip(recipe.folder_names(), recipe.steps):
            spec = STEPS[step.step]
            folder = out / folder_name
            cfg_json = step.config.model_dump(mode="json")
            used = [r for r in spec.reads + spec.optional if r in artifacts]
            inputs = {r: hashes[r] for r in used}
            key = step_key(step.step, cfg_json, inputs)
            prev = state["steps"].get(folder_name)
            acts_on = model_at
            if not force and prev and prev.get("status") == "done" and prev.get("key") == key and folder.exists():
                rec = {**prev, "cached": True}
                _say(echo, f"[{folder_name}] unchanged, skipped (finished earlier in {prev['seconds']:.1f} s)")
            else:
                _say(echo, f"[{folder_name}] running {step.step}" + (f" on {model_at}" if "model" in spec.reads else ""))
                ctx = StepContext(out=folder, inputs={r: artifacts[r] for r in used}, kv_dtype=h.kv_dtype,
                                  context=h.context, batch=h.batch, progress=progress)
                rec = _run_step(spec, step.config, ctx, key, cfg_json, state, out)
                _say(echo, f"[{folder_name}] done in {rec['seconds']:.1f} s" + _figure_note(rec["figures"]))
            if spec.writes:
                artifacts[spec.writes] = out / rec["artifact"]
                hashes[spec.writes] = rec["output_hash"]
                if spec.writes == "model":
                    model_at = folder_name
            rec["model"] = acts_on if spec.writes != "model" else folder_name
            rec.update(kv_figures(artifacts["model"], h.kv_dtype, h.context, h.batch))
            state["steps"][folder_name] = {k: v for k, v in rec.items() if k != "cached"}
            save_state(out, state)
            records.append({"folder": folder_name, "step": step.step, **rec})
            bar.update(1)
        bar.close()
        report = write_report(out, recipe, state["source"], records)
        _say(echo, f"report: {out / 'report.md'} and {out / 'report.html'}")
        return RunResult(out, records, report)
    finally:
        logging.getLogger("kvconvert").removeHandler(handler)
        log.removeHandler(handler)
        handler.close()


def step_files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file a step left in its folder (recorded in run-state.json)."""
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def clear_step_folder(folder: Path, previous: dict[str, Any] | None) -> None:
    """Remove what the step's earlier run wrote (as recorded, same size), so it re-runs into a clean folder;
    anything else in the folder is left for the pass's output guard to refuse."""
    files = (previous or {}).get("files")
    if not isinstance(files, dict) or not folder.is_dir():
        return
    for rel, size in files.items():
        f = folder / rel
        if f.is_file() and not f.is_symlink() and f.resolve().is_relative_to(folder.resolve()) \
                and f.stat().st_size == size:
            f.unlink()
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()


def _run_step(spec, config, ctx: StepContext, key: str, cfg_json: dict[str, Any], state: dict[str, Any],
              out: Path) -> dict[str, Any]:
    folder = ctx.out
    clear_step_folder(folder, state["steps"].pop(folder.name, None))
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        result = spec.run(config, ctx)
    except BaseException as exc:
        seconds = time.perf_counter() - t0
        log.error("%s failed after %.1f s: %s\n%s", folder.name, seconds, exc, traceback.format_exc())
        state["steps"][folder.name] = {"status": "failed", "key": key, "seconds": round(seconds, 3),
                                       "error": f"{type(exc).__name__}: {exc}"}
        save_state(out, state)
        raise
    seconds = time.perf_counter() - t0
    rec: dict[str, Any] = {"status": "done", "key": key, "config": cfg_json, "seconds": round(seconds, 3),
                           "cpu_seconds": round(time.process_time() - c0, 3),
                           "figures": result.figures, "metrics": result.metrics}
    if spec.writes:
        if result.artifact is None:
            raise RuntimeError(f"step {spec.name} returned no {spec.writes}")
        artifact = Path(result.artifact).resolve()
        rec["artifact"] = str(artifact.relative_to(out))
        rec["output_hash"] = artifact_hash(artifact)
    rec["files"] = step_files(folder)
    return rec


def _figure_note(figures: dict[str, Any]) -> str:
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()]
    return f" ({', '.join(parts)})" if parts else ""


def _say(echo: Callable[[str], None], line: str) -> None:
    log.info(line)
    tqdm.write(line) if echo is print else echo(line)


def _file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger("kvconvert").addHandler(handler)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler
