"""Serving under load: the CPU Triton server (nvidia-pytriton's tritonserver) on a `kvconvert export triton`
repository, 1 / 4 / 8 / 16 concurrent streaming gRPC clients, aggregate tokens/s, time to first token and
inter-token latency, measured on the client.

    python benchmarks/serve_load.py [--model builtin:smollm2-135m] [--concurrency 1 4 8 16] [--new-tokens 32]
        [--requests-per-client 2] [--max-active 8] [--max-context 512] [--out runs/serve_load]

Each level runs `concurrency` closed-loop clients (each sends its requests one after another, on its own
stream; greedy with `ignore_eos`, prompts of 5-43 tokens, 0.5-1.5 x `--new-tokens` each, so that clients do not
stay in lockstep after the first burst), bounded by `--level-timeout` seconds. The server
listens on 127.0.0.1 (free ports) and is stopped by its PID. Writes results.json and serve_load.png to --out
and prints the table (benchmarks/serve_load.txt is this output). Needs .venv-tritonserver (install.sh dev).
"""

from __future__ import annotations

import argparse
import json
import queue
import subprocess
import threading
import time
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain in one paragraph why the sky is blue, as you would to a curious ten year old child.",
    "List three uses of a paperclip.",
    "Summarize the plot of a detective story in which the butler did not do it, but the gardener, who had been "
    "hiding in the greenhouse all night, saw everything and told nobody until the very end.",
    "What is 17 times 23?",
    "Translate 'good morning, how are you today?' into Spanish and German.",
    "Give me a recipe for pancakes with the quantities for four people and the time each step takes.",
]


LENGTHS = [1.0, 0.5, 1.5, 0.75, 1.25]  # output length / --new-tokens, cycled: clients drift out of lockstep


