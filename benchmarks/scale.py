"""Every pass at the size users bring: a Llama-2-7B-shaped MHA checkpoint on this machine.

    python benchmarks/scale.py [--cache DIR] [--only write,gqa-mean,gqa-calibrated,fit-latent,eval,onnx]

1. Writes (once, streaming: one tensor in memory at a time) a random bf16 checkpoint of Llama-2-7B's shape
   (32 layers, hidden 4096, 32 heads = 32 KV heads, intermediate 11008) in two shards (~10 + ~3.6 GB) with
   SmolLM2's tokenizer into `~/.cache/kvconvert/bench/llama7b-mha/`. The vocabulary is SmolLM2's (49152, not
   Llama-2's 32000) so that every token id the tokenizer produces exists in the embedding.
2. Runs each pass in its own process under `/usr/bin/time -v` (wall time, peak RSS, exit code); `--nice N`
   lowers the passes' priority when the machine is shared.
3. Times a plain copy of the checkpoint's bytes in the same run (the physical limit of the streaming
   conversion) and prints the table (also `--json`), with the machine load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008)
FIRST_SHARD_LAYERS = 23  # ~10.1 GB + ~3.6 GB


def _tokenizer_folder() -> Path:
    sys.path.insert(0, str(ROOT))
    from kvconvert.io import resolve_source

    return resolve_source("builtin:smollm2-135m").path


def _tensors(vocab: int, layers: list[int], embed: bool, head: bool) -> list[tuple[str, list[int]]]:
    h, i = SHAPE["hidden"], SHAPE["intermediate"]
    kv = SHAPE["kv_heads"] * (h // SHAPE["heads"])
    out = [("model.embed_tokens.weight", [vocab, h])] if embed else []
    for n in layers:
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", [h]), (p + "self_attn.q_proj.weight", [h, h]),
                (p + "self_attn.k_proj.weight", [kv, h]), (p + "self_attn.v_proj.weight", [kv, h]),
                (p + "self_attn.o_proj.weight", [h, h]), (p + "post_attention_layernorm.weight", [h]),
                (p + "mlp.gate_proj.weight", [i, h]), (p + "mlp.up_proj.weight", [i, h]),
                (p + "mlp.down_proj.weight", [h, i])]
    if head:
        out += [("model.norm.weight", [h]), ("lm_head.weight", [vocab, h])]
    return out


def _write_shard(path: Path, tensors: list[tuple[str, list[int]]], seed: int) -> None:
    """One safetensors file written tensor by tensor (header first, then each tensor's bytes)."""
    import torch

    header, offset = {}, 0
    for name, shape in tensors:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in tensors:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                rows = []
                for start in range(0, shape[0], 1024):  # bounded scratch memory
                    block = torch.randn([min(1024, shape[0] - start), *shape[1:]], generator=gen)
                    rows.append(block.mul_(0.02).to(torch.bfloat16))
                t = torch.cat(rows)
            f.write(t.view(torch.uint8).numpy().tobytes())
            del t
    tmp.rename(path)


def write_checkpoint(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    tok = _tokenizer_folder()
    vocab = json.loads((tok / "config.json").read_text())["vocab_size"]
    folder.mkdir(parents=True, exist_ok=True)
    shards = [
        ("model-00001-of-00002.safetensors", _tensors(vocab, list(range(FIRST_SHARD_LAYERS)), True, False)),
        ("model-00002-of-00002.safetensors",
         _tensors(vocab, list(range(FIRST_SHARD_LAYERS, SHAPE["layers"])), False, True)),
    ]
    weight_map = {}
    for seed, (name, tensors) in enumerate(shards):
        if not (folder / name).is_file():
            _write_shard(folder / name, tensors, seed)
        weight_map.update({t: name for t, _ in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for side in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / side, folder / side)
    h = SHAPE["hidden"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": SHAPE["intermediate"], "num_hidden_layers": SHAPE["layers"],
        "num_attention_heads": SHAPE["heads"], "num_key_value_heads": SHAPE["kv_heads"], "head_dim": h // SHAPE["heads"],
        "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1,
        "eos_token_id": 2, "attention_bias": False, "mlp_bias": False,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _timed(cmd: list[str], log: Path, nice: int = 0) -> dict:
    """Run `cmd` under /usr/bin/time -v: wall seconds, peak RSS, exit code, last output line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(["nice", "-n", str(nice), "/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("\t", "Command exited"))
             and "\r" not in ln]
    return {"rc": proc.returncode, "seconds": round(wall, 1),
            "peak_rss_gb": round(int(rss.group(1)) / 2**20, 2) if rss else None,
            "last_line": (lines[-1] if lines else "")[:200]}


def plain_copy(src: Path, dst: Path) -> dict:
    """Seconds to copy the checkpoint's weight files (same bytes the conversion reads and writes)."""
    dst.mkdir(parents=True, exist_ok=True)
    total, t0 = 0, time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        shutil.copyfile(f, dst / f.name)
        total += f.stat().st_size
    os.sync()
    seconds = time.perf_counter() - t0
    shutil.rmtree(dst)
    return {"seconds": round(seconds, 1), "bytes": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "kvconvert" / "bench")
    ap.add_argument("--only", default="write,copy,gqa-stream,gqa-convert,gqa-mean,gqa-calibrated,fit-latent,eval,onnx")
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    steps = args.only.split(",")
    src = write_checkpoint(args.cache / "llama7b-mha")
    if steps == ["write"]:
        return
    work = args.cache / "runs"
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "kvconvert"]
    g8, cal, lat, onnx = work / "g8", work / "g8-calibrated", work / "g8-latent", work / "g8-onnx"
    runs = {
        "gqa-stream": ("mha-to-gqa --groups 8 --no-eval --grouping consecutive --no-align (streaming only)",
                       [*py, "mha-to-gqa", str(src), "--groups", "8", "--out", str(work / "g8-plain"), "--overwrite",
                        "--no-eval", "--grouping", "consecutive", "--no-align"]),
        "gqa-convert": ("mha-to-gqa --groups 8 --no-eval (streaming part)",
                        [*py, "mha-to-gqa", str(src), "--groups", "8", "--out", str(g8), "--overwrite", "--no-eval"]),
        "gqa-mean": ("mha-to-gqa --groups 8 (defaults, eval included)",
                     [*py, "mha-to-gqa", str(src), "--groups", "8", "--out", str(g8), "--overwrite",
                      "--device", args.device]),
        "gqa-calibrated": ("mha-to-gqa --groups 8 --method calibrated",
                           [*py, "mha-to-gqa", str(src), "--groups", "8", "--method", "calibrated", "--out", str(cal),
                            "--overwrite", "--device", args.device]),
        "fit-latent": ("fit-latent --kv-ratio 0.5 (on the GQA-8 output)",
                       [*py, "fit-latent", str(g8), "--kv-ratio", "0.5", "--out", str(lat), "--overwrite",
                        "--device", args.device]),
        "eval": ("eval (GQA-8 output)", [*py, "eval", str(g8), "--device", args.device]),
        "onnx": ("export onnx --dtype fp16", [*py, "export", "onnx", str(g8), "--dtype", "fp16", "--out", str(onnx),
                                               "--overwrite"]),
    }
    order = ["gqa-stream", "gqa-convert", "gqa-mean", "onnx", "eval", "gqa-calibrated", "fit-latent"]
    runs = {k: runs[k] for k in order}
    partial = args.json or (work / "results.json")
    results: dict[str, dict] = json.loads(partial.read_text()).get("results", {}) if partial.is_file() else {}
    results = {k: v for k, v in results.items() if k not in steps}
    if "copy" in steps:
        results["copy"] = {"label": "plain copy of the weight files", **plain_copy(src, work / "copy"), "rc": 0}
        partial.write_text(json.dumps({"results": results}, indent=2))
    for key, (label, cmd) in runs.items():
        if key in steps:
            print(f"running {label} ...", flush=True)
            results[key] = {"label": label, **_timed(cmd, work / f"{key}.log", args.nice)}
            partial.write_text(json.dumps({"results": results}, indent=2))
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"\nmachine: {os.cpu_count()} cores; {load}")
    print(f"checkpoint: {src} ({sum(f.stat().st_size for f in src.glob('*.safetensors')) / 1e9:.1f} GB bf16)")
    print(f"{'pass':<52}{'rc':>4}{'wall s':>10}{'peak RSS GB':>13}")
    for r in results.values():
        print(f"{r['label']:<52}{r['rc']:>4}{r['seconds']:>10}{str(r.get('peak_rss_gb', '-')):>13}")
    for key in ("gqa-stream", "gqa-convert"):
        if "copy" in results and key in results:
            ratio = results["copy"]["seconds"] / results[key]["seconds"]
            print(f"{key}: {ratio:.2f}x the plain copy's speed (same bytes, same run)")
    for key, r in results.items():
        if r.get("last_line") and key != "copy":
            print(f"  {key}: {r['last_line']}")
    partial.write_text(json.dumps({"load": load, "results": results}, indent=2))


if __name__ == "__main__":
    main()
