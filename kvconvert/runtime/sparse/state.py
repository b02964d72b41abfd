"""Per-layer run-time state: page key summaries kept up to date on append, and read statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...kernels.selection import page_summaries, update_page_summaries


@dataclass
class PageSummaryCache:
    """kmin/kmax [B, Hkv, capacity, D] of a layer's cached keys (valid for the first `covered` positions)."""

    page: int
    kmin: torch.Tensor | None = None
    kmax: torch.Tensor | None = None
    covered: int = 0

    def refresh(self, keys: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bring the summaries up to `keys` [B, Hkv, L, D] whose last `new_tokens` positions were just written.

        Appends fold only the new keys in; anything else (a new sequence, a cropped cache, another batch
        shape) rebuilds from all keys. Returns views [B, Hkv, ceil(L/page), D].
        """
        b, hkv, length, d = keys.shape
        pages = -(-length // self.page)
        same = (self.kmin is not None and self.kmin.shape[:2] == (b, hkv) and self.kmin.shape[3] == d
                and self.kmin.dtype == keys.dtype and self.kmin.device == keys.device)
        if same and self.covered == length - new_tokens and pages <= self.kmin.shape[2]:
            update_page_summaries(self.kmin, self.kmax, keys[:, :, length - new_tokens:], self.covered, self.page)
        else:
            lens = torch.full((b,), length, dtype=torch.int32, device=keys.device)
            kmin, kmax = page_summaries(keys, lens, self.page)
            capacity = max(pages * 2, 64)
            self.kmin = keys.new_zeros(b, hkv, capacity, d)
            self.kmax = keys.new_zeros(b, hkv, capacity, d)
            self.kmin[:, :, :pages], self.kmax[:, :, :pages] = kmin, kmax
        self.covered = length
        return self.kmin[:, :, :pages], self.kmax[:, :, :pages]


@dataclass
class ReadStats:
    """KV positions read vs. available, per phase, summed over layers, heads and steps."""

    counts: dict = field(default_factory=lambda: {"decode": [0, 0, 0], "prefill": [0, 0, 0]})

    def add(self, phase: str, read: float, total: float) -> None:
        c = self.counts[phase]
        c[0] += read
        c[1] += total
        c[2] += 1

    def summary(self) -> dict:
        out = {}
        for phase, (read, total, calls) in self.counts.items():
            out[phase] = {"calls": calls, "kv_read_fraction": round(read / total, 4) if total else None}
        return out