def one_request(url: str, model: str, prompt: str, new_tokens: int, timeout: float) -> dict:
    """Send one streaming request; -> {"tokens", "ttft", "gaps" (seconds between tokens), "error"}."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error, time.perf_counter())))
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    tokens = grpcclient.InferInput("max_tokens", [1], "INT32")
    tokens.set_data_from_numpy(np.array([new_tokens], np.int32))
    ignore_eos = grpcclient.InferInput("ignore_eos", [1], "BOOL")
    ignore_eos.set_data_from_numpy(np.array([True]))
    t0 = time.perf_counter()
    client.async_stream_infer(model, [text, tokens, ignore_eos], enable_empty_final_response=True)
    stamps, error = [], None
    try:
        while True:
            try:
                result, err, at = responses.get(timeout=timeout)
            except queue.Empty:
                error = "timed out"
                break
            if err is not None:
                error = str(err)
                continue
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            stamps.append(at)
    finally:
        client.stop_stream(cancel_requests=error is not None)
        client.close()
    return {"tokens": len(stamps), "ttft": stamps[0] - t0 if stamps else None,
            "gaps": [b - a for a, b in zip(stamps, stamps[1:])], "error": error}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


def run_level(url: str, model: str, concurrency: int, per_client: int, new_tokens: int, timeout: float) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + timeout

    def client(k: int) -> None:
        for i in range(per_client):
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            j = k + i * concurrency
            r = one_request(url, model, PROMPTS[j % len(PROMPTS)], round(new_tokens * LENGTHS[j % len(LENGTHS)]), left)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "errors": sum(r["error"] is not None for r in results),
            "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95), "itl_p50": pct(gaps, 0.5), "itl_p95": pct(gaps, 0.95)}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    c = [r["concurrency"] for r in rows]
    a.plot(c, [r["tokens_per_s"] for r in rows], "o-", label="measured")
    a.plot(c, [rows[0]["tokens_per_s"] * x for x in c], ":", color="gray", label="linear in clients")
    a.set_xlabel("concurrent clients")
    a.set_ylabel("aggregate tokens/s")
    a.legend(fontsize=8)
    b.plot(c, [r["ttft_p50"] for r in rows], "o-", label="TTFT p50")
    b.plot(c, [r["ttft_p95"] for r in rows], "o--", label="TTFT p95")
    b.plot(c, [r["itl_p50"] for r in rows], "s-", label="inter-token p50")
    b.set_xlabel("concurrent clients")
    b.set_ylabel("seconds")
    b.legend(fontsize=8)
    fig.suptitle("Triton CPU server, in-flight batching", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-active", type=int, default=8)
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--logits", choices=["all", "last"], default="all",
                   help="export option; 'all' lets ragged prompts share one padded prefill call")
    p.add_argument("--single-requests", type=int, default=4, help="requests of the 1-client level (the baseline)")
    p.add_argument("--ort-threads", type=int, default=1, help="of the server's ONNX Runtime session (1 is fastest "
                   "on a shared 2-core machine: 2 threads contend with the scheduler, Triton and the clients)")
    p.add_argument("--level-timeout", type=float, default=240.0)
    p.add_argument("--out", default="runs/serve_load")
    p.add_argument("--plot", default=str(Path(__file__).with_suffix(".png")))
    args = p.parse_args()

    from kvconvert.export.onnx import OnnxExportConfig, export_onnx
    from kvconvert.export.triton import TritonRepoConfig, export_triton
    from kvconvert.export.triton.server import TritonServer

    out = Path(args.out)
    onnx_dir, repo = out / f"onnx-{args.max_context}-{args.logits}", out / "repo"
    if not (onnx_dir / "model.onnx").is_file():
        export_onnx(args.model, OnnxExportConfig(max_context=args.max_context, logits=args.logits, validate=False),
                    onnx_dir, overwrite=True, progress=False)
    cfg = TritonRepoConfig(name="m", max_active=args.max_active, max_queued=64, ort_threads=args.ort_threads,
                           prefill_chunk=args.prefill_chunk, queue_timeout_s=args.level_timeout,
                           max_new_tokens=args.new_tokens)
    export_triton(onnx_dir, cfg, repo, overwrite=True)
    print(f"model {args.model}, ONNX fp32 logits={args.logits}, max_context {args.max_context}; Triton repo {cfg.model_dump()}")
    print(f"greedy, ignore_eos, {LENGTHS} x {args.new_tokens} new tokens per request (cycled), {len(PROMPTS)} "
          "prompts of 5-43 tokens, "
          f"{args.requests_per_client} requests per client ({args.single_requests} for 1 client; closed loop, one gRPC "
          "stream each)")
    print(f"load before: {uptime()}")
    rows = []
    with TritonServer(repo) as server:
        print(f"tritonserver pid {server.proc.pid} on {server.grpc_url}")
        one_request(server.grpc_url, "m_generate", PROMPTS[0], 4, 120)  # warm-up (first session runs)
        for c in args.concurrency:
            per_client = args.single_requests if c == 1 else args.requests_per_client
            rows.append(run_level(server.grpc_url, "m_generate", c, per_client, args.new_tokens, args.level_timeout))
            r = rows[-1]
            print(f"  {c:2d} clients: {r['tokens_per_s']:.1f} tok/s ({r['tokens']} tokens, {r['requests']} requests, "
                  f"{r['errors']} errors, {r['seconds']:.1f} s)", flush=True)
        print(f"server stopped by pid {server.proc.pid}")
    print(f"load after: {uptime()}")
    base = rows[0]
    print()
    print("clients  requests  errors  tokens/s  x single  TTFT p50 s  TTFT p95 s  x single p50  ITL p50 ms  ITL p95 ms")
    for r in rows:
        print(f"{r['concurrency']:7d}  {r['requests']:8d}  {r['errors']:6d}  {r['tokens_per_s']:8.1f}  "
              f"{r['tokens_per_s'] / base['tokens_per_s']:8.2f}  {r['ttft_p50']:10.3f}  {r['ttft_p95']:10.3f}  "
              f"{r['ttft_p50'] / base['ttft_p50']:12.2f}  {1e3 * r['itl_p50']:10.1f}  {1e3 * r['itl_p95']:10.1f}")
    eight = next((r for r in rows if r["concurrency"] == 8), None)
    if eight is not None and base["concurrency"] == 1:
        thr, ttft = eight["tokens_per_s"] / base["tokens_per_s"], eight["ttft_p50"] / base["ttft_p50"]
        print(f"\n8 clients vs 1: aggregate tokens/s x{thr:.2f} (target >= 3), p50 TTFT x{ttft:.2f} (target <= 3): "
              f"{'PASS' if thr >= 3 and ttft <= 3 else 'FAIL'}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    plot(rows, Path(args.plot))
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
