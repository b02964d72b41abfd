"""Small helpers shared by the kernel modules (torch only)."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(*tensors: torch.Tensor, name: str) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors only under TRITON_INTERPRET=1."""
    on_cpu = any(not t.is_cuda for t in tensors)
    if on_cpu and not interpreting():
        raise RuntimeError(f"{name}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                           f"interpreter); use {name}_reference on CPU")
    try:
        import triton
    except ImportError as exc:
        raise RuntimeError(f"{name}: triton is not installed (pip install 'kvconvert[triton]')") from exc


def default_scale(head_dim: int, scale: float | None) -> float:
    return head_dim ** -0.5 if scale is None else float(scale)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
