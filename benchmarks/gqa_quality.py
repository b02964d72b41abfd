"""Quality of mha-to-gqa on SmolLM2-135M to 1 KV head (MQA, the hardest case), with wall and CPU time.

    OMP_NUM_THREADS=2 python benchmarks/gqa_quality.py --heal-steps 50 --milestones 10 25 50

Protocol (as in issue 7): perplexity on the first 2,048 tokens of the GPL-3 text in chunks of 512;
calibration 8 x 512 tokens of `pydoc_data.topics`; healing on other pydoc windows (2 x 256 tokens per step).
Rows: base, mean-pool, calibrated (closed form), calibrated + heal evaluated after k steps of one N-step
cosine run. "cpu s" is process CPU time (user+sys), comparable across machines that are shared;
"cpu s / 2" is the wall time it corresponds to on 2 dedicated cores. Prints a table, saves a PNG + JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Clock:
    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), self._cpu()

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, self._cpu() - self.cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--heal-steps", type=int, default=50)
    ap.add_argument("--milestones", type=int, nargs="*", default=[10, 25, 50])
    ap.add_argument("--heal-lr", type=float, default=5e-4)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "gqa_quality"))
    args = ap.parse_args()

    import torch

    from kvconvert.convert.gqa import GQAConfig, _mean_replacements, build_model
    from kvconvert.convert.gqa_calibrated import fit_calibrated
    from kvconvert.convert.gqa_stream import iter_source_tensors
    from kvconvert.convert.heal import HealConfig, heal, heal_batches
    from kvconvert.data.calibration import CalibConfig, calibration_batches, load_text, token_stream
    from kvconvert.eval.perplexity import perplexity
    from kvconvert.io import resolve_source
    from kvconvert.models import describe

    torch.manual_seed(0)
    src = resolve_source(args.model)
    tok = src.load_tokenizer()
    eval_ids = token_stream(tok, load_text("builtin:gpl3"))
    view = describe(src.config_dict())
    new_config = {**src.config_dict(), "num_key_value_heads": args.groups}
    tensors = dict(iter_source_tensors(src))
    rows: list[dict] = []

    def row(name: str, model, wall: float, cpu: float) -> None:
        ppl = perplexity(model, eval_ids, chunk=512, max_tokens=2048)
        rows.append({"method": name, "perplexity": ppl, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)})
        print(f"{name:<34}{ppl:>12.2f}{wall:>10.1f}{cpu:>10.1f}{cpu / 2:>10.1f}", flush=True)

    print(f"{view.model_type}: {view.num_heads} heads, {view.num_kv_heads} -> {args.groups} KV heads")
    print(f"{'method':<34}{'perplexity':>12}{'wall s':>10}{'cpu s':>10}{'cpu s/2':>10}")
    teacher = src.load_model()
    row("base", teacher, 0.0, 0.0)
    clock = Clock()
    mean = build_model(new_config, {**tensors, **_mean_replacements(src, view, args.groups)})
    row("mean", mean, *clock.read())
    del mean
    clock = Clock()
    cfg = GQAConfig(groups=args.groups, method="calibrated")
    replacements, fit = fit_calibrated(teacher, view, cfg, calibration_batches(tok, CalibConfig()), progress=False)
    student = build_model(new_config, {**tensors, **replacements})
    fit_wall, fit_cpu = clock.read()
    row("calibrated (closed form)", student, fit_wall, fit_cpu)
    if args.heal_steps:
        hcfg = HealConfig(steps=args.heal_steps, lr=args.heal_lr, seed=1)
        data = heal_batches(tok, hcfg)
        clock = Clock()
        spent = {"wall": 0.0, "cpu": 0.0}

        def on_step(step: int, loss: float) -> None:
            if step in args.milestones:
                wall, cpu = clock.read()
                t0 = Clock()
                row(f"calibrated + heal {step}/{args.heal_steps} steps", student,
                    fit_wall + wall - spent["wall"], fit_cpu + cpu - spent["cpu"])
                w, c = t0.read()  # evaluation time is not healing time
                spent["wall"] += w
                spent["cpu"] += c

        heal(student, teacher, hcfg, calib=data, progress=False, on_step=on_step)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "fit": {k: v for k, v in fit.items()
                                                                           if k != "layers"}}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh([r["method"] for r in rows][::-1], [r["perplexity"] for r in rows][::-1], color="tab:blue")
    ax.set_xscale("log")
    ax.axvline(rows[0]["perplexity"] * 1.5, color="green", ls="--", label="1.5 x base")
    ax.axvline(187, color="red", ls=":", label="goal 187")
    for i, r in enumerate(rows[::-1]):
        ax.text(r["perplexity"], i, f" {r['perplexity']:.1f} ({r['cpu_s'] / 2:.0f} s)", va="center", fontsize=8)
    ax.set_xlabel("perplexity (GPL-3, 2048 tokens; log scale); in brackets: CPU s / 2")
    ax.set_title(f"SmolLM2-135M, {view.num_kv_heads} -> {args.groups} KV heads")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"saved {out.with_suffix('.png')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
