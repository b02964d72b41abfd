"""Helpers for steps that change a loaded model in place (e.g. `heal`): load, save, loss plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load(source, frozen: bool = False):
    """The model of a `ModelSource` on the GPU if there is one (a frozen teacher in bf16 there), else the
    CPU, in fp32."""
    import torch

    if device() == "cpu":
        return source.load_model()
    return source.load_model(dtype=torch.bfloat16 if frozen else torch.float32, device_map="cuda")


def save_model(model, source, out: Path, pass_name: str, params: dict[str, Any], seconds: float,
               metrics: dict[str, Any], max_shard_size: str = "5GB") -> Path:
    """Write `model` (derived from `source`) as an HF folder at `out` (atomically, replacing it) with the
    source's tokenizer files and a `kvconvert.json` that inherits the source's passes plus this one."""
    from ..io import atomic_output_dir, copy_side_files, parse_size, provenance

    record = provenance.new_record(source.provenance(), parent=provenance.read(source.path))
    provenance.add_pass(record, pass_name, params, seconds, metrics)
    with atomic_output_dir(out, overwrite=True, inputs=(source.path,)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=parse_size(max_shard_size))
        copy_side_files(source.path, tmp, skip=("config.json", "generation_config.json"))
        provenance.write(tmp, record)
    return Path(out)


def plot_losses(losses: list[float], path: Path, title: str) -> Path | None:
    if not losses:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax.plot(range(1, len(losses) + 1), losses, color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(teacher || student)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
