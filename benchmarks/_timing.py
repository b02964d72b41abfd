"""Timing helpers for the benchmarks (median of repeats; CUDA events on GPU)."""

from __future__ import annotations

import statistics
import time


def bench(fn, repeats: int = 5, warmup: int = 1, device: str = "cpu") -> float:
    """Median seconds of `fn()`."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(50, 20 * repeats), return_mode="median") / 1e3
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def efficiency(t_dense: float, t_select: float, t_attn: float, r: float) -> dict:
    """speedup = dense / (select + attention); limit = 1 / (r + select/dense); efficiency = speedup / limit."""
    overhead = t_select / t_dense
    speedup = t_dense / (t_select + t_attn)
    limit = 1.0 / (r + overhead)
    return {"speedup": speedup, "overhead": overhead, "limit": limit, "efficiency": speedup / limit}


def plot(rows: list[dict], x: str, series: str, path: str, title: str, ylabel: str = "speedup vs our dense") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({r[series] for r in rows}):
        pts = sorted((r[x], r["speedup"], r["limit"]) for r in rows if r[series] == key)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{series}={key}")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], ":", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title + " (dotted: limit 1/(r+overhead))", fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
