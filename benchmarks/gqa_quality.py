"""Healed MQA SmolLM2-135M (3 -> 1 KV heads): perplexity against healing time, old vs new heal settings.

    OMP_NUM_THREADS=2 nice python benchmarks/gqa_quality.py --budget 300 --milestones 100 200 300

Protocol: perplexity on the first 2,048 tokens of the GPL-3 text (chunks of 512; never trained on);
calibration 8 x 512 tokens of `pydoc_data.topics`; healing windows from the same pydoc text (other windows,
seed 1). Rows: base, the data-free mean conversions (consecutive; similarity grouping + RoPE alignment), the
calibrated closed form, then each heal setting started from the same converted model (`--start`) and
evaluated whenever its healing CPU time passes a milestone (evaluation time is not healing time). The machine
is shared, so the budget and the milestones are in process CPU seconds (user+sys, all threads); "idle min"
= CPU s / 2 / 60 is the wall time that corresponds to on 2 dedicated cores. Needle retrieval (1,024 and
2,048 tokens) of the source and of each healed model ends the run. Prints a table, saves PNG + JSON + TXT.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {  # name -> HealConfig fields; "old" is what the demo and this benchmark used before issue 14
    "old": dict(steps=50, lr=5e-4, seqlen=256, batch=2, trainable="attention"),
    "new": dict(steps=80, lr=1e-3, seqlen=512, batch=1, trainable="attention", hidden_weight=1.0, warmup=4),
}


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
    ap.add_argument("--start", choices=["calibrated", "mean"], default="calibrated",
                    help="the converted model every heal setting starts from")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--budget", type=float, default=300, help="healing CPU seconds per setting")
    ap.add_argument("--milestones", type=float, nargs="*", default=[100, 200, 300], help="CPU seconds")
    ap.add_argument("--needle", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--mean-rows", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the data-free mean conversions")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "gqa_quality"))
    ap.add_argument("--replot", metavar="JSON", help="only redraw the PNG from a saved JSON")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.replot:
        data = json.loads(Path(args.replot).read_text())
        plot(data, out.with_suffix(".png"))
        return

    import torch

    from kvconvert.convert.gqa import GQAConfig, _mean_merger, build_model
    from kvconvert.convert.gqa_calibrated import fit_calibrated
    from kvconvert.convert.gqa_stream import iter_source_tensors
    from kvconvert.convert.heal import HealConfig, heal, heal_batches
    from kvconvert.data.calibration import CalibConfig, calibration_batches, load_text, token_stream
    from kvconvert.eval.needle import NeedleConfig, run_needle
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
    result: dict = {"title": f"SmolLM2-135M, {view.num_kv_heads} -> {args.groups} KV heads", "rows": [],
                    "curves": {}, "settings": {k: SETTINGS[k] for k in args.settings}, "needle": {},
                    "threads": torch.get_num_threads()}
    rows = result["rows"]
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
        out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))  # kept if interrupted

    def row(name: str, model, wall: float, cpu: float) -> float:
        ppl = perplexity(model, eval_ids, chunk=512, max_tokens=2048)
        rows.append({"method": name, "perplexity": ppl, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                     "ratio": ppl / rows[0]["perplexity"] if rows else 1.0})
        say(f"{name:<40}{ppl:>11.2f}{rows[-1]['ratio']:>8.2f}x{wall:>9.1f}{cpu:>9.1f}{cpu / 120:>9.2f}")
        return ppl

    say(f"{view.model_type}: {view.num_heads} heads, {view.num_kv_heads} -> {args.groups} KV heads; "
        f"torch threads {torch.get_num_threads()}; heal budget {args.budget:.0f} CPU s per setting")
    say(f"{'method':<40}{'perplexity':>11}{'x base':>9}{'wall s':>9}{'cpu s':>9}{'idle min':>9}")
    teacher = src.load_model()
    row("base", teacher, 0.0, 0.0)
    starts = {}
    means = [("mean (consecutive)", "consecutive", False), ("mean (similarity + RoPE align)", "similarity", True)]
    for name, grouping, align in means if args.mean_rows or args.start == "mean" else []:
        clock = Clock()
        merger = _mean_merger(src, view, GQAConfig(groups=args.groups, grouping=grouping, align=align))
        model = build_model(new_config, {**tensors, **merger.replacements()})
        starts["mean"] = (model, *clock.read())
        row(name, model, *starts["mean"][1:])
    if args.start == "calibrated":
        clock = Clock()
        cfg = GQAConfig(groups=args.groups, method="calibrated")
        replacements, _ = fit_calibrated(teacher, view, cfg, calibration_batches(tok, CalibConfig()), progress=False)
        model = build_model(new_config, {**tensors, **replacements})
        starts["calibrated"] = (model, *clock.read())
        row("calibrated (closed form)", model, *starts["calibrated"][1:])
    start, start_wall, start_cpu = starts[args.start]
    healed = {}
    for setting in args.settings:
        student = copy.deepcopy(start)
        hcfg = HealConfig(seed=1, **SETTINGS[setting])
        data = heal_batches(tok, hcfg)
        clock = Clock()
        spent = {"wall": 0.0, "cpu": 0.0}
        curve = [{"cpu_s": 0.0, "wall_s": 0.0, "perplexity": next(r["perplexity"] for r in rows
                                                                   if r["method"].startswith(args.start))}]
        todo = sorted(args.milestones)

        def on_step(step: int, loss: float) -> bool:
            wall, cpu = clock.read()
            wall, cpu = wall - spent["wall"], cpu - spent["cpu"]
            last = step == hcfg.steps or cpu >= args.budget
            if todo and (cpu >= todo[0] or last):
                while todo and cpu >= todo[0]:
                    todo.pop(0)
                t0 = Clock()
                ppl = row(f"{args.start} + heal {setting} ({step} steps)", student, start_wall + wall,
                          start_cpu + cpu)
                curve.append({"cpu_s": round(cpu, 1), "wall_s": round(wall, 1), "step": step, "loss": loss,
                              "perplexity": ppl})
                result["curves"][setting] = curve
                w, c = t0.read()  # evaluation time is not healing time
                spent["wall"] += w
                spent["cpu"] += c
            return last

        res = heal(student, teacher, hcfg, calib=data, progress=False, on_step=on_step)
        result["curves"][setting] = curve
        result.setdefault("heal", {})[setting] = {k: res[k] for k in ("steps", "seconds", "teacher_seconds",
                                                                       "tokens")}
        healed[setting] = student
    if args.needle:
        ncfg = NeedleConfig(lengths=[1024, 2048], depths=[0.2, 0.5, 0.8])
        for name, model in [("base", teacher), *((f"heal {k}", m) for k, m in healed.items())]:
            res = run_needle(model, tok, ncfg, progress=False)
            result["needle"][name] = {"retrieval": res["retrieval"]["dense"], "scores": res["scores"]["dense"]}
            say(f"needle {name:<33}{res['retrieval']['dense']:>11.3f}  per length {res['scores']['dense']}")
    plot(result, out.with_suffix(".png"))
    say(f"saved {out.with_suffix('.png')}, {out.with_suffix('.json')}, {out.with_suffix('.txt')}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = result["rows"][0]["perplexity"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, curve in result["curves"].items():
        ax.plot([c["cpu_s"] / 120 for c in curve], [c["perplexity"] / base for c in curve], marker="o",
                label=f"heal {name}: {result['settings'][name]}"[:90])
    for limit, style, label in [(2.0, "--", "target 2.0x"), (1.5, ":", "goal 1.5x")]:
        ax.axhline(limit, color="gray", ls=style, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("healing time, minutes on 2 idle cores (process CPU s / 2 / 60)")
    ax.set_ylabel("perplexity / base (GPL-3, 2,048 tokens)")
    needle = result.get("needle") or {}
    note = "; ".join(f"needle {k} {v['retrieval']:.2f}" for k, v in needle.items())
    ax.set_title(result["title"] + (f"\n{note}" if note else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
