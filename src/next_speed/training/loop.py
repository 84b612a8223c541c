"""Helpers shared by the training stages (05 planner, 06 decoder): the learning-rate schedule,
the training sets' metadata check and the loss curve."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from next_speed.core.artifacts import StaleInputError, load_meta


def cosine_lr(step: int, total: int, warmup: int, base: float, min_ratio: float = 0.1) -> float:
    """The one schedule of both trainers: linear warmup over `warmup` steps, then cosine decay to
    `min_ratio * base` at `total` (nanoGPT's `get_lr`)."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def check_trainsets(train_meta: str, paths: Sequence[str], k: int | None, v: int | None) -> dict:
    meta = None
    for p in paths:
        meta = load_meta(train_meta, "trainsets", p)
    assert meta is not None
    for name, want, have in (("K", k, meta["K"]), ("V", v, meta["V"])):
        if want is not None and want != have:
            raise StaleInputError(
                f"{name}={want} here, but the training sets were built with {name}={have}: "
                f"rerun steps 03-04 with {name}={want}, or set {name}={have}"
            )
    return meta


def plot_curve(history: list[dict], path: Path, title: str) -> None:
    """Training and validation loss against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train_loss"] for h in history], label="train")
    if history and "val_loss" in history[0]:
        ax.plot(steps, [h["val_loss"] for h in history], label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------- several processes (torchrun)


@dataclass
class Dist:
    """Where this process stands in a torchrun job (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_init(device: str) -> tuple[Dist, str]:
    """Under torchrun (WORLD_SIZE > 1) join the process group, NCCL on GPUs and gloo on CPU, and
    pin this rank's GPU (LOCAL_RANK); other ranks log warnings only. Returns the rank and the
    device to use. One process: nothing to do."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if rank != 0:
        logging.getLogger("next_speed").setLevel(logging.WARNING)
    return Dist(rank, world, local), device


def dist_close(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def shard(idx, d: Dist):
    """This rank's share of a global batch (every rank draws the same indices)."""
    return idx[d.rank :: d.world] if d.world > 1 else idx


def global_mean(total, count, d: Dist):
    """Loss = `total` (a sum over this rank's tokens) over the global token count, scaled so that
    DDP's gradient averaging gives exactly one process's gradient of the global-batch mean: ranks
    whose shards hold different token counts are weighted by their tokens, not equally. Returns
    (the loss to backpropagate, the global mean for logging)."""
    if d.world == 1:
        loss = total / count.clamp(min=1)
        return loss, loss.detach()
    import torch
    import torch.distributed as dist

    both = torch.stack([total.detach().float(), count.detach().float()])
    dist.all_reduce(both)
    n = both[1].clamp(min=1)
    return total * d.world / n, both[0] / n


def broadcast_flags(values: list[float], d: Dist) -> list[float]:
    """Rank 0's values on every rank (decisions such as a time budget must agree, or ranks hang)."""
    if d.world == 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, 0)
    return t.tolist()
