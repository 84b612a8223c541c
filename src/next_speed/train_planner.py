"""Step 05: train the planner (its evaluation is `planner_eval`, its inference `planner`).

Training sequences come from `sent_lm_*.jsonl` rows: a row whose context starts at its
document's first sentence gets a BOS tuple in front, so the planner knows where documents begin.
The loss covers every position of the window (each predicts the following tuple); evaluation
scores only each row's own target (the last position), so every validation sentence counts once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path


from .artifacts import StaleInputError, atomic_dir, sha256_path, write_checkpoint_meta, write_json
from .config import SEED_MAX, knob, to_dict
from .errors import ConfigError, NextSpeedError
from .planner import FORMAT, load_rows, tensorize
from .planner_eval import evaluate_model
from .training import check_trainsets, plot_curve

log = logging.getLogger(__name__)



@dataclass
class PlannerTrainConfig:
    """Step 05 knobs."""

    d_model: int = knob(256, env="D_MODEL", min=8, help="hidden size")
    n_layers: int = knob(4, env="N_LAYERS", min=1, help="transformer blocks")
    n_heads: int = knob(4, env="N_HEADS", min=1, help="attention heads (must divide D_MODEL)")
    drop: float = knob(0.3, env="DROP", min=0.0, max=0.9, help="dropout")
    head_mode: str = knob("independent", env="HEAD_MODE", choices=("independent", "chained"),
                          help="independent K heads (spec) or chained: level k sees levels < k")
    codebook_features: bool = knob(True, env="CODEBOOK_FEATURES",
                                   help="feed RVQ codewords into the input and heads (needs RVQ_PATH)")
    rvq_path: str = knob("out/rvq.npz", env="RVQ_PATH", help="RVQ codebooks (step 03), for CODEBOOK_FEATURES")
    copy_gate: bool = knob(True, env="COPY_GATE", help="learned bonus for repeating the previous sentence's codes")
    bs: int = knob(64, env="BS", min=1, help="batch size (rows)")
    lr: float = knob(1e-3, env="LR", min=0.0, help="peak learning rate (AdamW)")
    weight_decay: float = knob(0.1, env="WEIGHT_DECAY", min=0.0, help="AdamW weight decay")
    warmup: int = knob(100, env="WARMUP", min=0, help="warmup steps")
    steps: int = knob(3000, env="STEPS", min=1, help="optimizer steps")
    log_every: int = knob(250, env="LOG_EVERY", min=1, help="validate and log every N steps")
    grad_clip: float = knob(1.0, env="GRAD_CLIP", min=0.0, help="gradient-norm clip (0 = off)")
    k: int | None = knob(None, env="K", min=1, help="RVQ levels (checked against the training sets)")
    v: int | None = knob(None, env="V", min=2, help="codewords per level (checked against the training sets)")
    out_lm: str = knob("data/sent_lm_train.jsonl", env="OUT_LM", help="training rows (step 04)")
    out_lm_val: str = knob("data/sent_lm_val.jsonl", env="OUT_LM_VAL", help="validation rows (step 04)")
    train_meta: str = knob("data/train_meta.json", env="TRAIN_META", help="training sets metadata (step 04)")
    out_dir: str = knob("out/sentence_lm", env="OUT_DIR", help="output folder")
    device: str = knob("auto", env="DEVICE", help="auto, cpu, cuda, cuda:N or mps")
    seed: int = knob(0, env="SEED", min=0, max=SEED_MAX, help="random seed")
    deterministic: bool = knob(True, env="DETERMINISTIC", help="deterministic torch kernels")

    def check(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"D_MODEL={self.d_model} is not divisible by N_HEADS={self.n_heads}")


# ---------------------------------------------------------------------- training

def train_planner(cfg: PlannerTrainConfig) -> dict | None:
    """Run step 05: train on OUT_LM, validate on OUT_LM_VAL, write OUT_DIR.

    Under `torchrun --nproc-per-node N` the model is wrapped in DistributedDataParallel (gloo on
    CPU, NCCL on GPUs): every rank draws the same global batch of BS rows and trains on its
    shard, the loss is weighted by the global token count, so N processes follow the same
    trajectory as one (up to floating point; with DROP=0, as dropout masks differ). Rank 0
    validates, logs and writes the checkpoint, once and atomically; other ranks return None."""
    import torch
    import torch.nn.functional as F

    from .planner import Planner, PlannerModelConfig
    from .training import cosine_lr, dist_close, dist_init, global_mean, shard
    from .runtime import pick_device, progress, seed_everything

    tmeta = check_trainsets(cfg.train_meta, [cfg.out_lm, cfg.out_lm_val], cfg.k, cfg.v)
    K, V = tmeta["K"], tmeta["V"]
    train_rows, val_rows = load_rows(cfg.out_lm), load_rows(cfg.out_lm_val)
    if not train_rows:
        raise NextSpeedError(f"{cfg.out_lm} is empty: rerun step 04 with more data or a smaller VAL_FRAC")
    seed_everything(cfg.seed, cfg.deterministic)
    dd, device = dist_init(pick_device(cfg.device))
    x_tr, y_tr, _ = tensorize(train_rows, K, V, cfg.out_lm)
    val = tensorize(val_rows, K, V, cfg.out_lm_val) if val_rows else None
    max_len = max(x_tr.shape[1], val[0].shape[1] if val else 0, tmeta["config"]["context_sents"] + 1)
    books = None
    if cfg.codebook_features:
        from .rvq import RVQ

        rvq = RVQ.load(cfg.rvq_path)
        if (rvq.K, rvq.V) != (K, V):
            raise StaleInputError(f"{cfg.rvq_path} has K={rvq.K} V={rvq.V} but the training sets K={K} V={V}: rerun step 04")
        if tmeta.get("rvq_sha256") and tmeta["rvq_sha256"] != sha256_path(cfg.rvq_path):
            raise StaleInputError(f"the training sets were built from another {cfg.rvq_path}: rerun step 04")
        books = rvq.codebooks
    mcfg = PlannerModelConfig(K=K, V=V, d_model=cfg.d_model, n_heads=cfg.n_heads, n_layers=cfg.n_layers,
                              dropout=cfg.drop, max_len=max_len, head_mode=cfg.head_mode,
                              codebook_dim=books.shape[-1] if books is not None else 0, copy_gate=cfg.copy_gate)
    model = Planner(mcfg)
    if books is not None:
        model.set_codebooks(books)
    model = model.to(device)
    core = model  # the module itself (validation, saving); `model` is what trains
    if dd.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[dd.local_rank] if device.startswith("cuda") else None)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(x_tr)
    history: list[dict] = []
    best = {"val_loss": float("inf"), "step": 0}
    best_state = None
    t0 = time.perf_counter()
    seen = 0
    bar = progress(range(cfg.steps), desc="05 planner", unit="step", disable=True if not dd.main else None)
    for step in bar:
        model.train()
        idx = torch.randint(0, n, (min(cfg.bs, n),), generator=gen)  # the global batch, the same on every rank
        idx = shard(idx, dd)
        xb, yb = x_tr[idx].to(device), y_tr[idx].to(device)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.steps, min(cfg.warmup, cfg.steps // 5), cfg.lr)
        with amp:
            logits = model(xb, yb)  # (B, T, K, V)
            total = F.cross_entropy(logits.float().reshape(-1, V), yb.reshape(-1), ignore_index=-100, reduction="sum")
            loss, loss_mean = global_mean(total, (yb != -100).sum(), dd)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        seen += len(idx) * dd.world
        if dd.main and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            rec = {"step": step + 1, "train_loss": loss_mean.item(), "lr": opt.param_groups[0]["lr"],
                   "seq_per_s": seen / (time.perf_counter() - t0)}
            if val is not None:
                m = evaluate_model(core, *val, device=device)
                rec.update(val_loss=m["loss"], val_acc=m["acc"], val_exact=m["exact"])
            history.append(rec)
            score = rec.get("val_loss", rec["train_loss"])
            if score < best["val_loss"]:
                best = {"val_loss": score, "step": step + 1, **{k: v for k, v in rec.items() if k.startswith("val_")}}
                best_state = {k: v.detach().to("cpu").clone() for k, v in core.state_dict().items()}
            bar.set_postfix(loss=f"{loss_mean.item():.3f}", val=f"{rec.get('val_loss', float('nan')):.3f}")
            log.info("step %d: train %.3f val %s acc0 %s", step + 1, loss_mean.item(), f"{rec.get('val_loss', float('nan')):.3f}",
                     f"{rec['val_acc'][0]:.3f}" if "val_acc" in rec else "-")
    elapsed = time.perf_counter() - t0
    model = core
    if not dd.main:  # rank 0 alone writes the checkpoint
        dist_close(dd)
        return None
    assert best_state is not None
    out = Path(cfg.out_dir)
    info = {
        "format": FORMAT, "kind": "planner", "model": mcfg.to_dict(), "train": to_dict(cfg), "K": K, "V": V,
        "context_sents": tmeta["config"]["context_sents"],
        "inputs": {p: {"sha256": sha256_path(p)} for p in (cfg.out_lm, cfg.out_lm_val)},
        "rvq_sha256": tmeta.get("rvq_sha256"), "rvq_path": tmeta.get("rvq_path"),
        "best": best, "history": history, "seconds": round(elapsed, 1),
        "train_seq_per_s": round(seen / elapsed, 1), "num_params": model.num_params(), "world_size": dd.world,
        "versions": __import__("next_speed.artifacts", fromlist=["versions"]).versions(),
    }
    with atomic_dir(out) as tmp:
        torch.save(best_state, tmp / "sentence_lm.pt")
        plot_curve(history, tmp / "curve.png", "planner")
        write_json(tmp / "config.json", info)
        inputs = {"train": cfg.out_lm, "val": cfg.out_lm_val, "rvq": tmeta.get("rvq_path")}
        write_checkpoint_meta(tmp, "planner", to_dict(cfg), {r: p for r, p in inputs.items() if p and Path(p).is_file()},
                              counts={"steps": cfg.steps, "params": model.num_params()}, best=best, history=history)
    log.info("05: best val loss %.3f at step %d; %.0f seq/s -> %s", best["val_loss"], best["step"], seen / elapsed, out)
    dist_close(dd)
    return info


