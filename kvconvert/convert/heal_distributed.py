"""Data-parallel plumbing for healing under `torchrun` / `accelerate launch`: process group, wrapping, reductions,
gathering. The loop (`heal.heal`) is one code path; it talks to a `Parallel` object, which for one process
(`Parallel()`, mode "none") does nothing at all.

- "ddp": the student is replicated (`DistributedDataParallel`, gradients all-reduced), the teacher replicated.
- "fsdp": student and teacher sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`), one unit per decoder
  layer plus the root; gradients are reduce-scattered, AdamW holds only the local shards.
Each rank takes rows `[r * B / W, (r + 1) * B / W)` of every global batch [B, S], so the averaged gradient (and the
logged loss) is that of the single-process run with the same global batch. The process group comes from the
torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT): gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Literal

import torch

from ..errors import UserError

ParallelMode = Literal["auto", "none", "ddp", "fsdp"]


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def resolve_mode(mode: str, world_size: int | None = None) -> str:
    """"auto" -> "fsdp" when launched with more than one process (WORLD_SIZE > 1), else "none"."""
    world = env_world_size() if world_size is None else world_size
    if mode == "auto":
        return "fsdp" if world > 1 else "none"
    return mode


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers (found through its AttentionView; else the longest ModuleList)."""
    try:
        from ..models import describe

        view = describe(model.config)
        head = view.attn_prefix.split("{layer}")[0]
        if head and view.attn_prefix != head:
            return [model.get_submodule(head + str(i)) for i in range(view.num_layers)]
    except Exception:  # noqa: BLE001 - unknown model types fall back to the longest ModuleList
        pass
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def checkpoint_layers(layers: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Activation checkpointing: each layer's forward recomputed in backward (non-reentrant `torch.utils.
    checkpoint`), so only layer inputs [B, S, hidden] are kept. Patches the instances; `uncheckpoint` undoes it."""
    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        inner = layer.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
    return layers


def uncheckpoint(layers: list[torch.nn.Module]) -> None:
    for layer in layers:
        layer.__dict__.pop("forward", None)


class Parallel:
    """One process: no wrapping, identity reductions. Subclasses add DDP / FSDP."""

    mode = "none"
    rank, world_size = 0, 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch: int) -> None:
        if batch % self.world_size:
            raise UserError(f"--batch {batch} does not split over {self.world_size} processes; use a multiple of "
                            f"{self.world_size} (each process takes batch / world size sequences per step)")

    def local(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the global batch LongTensor[B, S] -> [B / W, S]."""
        b = ids.shape[0] // self.world_size
        return ids[self.rank * b:(self.rank + 1) * b]

    def wrap(self, student: torch.nn.Module, teacher: torch.nn.Module) -> torch.nn.Module:
        """Prepare both models (after requires_grad is set); returns the module to call for the student."""
        return student

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over ranks (not differentiable; for loss denominators and logging)."""
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum(t) / self.world_size

    def barrier(self) -> None:
        pass

    def full_params(self, params: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
        """Full (unsharded) copies of the trainable parameters; a collective for FSDP."""
        return {n: p.detach().clone() for n, p in params}

    def load_params(self, params: list[tuple[str, torch.nn.Parameter]], full: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in params:
                p.copy_(full[n])

    def optimizer_state(self, model, opt) -> dict[str, Any]:
        return opt.state_dict()

    def load_optimizer_state(self, model, opt, state: dict[str, Any]) -> None:
        opt.load_state_dict(state)

    def full_tensors(self, model: torch.nn.Module):
        """(name, full CPU tensor) of `model`'s checkpoint, one tensor at a time (tied duplicates once). Every
        rank iterates it in the same order (for FSDP each item is an all-gather); rank 0 keeps what it writes."""
        unique = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        for name, t in model.state_dict().items():
            if name in unique:
                yield name, (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()

    def write_checkpoint(self, model, folder, max_shard_size: str) -> None:
        """Write `model` (its config, generation config and weights, streamed shard by shard) into `folder` on
        rank 0; every rank must call it (the gathers are collectives). One shard's worth of tensors at most is
        held on rank 0."""
        from ..io.writer import ShardedWriter, parse_size

        writer = ShardedWriter(folder, parse_size(max_shard_size)) if self.main else None
        for name, tensor in self.full_tensors(model):
            if writer is not None:
                writer.add(name, tensor)
        if writer is not None:
            writer.finish()
            model.config.save_pretrained(folder)
            if getattr(model, "generation_config", None) is not None and model.can_generate():
                model.generation_config.save_pretrained(folder)


class _Distributed(Parallel):
    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist, self.device = dist, device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().to(self.device, copy=True)
        self.dist.all_reduce(out)  # SUM: gloo has no AVG
        return out.to(t.device)

    def barrier(self) -> None:
        self.dist.barrier()


class DDP(_Distributed):
    mode = "ddp"

    def wrap(self, student, teacher):
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(student, device_ids=ids)


class FSDP(_Distributed):
    mode = "fsdp"

    def wrap(self, student, teacher):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        for model in (teacher, student):
            for layer in decoder_layers(model):
                fully_shard(layer, mesh=self.mesh)
            fully_shard(model, mesh=self.mesh)
        return student

    def full_params(self, params):
        return {n: p.full_tensor().detach().cpu() if hasattr(p, "full_tensor") else p.detach().clone()
                for n, p in params}

    def load_params(self, params, full):
        from torch.distributed.tensor import distribute_tensor

        with torch.no_grad():
            for n, p in params:
                src = full[n].to(p.device)
                p.copy_(distribute_tensor(src, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else src)

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kw)

    def optimizer_state(self, model, opt):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=self._options(cpu_offload=True))

    def load_optimizer_state(self, model, opt, state):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=self._options())



def setup(mode: str, device: str) -> tuple[Parallel, str]:
    """The Parallel for `mode` ("auto" | "none" | "ddp" | "fsdp") from the torchrun environment, and the device
    this rank runs on ("cuda:<LOCAL_RANK>" under torchrun on CUDA). Initialises the process group once."""
    mode = resolve_mode(mode)
    if mode == "none":
        return Parallel(), device
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise UserError(f"--parallel {mode} needs the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR); launch "
                        "with `torchrun --nproc-per-node N -m kvconvert heal ...` or use --parallel none")
    import torch.distributed as dist

    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    dev = torch.device(device)
    return (DDP(dev) if mode == "ddp" else FSDP(dev)), device
