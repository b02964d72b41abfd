"""`kvconvert run --dry-run`: the validated plan with resolved fields and the expected KV size per step."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..models import AttentionView, describe
from .schema import Recipe
from .steps import STEPS


def model_config(spec: str) -> tuple[dict[str, Any] | None, str]:
    """The model's config.json without downloading weights: local folders/builtins directly, hub ids from
    the local hub cache or (when the hub answers within 3 s) by fetching config.json alone."""
    path = Path(spec).expanduser()
    if spec.startswith("builtin:") or path.exists():
        from ..io import resolve_source

        return resolve_source(spec).config_dict(), ""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None, "huggingface_hub is not installed"
    try:
        return json.loads(Path(hf_hub_download(spec, "config.json", local_files_only=True)).read_text()), ""
    except Exception:  # noqa: BLE001 - not cached: try the hub below
        pass
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return None, "offline and not in the local hub cache"
    try:
        return json.loads(Path(hf_hub_download(spec, "config.json")).read_text()), ""
    except Exception as exc:  # noqa: BLE001 - gated/missing repos: the plan still prints
        return None, (str(exc).splitlines() or [type(exc).__name__])[0][:120]


def plan_rows(recipe: Recipe, view: AttentionView | None) -> list[dict[str, Any]]:
    """One row per step (row 0 = the source): folder, which model it acts on, expected KV figures."""
    h = recipe.header
    rows = [_row(0, "source", None, "source", view, h)]
    model_at, source_view = "source", view
    for i, (folder, step) in enumerate(zip(recipe.folder_names(), recipe.steps), 1):
        spec = STEPS[step.step]
        acts_on = model_at
        if view is not None and spec.plan is not None:
            try:
                view = spec.plan(view, step.config) or source_view  # None: the step makes the source current again
            except UserError as exc:
                raise UserError(f"steps[{i}] ({step.step}) on {acts_on}: {exc}") from None
        if spec.writes == "model":
            model_at = folder
        row = _row(i, step.step, folder, acts_on, view, h)
        row["fields"] = flatten(step.config.model_dump(mode="json"))
        rows.append(row)
    return rows


def _row(i: int, step: str, folder: str | None, acts_on: str, view: AttentionView | None, h) -> dict[str, Any]:
    bpt = view.kv_bytes_per_token(h.kv_dtype) if view is not None else None
    return {"index": i, "step": step, "folder": folder, "model": acts_on, "kv_bytes_per_token": bpt,
            "kv_gib": bpt * h.context * h.batch / 2**30 if bpt is not None else None}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def format_plan(recipe: Recipe, out: Path, rows: list[dict[str, Any]], view: AttentionView | None,
                note: str = "") -> str:
    h = recipe.header
    lines = [f"Recipe   {recipe.name}" + (f"  ({recipe.path})" if recipe.path else "") + f", version {h.version}",
             f"Model    {h.model}"]
    if view is not None:
        lines[-1] += (f"  ({view.model_type}: {view.num_layers} layers, {view.num_heads} query heads, "
                      f"{view.num_kv_heads} KV heads, head dim {view.head_dim})")
    else:
        lines.append(f"         (config not available: {note}; KV sizes omitted)")
    lines += [f"KV       {h.kv_dtype}, context {h.context:,} x batch {h.batch}",
              f"Output   {out}", "",
              f"  {'#':>2}  {'step':<15}{'folder':<20}{'acts on':<20}{'KV B/token':>12}{'KV GiB':>10}"]
    for r in rows:
        kv = f"{r['kv_bytes_per_token']:>12,}{r['kv_gib']:>10.2f}" if r["kv_bytes_per_token"] is not None else ""
        lines.append(f"  {r['index']:>2}  {r['step']:<15}{r['folder'] or '':<20}{r['model']:<20}{kv}")
        line = "       "
        for item in (f"{k}={v}" for k, v in r.get("fields", {}).items()):
            if len(line) + len(item) > 108 and line.strip():
                lines.append(line)
                line = "       "
            line += " " + item
        if line.strip():
            lines.append(line)
    return "\n".join(lines)


def dry_run(recipe: Recipe, out: Path) -> tuple[str, list[dict[str, Any]]]:
    cfg, note = model_config(recipe.header.model)
    view = describe(cfg) if cfg is not None else None
    rows = plan_rows(recipe, view)
    return format_plan(recipe, out, rows, view, note), rows
