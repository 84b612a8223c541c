"""Helpers shared by the training stages (05 planner, 06 decoder): the learning-rate schedule,
the training sets' metadata check and the loss curve."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .artifacts import StaleInputError, load_meta


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
            raise StaleInputError(f"{name}={want} here, but the training sets were built with {name}={have}: "
                                  f"rerun steps 03-04 with {name}={want}, or set {name}={have}")
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
