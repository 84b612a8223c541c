"""Helpers shared by the training stages (05 planner, 06 decoder): the learning-rate schedule,
the training sets' metadata check and the loss curve."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from next_speed.core.artifacts import StaleInputError, load_meta
from next_speed.core.console import progress


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


# ---------------------------------------------------------------------- the loop both trainers share


def wrap_ddp(model, dd: Dist, device: str):
    """The module the training forward calls: DistributedDataParallel's wrapper under torchrun."""
    if dd.world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[dd.local_rank] if device.startswith("cuda") else None)


def decay_groups(params, no_decay, weight_decay: float, lr_scale: float = 1.0) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices, none on what `no_decay(p)` marks
    (embedding tables, biases, norms). `lr_scale` scales the schedule's rate for the group."""
    params = list(params)
    return [
        g
        for g in (
            {"params": [p for p in params if not no_decay(p)], "weight_decay": weight_decay, "lr_scale": lr_scale},
            {"params": [p for p in params if no_decay(p)], "weight_decay": 0.0, "lr_scale": lr_scale},
        )
        if g["params"]
    ]


@dataclass
class FitResult:
    steps: int
    stopped_by: str  # "steps" or "time budget"
    seconds: float
    history: list[dict]
    best: dict  # step, val_loss (or the train loss without validation) and the other val_ figures
    best_state: object  # what `snapshot()` returned at the best evaluation


def fit(
    *,
    opt,
    params,
    total: int,
    train_step,
    evaluate,
    snapshot,
    lr_at,
    dd: Dist,
    desc: str,
    eval_every: int,
    grad_clip: float = 0.0,
    time_budget: float | None = None,
    before_update=None,
    history: list[dict] | None = None,
) -> FitResult:
    """The training loop of both trainers (nanoGPT's `train.py` loop, with torchrun in mind).

    Per step: set the learning rate (`lr_at(step, total)`, scaled per group), `train_step(step)`
    runs the forward and backward passes and returns the step's loss, `before_update()` (e.g.
    averaging gradients DDP does not see), clip, update. Every `eval_every` steps, at the end and
    when the time budget runs out, rank 0 records `evaluate(step)`'s figures and keeps the best
    `snapshot()` by validation loss. With `time_budget` (minutes), the step count is re-planned
    after 3 steps to what fits, and the run stops when the budget is spent; rank 0 decides both
    for every rank, or ranks would wait on each other forever."""
    import torch

    log = logging.getLogger("next_speed.training")
    history = history if history is not None else []
    best, best_state, losses, step, stopped = {"val_loss": float("inf"), "step": 0}, None, [], 0, "steps"
    t0 = time.perf_counter()
    bar = progress(total=total, desc=desc, unit="step", disable=True if not dd.main else None)
    while step < total:
        lr = lr_at(step, total)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        losses.append(float(train_step(step)))
        if before_update is not None:
            before_update()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        elapsed = time.perf_counter() - t0
        if time_budget and step == 3:
            total = int(broadcast_flags([max(step + 1, min(total, int(time_budget * 60 / (elapsed / step))))], dd)[0])
            bar.total = total
        out_of_time = bool(time_budget) and bool(broadcast_flags([float(elapsed > time_budget * 60)], dd)[0])
        if dd.main and (step % eval_every == 0 or step == total or out_of_time):
            rec = {"step": step, "train_loss": sum(losses) / len(losses), "lr": lr, **evaluate(step)}
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            history.append(rec)
            losses = []
            score = rec.get("val_loss", rec["train_loss"])
            if score < best["val_loss"]:
                best = {"val_loss": score, "step": step, **{k: v for k, v in rec.items() if k.startswith("val_")}}
                best_state = snapshot()
            bar.set_postfix(train=f"{rec['train_loss']:.3f}", val=f"{rec.get('val_loss', float('nan')):.3f}")
            log.info("%s step %d/%d: train %.3f val %.3f (%.0fs)", desc, step, total, rec["train_loss"],
                     rec.get("val_loss", float("nan")), rec["seconds"])  # fmt: skip
        if out_of_time:
            stopped = "time budget"
            break
    bar.close()
    return FitResult(step, stopped, time.perf_counter() - t0, history, best, best_state)
