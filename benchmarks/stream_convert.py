"""Streaming mha-to-gqa on a synthetic sharded checkpoint: peak RSS and GB/s against a plain file copy.

    OMP_NUM_THREADS=2 python benchmarks/stream_convert.py --size-gb 2.5 --shard-mb 512 --groups 4

Writes a random Llama-style bf16 checkpoint of about `--size-gb` in shards of `--shard-mb` (MHA, 16 heads),
then, in `--repeats` interleaved rounds, each job in a fresh subprocess that reports its own peak RSS (VmHWM):
(1) copies the shard files, (2) runs `kvconvert mha-to-gqa --method mean --no-eval` with the same shard size
(this includes the BLAKE3 content hash of the source for kvconvert.json, overlapped in a thread, with an empty
hash cache), (3) runs it again with that hash memoised. Prints the medians as a table and saves a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COPY = """
import shutil, sys, time
def peak():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True)
t = time.perf_counter()
for f in sorted(src.iterdir()):
    shutil.copyfile(f, dst / f.name)
print("RESULT", time.perf_counter() - t, peak())
"""
CONVERT = """
import sys, time
def peak():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
sys.path.insert(0, sys.argv[1])
import torch  # noqa: F401  (imports counted in the baseline RSS below)
from kvconvert.cli.main import main
import kvconvert.convert.gqa  # noqa: F401  (import time is not conversion time)
base = peak()
t = time.perf_counter()
code = main(sys.argv[2:])
assert code == 0, code
print("RESULT", time.perf_counter() - t, peak(), base)
"""


def make_checkpoint(folder: Path, size_gb: float, shard_mb: int, heads: int = 16, hidden: int = 2048) -> dict:
    import torch

    from kvconvert.io import ShardedWriter
    from kvconvert.io.writer import write_json

    inter, vocab, head_dim = int(hidden * 2.75), 32000, hidden // heads
    per_layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * 2
    layers = max(1, int((size_gb * 2**30 - 2 * vocab * hidden * 2) // per_layer))
    folder.mkdir(parents=True)
    writer = ShardedWriter(folder, shard_mb * 2**20)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    writer.add("model.embed_tokens.weight", rand(vocab, hidden))
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            writer.add(p + f"self_attn.{n}_proj.weight", rand(hidden, hidden))
        writer.add(p + "mlp.gate_proj.weight", rand(inter, hidden))
        writer.add(p + "mlp.up_proj.weight", rand(inter, hidden))
        writer.add(p + "mlp.down_proj.weight", rand(hidden, inter))
        writer.add(p + "input_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
        writer.add(p + "post_attention_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    writer.add("model.norm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    writer.add("lm_head.weight", rand(vocab, hidden))
    files = writer.finish()
    write_json(folder / "config.json", {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": heads,
        "head_dim": head_dim, "num_hidden_layers": layers, "vocab_size": vocab, "torch_dtype": "bfloat16",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False})
    return {"layers": layers, "bytes": sum(f.stat().st_size for f in files), "shards": len(files)}


def run(code: str, *args: str, cache: Path) -> list[float]:
    env = {**os.environ, "TQDM_DISABLE": "1", "KVCONVERT_CACHE": str(cache)}
    os.sync()  # every job starts with no dirty pages left by the previous one (else writeback throttles it)
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    last = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return [float(x) for x in last.split()[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.5)
    ap.add_argument("--shard-mb", type=int, default=512)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (copy, convert, convert memoised); medians reported")
    ap.add_argument("--workdir", default="/tmp/kvconvert-stream-bench")
    ap.add_argument("--png", default=str(ROOT / "benchmarks" / "stream_convert.png"))
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    t = time.perf_counter()
    info = make_checkpoint(work / "src", args.size_gb, args.shard_mb)
    print(f"synthetic checkpoint: {info['bytes'] / 2**30:.2f} GiB, {info['shards']} shards of <= {args.shard_mb} MiB, "
          f"{info['layers']} layers ({time.perf_counter() - t:.0f} s to make)")
    gb = info["bytes"] / 1e9
    convert_args = ["mha-to-gqa", str(work / "src"), "--groups", str(args.groups), "--out", str(work / "gqa"),
                    "--no-eval", "-q", "--max-shard-size", f"{args.shard_mb}MB"]
    jobs: dict[str, list[list[float]]] = {"copy": [], "convert": [], "memoised": []}
    for r in range(args.repeats):  # interleaved, so a slow spell of this VM's disk hits every job alike
        shutil.rmtree(work / "copy", ignore_errors=True)
        jobs["copy"].append(run(COPY, str(work / "src"), str(work / "copy"), cache=work / f"cache-{r}"))
        shutil.rmtree(work / "copy", ignore_errors=True)
        for name in ("convert", "memoised"):  # the output folder is removed outside the timed job
            shutil.rmtree(work / "gqa", ignore_errors=True)
            jobs[name].append(run(CONVERT, str(ROOT), *convert_args, cache=work / f"cache-{r}"))

    def median(name: str, i: int) -> float:
        return statistics.median(x[i] for x in jobs[name])

    shard = args.shard_mb * 2**20
    rows = [("plain copy", median("copy", 0), median("copy", 1), None),
            (f"mha-to-gqa mean G={args.groups}", median("convert", 0), median("convert", 1), median("convert", 2)),
            ("  same, source hash memoised", median("memoised", 0), median("memoised", 1), median("memoised", 2))]
    print(f"\nmedians of {args.repeats} interleaved rounds (seconds of each round: "
          + "; ".join(f"{k} {', '.join(f'{x[0]:.2f}' for x in v)}" for k, v in jobs.items()) + ")")
    print(f"{'job':<30}{'seconds':>9}{'GB/s':>8}{'peak RSS MiB':>14}{'RSS/shard':>11}{'(after imports)':>17}")
    for name, s, rss, base in rows:
        extra = f"{(rss - base) / shard:>17.2f}" if base else ""
        print(f"{name:<30}{s:>9.2f}{gb / s:>8.2f}{rss / 2**20:>14.0f}{rss / shard:>11.2f}{extra}")
    copy_s, conv_s, again_s = rows[0][1], rows[1][1], rows[2][1]
    conv_rss, base_rss = rows[1][2], rows[1][3]
    print(f"\nconversion / copy throughput: {copy_s / conv_s:.2f} (target >= 0.5; {copy_s / again_s:.2f} with the "
          f"source hash memoised); peak RSS {conv_rss / shard:.2f} shards "
          f"({(conv_rss - base_rss) / shard:.2f} above the {base_rss / 2**20:.0f} MiB of imports; target < 2)")
    (work / "result.json").write_text(json.dumps({"checkpoint": info, "rows": rows, "jobs": jobs}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r[0].strip() for r in rows]
    colors = ["grey", "tab:blue", "tab:cyan"]
    axes[0].bar(names, [gb / r[1] for r in rows], color=colors)
    axes[0].set_ylabel(f"GB/s (median of {args.repeats})")
    axes[1].bar(names, [r[2] / 2**20 for r in rows], color=colors)
    axes[1].axhline(2 * args.shard_mb, color="red", ls="--", label="2 shards")
    axes[1].set_ylabel("peak RSS (MiB)")
    axes[1].legend()
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"streaming mha-to-gqa on a {info['bytes'] / 2**30:.1f} GiB synthetic checkpoint")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"plot: {args.png}")
    shutil.rmtree(work / "gqa", ignore_errors=True)


if __name__ == "__main__":
    main()
