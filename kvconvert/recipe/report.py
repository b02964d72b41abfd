"""The run report: `report.md`, a self-contained `report.html` (PNGs embedded) and `report.json`.

First a one-line recommendation and the operating points (`operating_points`: the source, then every model
the run made, and each with the sparse decode policy chosen for it): KV bytes/token, KV read per decode
step at the recipe's context, perplexity and needle retrieval, each also as a ratio to the source. Then one
row per stage (the source, then every step): KV bytes/token and KV GiB at the recipe's context and batch (of
the model current after the step), perplexity, needle score, export diff, engine size, wall time. Plots:
the Pareto front of KV size vs perplexity (needle score as colour) drawn here, then every PNG the steps wrote.
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


PPL_LIMIT, NEEDLE_LIMIT = 1.15, 0.9  # the recommendation: perplexity within 15%, 90% of the source's retrieval


def operating_points(rows: list[dict[str, Any]], records: list[dict[str, Any]], context: int) -> list[dict[str, Any]]:
    """One point per model the run measured (last perplexity / dense needle wins), plus one per model and
    sparse decode policy that a needle step scored. Keys: label, model, policy, kv_bytes_per_token,
    kv_read_mib (KV bytes one sequence's decode step reads at `context`), perplexity, needle."""
    by_model: dict[str, dict[str, Any]] = {}
    policies: dict[str, dict[str, Any]] = {}
    policy: dict[str, Any] | None = None
    for row, rec in zip(rows, [None] + list(records)):
        m = "source" if rec is None else row["model"]  # row 0 names the source by its spec, steps by "source"
        point = by_model.setdefault(m, {"label": "source" if m == "source" else m, "model": m, "policy": None,
                                        "kv_bytes_per_token": row["kv_bytes_per_token"], "decode_read": 1.0})
        if rec is None:
            continue
        metrics = rec.get("metrics") or {}
        if rec["step"] == "sparse_policy":
            policy = {"name": metrics.get("policy"), "decode_read": row.get("decode_read", 1.0), "model": m}
        if row.get("perplexity") is not None:
            point["perplexity"] = row["perplexity"]
        if rec["step"] == "needle":
            retrieval = metrics.get("retrieval") or {}
            if "dense" in retrieval:
                point["needle"] = retrieval["dense"]
            elif row.get("needle") is not None:
                point["needle"] = row["needle"]
            if policy is not None and policy["model"] == m:
                name = next((k for k in retrieval if k != "dense"), None)
                if name is not None:
                    policies[f"{m}+{name}"] = {"label": f"{m} + {policy['name']}", "model": m, "policy": policy["name"],
                                               "kv_bytes_per_token": row["kv_bytes_per_token"],
                                               "decode_read": policy["decode_read"], "needle": retrieval[name]}
    points = list(by_model.values())
    for p in policies.values():
        p["perplexity"] = by_model[p["model"]].get("perplexity")  # decode policies keep the dense prefill
        points.append(p)
    for p in points:
        p["kv_read_mib"] = p["kv_bytes_per_token"] * context * p["decode_read"] / 2**20
    src = points[0]
    for p in points:
        p["kv_ratio"] = p["kv_bytes_per_token"] / src["kv_bytes_per_token"]
        p["read_ratio"] = p["kv_read_mib"] / src["kv_read_mib"]
        if p.get("perplexity") is not None and src.get("perplexity"):
            p["perplexity_ratio"] = p["perplexity"] / src["perplexity"]
        if p.get("needle") is not None and src.get("needle"):
            p["needle_ratio"] = p["needle"] / src["needle"]
    return [p for p in points if p.get("perplexity") is not None or p.get("needle") is not None or p is src]


def recommendation(points: list[dict[str, Any]]) -> str:
    """One line: the operating point with the least KV read per decode step among those within 15% of the
    source's perplexity and with 90% of its needle retrieval (else the closest miss)."""
    if len(points) < 2:
        return "Only the source was measured; add conversion steps to compare operating points."
    cand = [p for p in points[1:] if p.get("perplexity_ratio") is not None]
    ok = [p for p in cand if p["perplexity_ratio"] <= PPL_LIMIT
          and (p.get("needle_ratio") is None or p["needle_ratio"] >= NEEDLE_LIMIT)]
    if ok:
        best = min(ok, key=lambda p: (p["kv_read_mib"], p["kv_bytes_per_token"], p["perplexity_ratio"]))
        needle = f", needle {best['needle_ratio']:.0%} of the source's" if best.get("needle_ratio") is not None else ""
        return (f"Recommended: {best['label']}: KV cache {1 / best['kv_ratio']:.1f}x smaller "
                f"({best['kv_bytes_per_token']:,} B/token), {1 / best['read_ratio']:.1f}x less KV read per decode "
                f"step, perplexity x{best['perplexity_ratio']:.3f}{needle}.")
    if not cand:
        return "No converted model was evaluated (add an eval step after each conversion)."
    best = min(cand, key=lambda p: p["perplexity_ratio"])
    return (f"No operating point keeps perplexity within {PPL_LIMIT - 1:.0%} and {NEEDLE_LIMIT:.0%} of needle "
            f"retrieval; closest: {best['label']} (perplexity x{best['perplexity_ratio']:.3f}, "
            f"KV {1 / best['kv_ratio']:.1f}x smaller).")


POINT_COLUMNS = [  # (key, header, format)
    ("kv_bytes_per_token", "KV B/token", "{:,}"),
    ("kv_ratio", "KV vs source", "{:.2f}x"),
    ("kv_read_mib", "KV read/decode step MiB", "{:.2f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("perplexity_ratio", "ppl vs source", "{:.3f}x"),
    ("needle", "needle", "{:.3f}"),
    ("needle_ratio", "needle vs source", "{:.0%}"),
]


def _points_table(points: list[dict[str, Any]]) -> list[list[str]]:
    return [[p["label"]] + ["" if p.get(k) is None else f.format(p[k]) for k, _, f in POINT_COLUMNS] for p in points]


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


def draw_pareto(points: list[tuple[str, int, float]], path: Path, title: str,
                needles: dict[str, float] | None = None) -> Path:
    """KV bytes/token vs perplexity; `needles` (model -> needle retrieval) colours the points and labels them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    needles = needles or {}
    fig, ax = plt.subplots(figsize=(6.8, 4.4), dpi=110)
    scored = [p for p in points if p[0] in needles]
    plain = [p for p in points if p[0] not in needles]
    if plain:
        ax.scatter([p[1] for p in plain], [p[2] for p in plain], color="tab:gray", zorder=3, label="needle not run")
    if scored:
        sc = ax.scatter([p[1] for p in scored], [p[2] for p in scored], c=[needles[p[0]] for p in scored],
                        cmap="RdYlGn", vmin=0, vmax=1, s=60, edgecolors="k", zorder=4)
        fig.colorbar(sc, ax=ax, label="needle retrieval (dense)")
    front = pareto_front(points)
    ax.plot([p[1] for p in front], [p[2] for p in front], color="tab:orange", lw=1.5, zorder=2,
            drawstyle="steps-post", label="Pareto front")
    for name, kv, ppl in points:
        note = f"  needle {needles[name]:.2f}" if name in needles else ""
        ax.annotate(name + note, (kv, ppl), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("KV cache bytes per token")
    ax.set_ylabel("perplexity (lower is better)")
    if points and max(p[2] for p in points) > 3 * min(p[2] for p in points):
        ax.set_yscale("log")
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
    if key == "kv_gib":
        return f"{v:,.2f}" if v >= 1 else f"{v:.3g}"
    return fmt.format(v)


def write_report(out: Path, recipe: Recipe, source: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    h = recipe.header
    rows = report_rows(source, records)
    points = pareto_points(rows)
    ops = operating_points(rows, records, h.context)
    needles = {p["model"]: p["needle"] for p in ops if p["policy"] is None and p.get("needle") is not None}
    plots: list[Path] = []
    if points:
        plots.append(draw_pareto(points, out / PARETO, f"{recipe.name}: KV size vs perplexity ({h.kv_dtype})",
                                 needles))
    plots += step_plots(out, records)
    report = {"recipe": recipe.name, "model": h.model, "context": h.context, "batch": h.batch,
              "kv_dtype": h.kv_dtype, "recommendation": recommendation(ops), "operating_points": ops,
              "rows": rows, "pareto": [list(p) for p in points],
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
    pheads = ["operating point"] + [t for _, t, _ in POINT_COLUMNS]
    lines = [f"# kvconvert run: {report['recipe']}", "", f"**{report['recommendation']}**", "",
             f"Model `{report['model']}`; KV cache {report['kv_dtype']}, context {report['context']:,}, "
             f"batch {report['batch']}. KV read per decode step is for one sequence at that context; perplexity of "
             "a sparse decode policy is the model's (dense prefill).", "",
             "| " + " | ".join(pheads) + " |", "|" + "---|" * len(pheads)]
    lines += ["| " + " | ".join(row) + " |" for row in _points_table(report["operating_points"])]
    lines += ["", "## Stages", "", "Figures of a step describe the model current after it.", "",
              "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(row) + " |" for row in _table(report)]
    lines += ["", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in report["plots"]] or ["(no perplexity was measured, so no Pareto plot)"]
    lines += ["", "## Resolved recipe", "", "```yaml", recipe.dump().rstrip(), "```", ""]
    return "\n".join(lines)


def render_html(report: dict[str, Any], recipe: Recipe, out: Path) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(x)}</th>" for x in _headers(report))
    phead = "".join(f"<th>{esc(x)}</th>" for x in ["operating point"] + [t for _, t, _ in POINT_COLUMNS])
    pbody = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                    for row in _points_table(report["operating_points"]))
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
<p><b>{esc(report['recommendation'])}</b></p>
<table><tr>{phead}</tr>{pbody}</table>
<h2>Stages</h2>
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
    ptable = [["operating point"] + [t for _, t, _ in POINT_COLUMNS]] + _points_table(report["operating_points"])
    pw = [max(len(r[i]) for r in ptable) for i in range(len(ptable[0]))]
    plines = ["  ".join(r[i].ljust(pw[i]) if i == 0 else r[i].rjust(pw[i]) for i in range(len(r))) for r in ptable]
    return "\n".join(["", report["recommendation"], ""] + plines + [""] + lines + [
        "",
        f"Run folder  {out}   (one subfolder per step: {', '.join(r['stage'] for r in report['rows'][1:])})",
        f"Report      {out / 'report.md'}  |  {out / 'report.html'} (self-contained)  |  {out / 'report.json'}",
        f"Also        {out / 'recipe.resolved.yaml'}, {out / 'run.log'}, {out / 'run-state.json'}",
    ])
