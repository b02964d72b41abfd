"""fit-latent quality on SmolLM2-135M: held-out perplexity against KV-cache fraction.

Methods (all: 8 x 512 calibration tokens of builtin:pydoc-topics, eval on the first 2,048 tokens of
builtin:gpl3 in chunks of 512, run through the real latent runtime):
  plain        plain whitened SVD, separate K/V, uniform ranks (the issue's reference method)
  uniform      Fisher-weighted fit (loss-aware K/V error), uniform ranks
  allocated    Fisher-weighted fit, separate K/V latents, ranks allocated across layers/K/V from one budget
  joint        as allocated with one joint KV latent per layer
  healed       joint (--heal-base) + KD healing (`kvconvert.convert.heal`, --heal-steps steps)
Prints a markdown table, writes latent_quality.json and latent_quality.png (Pareto plot) to --out.

  OMP_NUM_THREADS=2 python benchmarks/latent_quality.py --out runs/latent_quality
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REFERENCE = {1.0: 23.8, 0.67: 32.5, 0.5: 37.9, 0.33: 58.9}  # the plain whitened SVD figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.67, 0.5, 0.33, 0.25])
    ap.add_argument("--methods", nargs="+", default=["plain", "uniform", "allocated", "joint", "healed"])
    ap.add_argument("--heal-base", default="joint", help="which method's fit is healed")
    ap.add_argument("--heal-steps", type=int, default=30)
    ap.add_argument("--heal-seqlen", type=int, default=128)
    ap.add_argument("--heal-batch", type=int, default=2)
    ap.add_argument("--heal-fractions", type=float, nargs="+", default=[0.5])
    ap.add_argument("--out", type=Path, default=Path("runs/latent_quality"))
    ap.add_argument("--replot", type=Path, metavar="JSON", help="only redraw table + PNG from a results JSON")
    args = ap.parse_args()
    if args.replot:
        data = json.loads(args.replot.read_text())
        print(table(data["rows"], data["base_perplexity"]))
        plot(data["rows"], data["base_perplexity"], args.replot.with_suffix(".png"))
        return

    from kvconvert.convert.activations import attention_input_grams
    from kvconvert.convert.heal import HealConfig, heal, heal_batches
    from kvconvert.convert.latent import LatentConfig
    from kvconvert.convert.latent_build import build_latent_model, fit_factors
    from kvconvert.data.calibration import CalibConfig, calibration_batches, load_text, token_stream
    from kvconvert.eval.perplexity import perplexity
    from kvconvert.io import resolve_source
    from kvconvert.models import describe

    args.out.mkdir(parents=True, exist_ok=True)
    source = resolve_source(args.model)
    tok = source.load_tokenizer()
    base = source.load_model()
    config = source.config_dict()
    view = describe(config)
    calib = calibration_batches(tok, CalibConfig())
    eval_ids = token_stream(tok, load_text("builtin:gpl3"))
    t0 = time.perf_counter()
    stats = attention_input_grams(base, view, calib, progress=True)
    from kvconvert.convert.latent_fisher import kv_output_fishers

    fishers = kv_output_fishers(base, view, calib[:LatentConfig.model_fields["sensitivity_samples"].default], progress=True)[0]
    gram_seconds = time.perf_counter() - t0
    base_ppl = perplexity(base, eval_ids)
    print(f"base perplexity {base_ppl:.2f}; calibration statistics (Gram + Fisher) {gram_seconds:.1f}s", flush=True)

    settings = {
        "plain": dict(metric="none", allocation="uniform"),
        "uniform": dict(metric="fisher", allocation="uniform"),
        "allocated": dict(metric="fisher", allocation="sensitivity"),
        "joint": dict(metric="fisher", allocation="sensitivity", joint_kv=True),
    }
    rows = []
    for frac in args.fractions:
        fits = {}
        for method in args.methods:
            key = args.heal_base if method == "healed" else method
            t1 = time.perf_counter()
            if key not in fits:
                cfg = LatentConfig(kv_ratio=frac, evaluate=False, **settings[key])
                fits[key] = fit_factors(base, view, cfg, calib, progress=False, stats=stats,
                                        fishers=fishers if cfg.metric == "fisher" else None)
            fit = fits[key]
            fit_seconds = time.perf_counter() - t1
            if (frac >= 1.0 and rows and rows[-1]["fraction"] >= 1.0) or (
                    method == "healed" and frac not in args.heal_fractions):
                continue  # full rank is the input model whatever the method
            student = build_latent_model(base, view, config, fit)
            heal_seconds = 0.0
            if method == "healed":
                hcfg = HealConfig(steps=args.heal_steps, seqlen=args.heal_seqlen, batch=args.heal_batch)
                heal_seconds = heal(student, base, hcfg, heal_batches(tok, hcfg), progress=False)["seconds"]
            ppl = perplexity(student, eval_ids)
            row = {"fraction": frac, "method": method, "kv_fraction": round(fit.kv_fraction, 4),
                   "perplexity": round(ppl, 3), "calibration_seconds": round(gram_seconds + fit_seconds, 1),
                   "heal_seconds": heal_seconds, "widths": fit.widths}
            rows.append(row)
            print(f"{frac:>5} {method:<10} kv {fit.kv_fraction:.3f} ppl {ppl:8.2f}  calib {row['calibration_seconds']:6.1f}s"
                  f"  heal {heal_seconds:6.1f}s", flush=True)
            (args.out / "latent_quality.json").write_text(json.dumps(
                {"base_perplexity": base_ppl, "gram_seconds": gram_seconds, "rows": rows}, indent=1))
    print(table(rows, base_ppl))
    plot(rows, base_ppl, args.out / "latent_quality.png")


def table(rows, base_ppl) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fracs = sorted(dict.fromkeys(r["fraction"] for r in rows), reverse=True)
    lines = ["| KV fraction | reference | " + " | ".join(methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for f in fracs:
        cells = []
        for m in methods:
            r = next((r for r in rows if r["fraction"] == f and r["method"] == m), None)
            cells.append(f"{r['perplexity']:.2f}" if r else "-")
        ref = REFERENCE.get(round(f, 2))
        lines.append(f"| {f} | {ref if ref else '-'} | " + " | ".join(cells) + " |")
    lines.append(f"\nbase perplexity {base_ppl:.2f}; calibration seconds per fit: " + ", ".join(
        f"{r['method']}@{r['fraction']}={r['calibration_seconds']}" for r in rows))
    return "\n".join(lines)


def plot(rows, base_ppl, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["kv_fraction"], r["perplexity"]) for r in rows if r["method"] == m)
        ax.plot(*zip(*pts), marker="o", label=m)
    ref = sorted(REFERENCE.items())
    ax.plot(*zip(*ref), "k--", marker="x", label="issue reference (plain)")
    ax.axhline(base_ppl, color="grey", lw=0.8, label=f"base {base_ppl:.1f}")
    ax.set_xlabel("KV cache fraction")
    ax.set_ylabel("perplexity (GPL-3, 2,048 tokens)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M fit-latent: perplexity vs KV size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
