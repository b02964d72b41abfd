"""Decode ms/step and prefill s of kvconvert's exported decoders against onnxruntime-genai and optimum-onnx.

Same model (SmolLM2-135M-Instruct, `builtin:smollm2-135m`'s dequantized HF folder), ONNX Runtime CPU, THREADS
intra-op threads, fp32, greedy. Each system runs in its own process (`onnx_decode_runner.py`, the peers with
their venv's python) and the rounds are interleaved (every prompt length, every system, round-robin, the order
rotated per round), so a shared machine's load hits all systems alike; medians over rounds; ratios are
against the fastest system of the same cell. Greedy tokens are compared against kvconvert's default export.

Systems: `kvconvert` (default export, opset 17, `max_context` 4096), `kvconvert-16k` (the same at 16384, for
"decode time grows with the filled length, not with max_context"), `kvconvert-standard` (`--attention
standard --opset 24`), `ort-genai` (`python -m onnxruntime_genai.models.builder -p fp32 -e cpu`, run with
onnxruntime_genai's Generator), `optimum` (`optimum-cli export onnx --task text-generation-with-past`, run
with ORTModelForCausalLM). Then at `--long` tokens: kvconvert-16k against ort-genai, and the sparse policies
(sink_window, page_topk keep 1/8) against dense on the kvconvert graph (decode only: every graph is
prefilled in 512-token chunks, the standard-op lowering of a policy layer holds [chunk, filled] scores).

    python benchmarks/onnx_decode.py --work /tmp/onnx_decode [--genai-python P] [--optimum-python P]
        [--rounds 3] [--lengths 128,1024,3072] [--long 8000] [--out benchmarks/onnx_decode.txt]
Exports are cached in --work. Peers are skipped (and said so) when their python or export is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("onnx_decode_runner.py")
TEXT = ("The history of the river valley is written in its stones. Farmers settled the banks long before the "
        "first towns, and every flood left a layer of silt that later builders dug through. ")


def hf_folder() -> Path:
    from kvconvert.io import resolve_source

    return resolve_source("builtin:smollm2-135m").path


def prompt_ids(folder: Path, length: int) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids: list[int] = []
    while len(ids) < length:
        ids += tok.encode(TEXT).ids
    return ids[:length]


def export_kvconvert(folder: Path, out: Path, **cfg) -> Path:
    if not (out / "model.onnx").is_file():
        from kvconvert.export.onnx import OnnxExportConfig, export_onnx

        export_onnx(str(folder), OnnxExportConfig(validate=False, **cfg), out, progress=False)
    return out


def export_genai(python: str, folder: Path, out: Path, threads: int) -> Path | None:
    if not (out / "model.onnx").is_file():
        cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out), "-p", "fp32",
               "-e", "cpu", "-c", str(out.parent / "genai_cache")]
        if subprocess.run(cmd, capture_output=True).returncode or not (out / "model.onnx").is_file():
            return None
    config = json.loads((out / "genai_config.json").read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
    (out / "genai_config.json").write_text(json.dumps(config, indent=4))
    return out


def export_optimum(python: str, folder: Path, out: Path) -> Path | None:
    if not (out / "model.onnx").is_file():
        cli = str(Path(python).with_name("optimum-cli"))
        cmd = [cli, "export", "onnx", "--model", str(folder), "--task", "text-generation-with-past", str(out)]
        if subprocess.run(cmd, capture_output=True).returncode or not (out / "model.onnx").is_file():
            return None
    return out


class Runner:
    """A runner process; `run(ids, new, **options)` -> reply dict."""

    def __init__(self, name: str, python: str, model: Path, threads: int):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
        self.name = name
        self.proc = subprocess.Popen([python, str(RUNNER), name.split("-")[0] if name.startswith("kvconvert") else
                                      {"ort-genai": "genai", "optimum": "optimum"}[name], str(model), str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError(f"{name} runner did not start")

    def run(self, ids: list[int], new: int, **options) -> dict:
        self.proc.stdin.write(json.dumps({"ids": ids, "new": new, "options": options}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} runner died")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def interleaved(runners: dict[str, Runner], cells: list[tuple[str, list[int]]], new: int, rounds: int,
                options: dict[str, dict] | None = None) -> dict[tuple[str, str], list[dict]]:
    """results[(cell, system)] = one reply per round; systems rotate their order each round."""
    from tqdm.auto import tqdm

    names = list(runners)
    results: dict[tuple[str, str], list[dict]] = {}
    bar = tqdm(total=rounds * len(cells) * len(names), unit="run", leave=False)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for cell, ids in cells:
            for name in order:
                bar.set_description(f"round {r} {cell} {name}")
                results.setdefault((cell, name), []).append(runners[name].run(ids, new, **(options or {}).get(name, {})))
                bar.update()
    bar.close()
    return results


def table(results, cells: list[str], names: list[str], reference: str) -> list[str]:
    med = {k: (statistics.median(x["decode_ms"] for x in v), statistics.median(x["prefill_s"] for x in v))
           for k, v in results.items()}
    lines = ["| system | " + " | ".join(f"decode ms/step {c}" for c in cells) + " | "
             + " | ".join(f"prefill s {c}" for c in cells) + " | tokens = " + reference + " |",
             "|---" * (2 * len(cells) + 2) + "|"]
    for name in names:
        dec, pre, same = [], [], []
        for c in cells:
            if (c, name) not in med:
                dec.append("-"), pre.append("-")
                continue
            best_d = min(med[(c, n)][0] for n in names if (c, n) in med)
            best_p = min(med[(c, n)][1] for n in names if (c, n) in med)
            d, p = med[(c, name)]
            dec.append(f"{d:.1f} ({d / best_d:.2f}x)")
            pre.append(f"{p:.2f} ({p / best_p:.2f}x)")
            if (c, reference) in results:
                same.append(results[(c, name)][0]["tokens"] == results[(c, reference)][0]["tokens"])
        lines.append(f"| {name} | " + " | ".join(dec) + " | " + " | ".join(pre) + f" | {all(same)} |")
    return lines


def ratios(results, cells, a: str, b: str) -> list[str]:
    out = []
    for c in cells:
        if (c, a) in results and (c, b) in results:
            da = statistics.median(x["decode_ms"] for x in results[(c, a)])
            db = statistics.median(x["decode_ms"] for x in results[(c, b)])
            pa = statistics.median(x["prefill_s"] for x in results[(c, a)])
            pb = statistics.median(x["prefill_s"] for x in results[(c, b)])
            out.append(f"- {c}: decode {a} / {b} = {da / db:.2f}, prefill {a} / {b} = {pa / pb:.2f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/onnx_decode"))
    ap.add_argument("--genai-python", default="/work/venvs/ortgenai/bin/python")
    ap.add_argument("--optimum-python", default="/work/venvs/optimum/bin/python")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="128,1024,3072")
    ap.add_argument("--long", type=int, default=8000)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--long-rounds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("onnx_decode.txt"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folder = hf_folder()
    started = time.time()
    notes: list[str] = []
    models = {"kvconvert": export_kvconvert(folder, args.work / "kvc", max_context=4096),
              "kvconvert-16k": export_kvconvert(folder, args.work / "kvc16k", max_context=16384),
              "kvconvert-standard": export_kvconvert(folder, args.work / "kvc_std", max_context=4096,
                                                     attention="standard", opset=24)}
    pythons = {name: sys.executable for name in models}
    for name, python, make in (("ort-genai", args.genai_python,
                                lambda p: export_genai(p, folder, args.work / "genai_fp32", args.threads)),
                               ("optimum", args.optimum_python, lambda p: export_optimum(p, folder,
                                                                                        args.work / "optimum_fp32"))):
        model = make(python) if Path(python).is_file() else None
        if model is None:
            notes.append(f"- {name}: not run (no python at {python} or its export failed)")
        else:
            models[name], pythons[name] = model, python
    lengths = [int(x) for x in args.lengths.split(",")]
    cells = [(f"{n}" if n < 1000 else f"{n // 1024}K" if n % 1024 == 0 else str(n), prompt_ids(folder, n))
             for n in lengths]
    load_before = os.getloadavg()
    runners = {name: Runner(name, pythons[name], model, args.threads) for name, model in models.items()}
    try:
        main_results = interleaved(runners, cells, args.new, args.rounds)
    finally:
        for name in [n for n in runners if n not in ("kvconvert-16k", "ort-genai")]:
            runners.pop(name).close()
    partial = table(main_results, [c for c, _ in cells], [n for n in models], "kvconvert")
    args.out.write_text("# partial (main cells only; the run did not finish)\n" + "\n".join(partial) + "\n")
    long_cell = [(f"{args.long}", prompt_ids(folder, args.long))]
    long_runners = {n: r for n, r in runners.items()}
    try:
        long_results = interleaved(long_runners, long_cell, args.new, args.long_rounds)
    finally:
        for r in long_runners.values():
            r.close()
    sparse = {"dense": args.work / "kvc16k",
              "sink_window": export_kvconvert(folder, args.work / "kvc16k_sink", max_context=16384,
                                              policy="sink_window:sink=4,window=1024"),
              "page_topk": export_kvconvert(folder, args.work / "kvc16k_topk", max_context=16384,
                                            policy="page_topk:page=32,keep=0.125")}
    sparse_runners = {name: Runner(f"kvconvert-{name}", sys.executable, path, args.threads)
                      for name, path in sparse.items()}
    try:
        sparse_results = interleaved(sparse_runners, long_cell, args.new, args.long_rounds,
                                     {n: {"chunk": 512} for n in sparse_runners})
    finally:
        for r in sparse_runners.values():
            r.close()
    load_after = os.getloadavg()
    import onnxruntime

    names = [n for n in ("kvconvert", "kvconvert-16k", "kvconvert-standard", "ort-genai", "optimum") if n in models]
    cell_names = [c for c, _ in cells]
    lines = [f"# benchmarks/onnx_decode.py ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, "
             f"{time.time() - started:.0f} s)",
             f"SmolLM2-135M-Instruct fp32, ONNX Runtime {onnxruntime.__version__} CPU, {args.threads} threads, "
             f"{args.new} greedy new tokens, median of {args.rounds} interleaved rounds "
             f"({args.long_rounds} at {args.long}); ratio = against the fastest system of the cell.",
             f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
             f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} on {os.cpu_count()} cores "
             "(a shared machine: read the ratios, not the absolute times)",
             "", "## Prompt lengths " + ", ".join(cell_names) + " (kvconvert: max_context 4096; -16k: 16384)", ""]
    lines += table(main_results, cell_names, names, "kvconvert")
    lines += ["", "kvconvert default vs ort-genai (<= 1.0 decode, <= 1.2 prefill is the target):"]
    lines += ratios(main_results, cell_names, "kvconvert", "ort-genai")
    lines += ["", "decode grows with the filled length, not max_context (same graph, 4096 vs 16384 slots):"]
    for name in ("kvconvert", "kvconvert-16k"):
        if all((c, name) in main_results for c in cell_names):
            d = [statistics.median(x["decode_ms"] for x in main_results[(c, name)]) for c in cell_names]
            lines.append(f"- {name}: " + ", ".join(f"{c} {v:.1f} ms" for c, v in zip(cell_names, d)))
    lines += ["", f"## {args.long}-token prompt (kvconvert-16k)", ""]
    lines += table(long_results, [long_cell[0][0]], list(long_runners), "kvconvert-16k")
    lines += ["", f"## Sparse policies vs dense, kvconvert graph, max_context 16384, {args.long}-token prompt "
              "(prefill in 512-token chunks; decode is what the policies are for)", ""]
    lines += table(sparse_results, [long_cell[0][0]], list(sparse_runners), "dense")
    dense = statistics.median(x["decode_ms"] for x in sparse_results[(long_cell[0][0], "dense")])
    for name in ("sink_window", "page_topk"):
        d = statistics.median(x["decode_ms"] for x in sparse_results[(long_cell[0][0], name)])
        lines.append(f"- {name}: decode speedup over dense {dense / d:.2f}x")
    lines += [""] + notes
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
