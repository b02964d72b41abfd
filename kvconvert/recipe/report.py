"""The run report: `report.md`, a self-contained `report.html` (PNGs embedded) and `report.json`.

One row per stage (the source, then every step): KV bytes/token and KV GiB at the recipe's context and
batch (of the model current after the step), perplexity, needle score, export diff, engine size, wall
time. Plots: the Pareto front of KV size vs perplexity drawn here, then every PNG the steps wrote.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from .schema import Recipe
from .steps import FIGURES

PARETO = "pareto.png"
COLUMNS = [  # (key, header, format)
    ("kv_bytes_per_token", "KV B/token", "{:,}"),
    ("kv_gib", "KV GiB", "{:.3f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("needle", "needle", "{:.3f}"),
    ("decode_read", "KV read/decode token", "{:.1%}"),
    ("export_diff", "export max abs diff", "{:.3g}"),
    ("engine_bytes", "engine MiB", None),
    ("seconds", "wall s", "{:.1f}"),
]


def report_rows(source: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [{"index": 0, "stage": "source", "step": "source", "model": source["spec"],
             "kv_bytes_per_token": source["kv_bytes_per_token"], "kv_gib": source["kv_gib"], "status": ""}]
    for i, rec in enumerate(records, 1):
        row = {"index": i, "stage": rec["folder"], "step": rec["step"], "model": rec["model"],
               "kv_bytes_per_token": rec["kv_bytes_per_token"], "kv_gib": rec["kv_gib"],
               "seconds": rec["seconds"], "status": "cached" if rec.get("cached") else "ran"}
        row.update({k: rec["figures"][k] for k in FIGURES if rec["figures"].get(k) is not None})
        rows.append(row)
    return rows


def pareto_points(rows: list[dict[str, Any]]) -> list[tuple[str, int, float]]:
    """(model stage, KV bytes/token, perplexity) for each model measured; the last measurement wins."""
    points: dict[str, tuple[int, float]] = {}
    for r in rows:
        ppl = r.get("perplexity")
        if ppl is not None and math.isfinite(ppl):
            points[r["model"]] = (r["kv_bytes_per_token"], ppl)
    return [(m, kv, p) for m, (kv, p) in points.items()]


def pareto_front(points: list[tuple[str, int, float]]) -> list[tuple[str, int, float]]:
    """Points not beaten on both KV size and perplexity, by increasing KV size."""
    front, best = [], math.inf
    for p in sorted(points, key=lambda p: (p[1], p[2])):
        if p[2] < best:
            front.append(p)
            best = p[2]
    return front


def draw_pareto(points: list[tuple[str, int, float]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.scatter([p[1] for p in points], [p[2] for p in points], color="tab:blue", zorder=3)
    front = pareto_front(points)
    ax.plot([p[1] for p in front], [p[2] for p in front], color="tab:orange", lw=1.5, zorder=2,
            drawstyle="steps-post", label="Pareto front")
    for name, kv, ppl in points:
        ax.annotate(name, (kv, ppl), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("KV cache bytes per token")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def step_plots(out: Path, records: list[dict[str, Any]]) -> list[Path]:
    plots = []
    for rec in records:
        folder = out / rec["folder"]
        if folder.is_dir():
            plots += sorted(p for p in folder.rglob("*.png") if not any(s.startswith(".") for s in p.parts))
    return plots


def _cell(row: dict[str, Any], key: str, fmt: str | None) -> str:
    v = row.get(key)
    if v is None:
        return ""
    if key == "engine_bytes":
        return f"{v / 2**20:,.1f}"
    return fmt.format(v)


def write_report(out: Path, recipe: Recipe, source: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    h = recipe.header
    rows = report_rows(source, records)
    points = pareto_points(rows)
    plots: list[Path] = []
    if points:
        plots.append(draw_pareto(points, out / PARETO, f"{recipe.name}: KV size vs perplexity ({h.kv_dtype})"))
    plots += step_plots(out, records)
    report = {"recipe": recipe.name, "model": h.model, "context": h.context, "batch": h.batch,
              "kv_dtype": h.kv_dtype, "rows": rows, "pareto": [list(p) for p in points],
              "plots": [str(p.relative_to(out)) for p in plots]}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_md(report, recipe))
    (out / "report.html").write_text(render_html(report, recipe, out))
    return report


def _headers(report: dict[str, Any]) -> list[str]:
    return ["#", "stage", "figures are for"] + [
        f"KV GiB @ {report['context']:,} x {report['batch']}" if k == "kv_gib" else title for k, title, _ in COLUMNS]


def _table(report: dict[str, Any]) -> list[list[str]]:
    return [[str(r["index"]), r["stage"] + (" (cached)" if r["status"] == "cached" else ""), r["model"]]
            + [_cell(r, k, f) for k, _, f in COLUMNS] for r in report["rows"]]


def render_md(report: dict[str, Any], recipe: Recipe) -> str:
    heads = _headers(report)
    lines = [f"# kvconvert run: {report['recipe']}", "",
             f"Model `{report['model']}`; KV cache {report['kv_dtype']}, context {report['context']:,}, "
             f"batch {report['batch']}. Figures of a step describe the model current after it.", "",
             "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(row) + " |" for row in _table(report)]
    lines += ["", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in report["plots"]] or ["(no perplexity was measured, so no Pareto plot)"]
    lines += ["", "## Resolved recipe", "", "```yaml", recipe.dump().rstrip(), "```", ""]
    return "\n".join(lines)


def render_html(report: dict[str, Any], recipe: Recipe, out: Path) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(x)}</th>" for x in _headers(report))
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in _table(report))
    imgs = "".join(
        f"<figure><img alt='{esc(p)}' src='data:image/png;base64,"
        f"{base64.b64encode((out / p).read_bytes()).decode()}'><figcaption>{esc(p)}</figcaption></figure>"
        for p in report["plots"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kvconvert run: {esc(report['recipe'])}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}}
table{{border-collapse:collapse;font-size:14px}} th,td{{border:1px solid #ccc;padding:4px 8px}}
td{{text-align:right}} td:nth-child(2),td:nth-child(3){{text-align:left}} th{{background:#f3f3f3}}
figure{{display:inline-block;margin:1em}} img{{max-width:560px}} pre{{background:#f7f7f7;padding:1em}}
</style></head><body>
<h1>kvconvert run: {esc(report['recipe'])}</h1>
<p>Model <code>{esc(report['model'])}</code>; KV cache {esc(report['kv_dtype'])}, context {report['context']:,},
batch {report['batch']}. Figures of a step describe the model current after it.</p>
<table><tr>{head}</tr>{body}</table>
<h2>Plots</h2>{imgs or '<p>No perplexity was measured, so no Pareto plot.</p>'}
<h2>Resolved recipe</h2><pre>{esc(recipe.dump())}</pre>
</body></html>
"""


def summary_text(report: dict[str, Any], out: Path) -> str:
    """The stage table as aligned text, and where the outputs are (what `kvconvert run` prints last)."""
    heads = _headers(report)
    table = [heads] + _table(report)
    widths = [max(len(r[i]) for r in table) for i in range(len(heads))]
    keep = [i for i in range(len(heads)) if i < 3 or any(r[i] for r in table[1:])]
    lines = ["  ".join(r[i].ljust(widths[i]) if i < 3 else r[i].rjust(widths[i]) for i in keep) for r in table]
    return "\n".join([""] + lines + [
        "",
        f"Run folder  {out}   (one subfolder per step: {', '.join(r['stage'] for r in report['rows'][1:])})",
        f"Report      {out / 'report.md'}  |  {out / 'report.html'} (self-contained)  |  {out / 'report.json'}",
        f"Also        {out / 'recipe.resolved.yaml'}, {out / 'run.log'}, {out / 'run-state.json'}",
    ])
