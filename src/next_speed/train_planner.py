"""Step 05: train the planner; its evaluation against baselines; the inference helper.

Training sequences come from `sent_lm_*.jsonl` rows: a row whose context starts at its
document's first sentence gets a BOS tuple in front, so the planner knows where documents begin.
The loss covers every position of the window (each predicts the following tuple); evaluation
scores only each row's own target (the last position), so every validation sentence counts once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .artifacts import StaleInputError, atomic_dir, load_meta, read_jsonl, sha256_path, write_json
from .config import knob, to_dict
from .errors import ConfigError, NextSpeedError

log = logging.getLogger(__name__)

FORMAT = "next-speed-planner/1"


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
    seed: int = knob(0, env="SEED", help="random seed")
    deterministic: bool = knob(True, env="DETERMINISTIC", help="deterministic torch kernels")

    def check(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"D_MODEL={self.d_model} is not divisible by N_HEADS={self.n_heads}")


# ---------------------------------------------------------------------- data

def load_rows(path: str) -> list[dict]:
    return list(read_jsonl(path, required=("context", "target", "pos")))


def tensorize(rows: Sequence[dict], K: int, V: int, path: str = "rows"):
    """Rows -> inputs (N, L, K) with BOS/PAD, targets (N, L, K) with -100 padding, last index (N,)."""
    import torch

    bos, pad = V, V + 1
    L = max(len(r["context"]) + 1 for r in rows)
    inp = torch.full((len(rows), L, K), pad, dtype=torch.long)
    tgt = torch.full((len(rows), L, K), -100, dtype=torch.long)
    last = torch.empty(len(rows), dtype=torch.long)
    for i, r in enumerate(rows):
        ctx, target = r["context"], r["target"]
        full = ctx + [target]
        arr = np.asarray(full, dtype=np.int64)
        if arr.ndim != 2 or arr.shape[1] != K:
            raise StaleInputError(f"{path}: row {i + 1} has tuples of {arr.shape[-1] if arr.ndim == 2 else '?'} codes, expected K={K}: rerun step 04")
        if arr.min() < 0 or arr.max() >= V:
            raise StaleInputError(f"{path}: row {i + 1} has codes out of range [0, {V}): rerun step 04 with this V")
        at_start = r["pos"] == len(ctx)
        x = ([[bos] * K] if at_start else []) + full[:-1]
        y = full if at_start else full[1:]
        if not x:  # a window with no context and not at a document start cannot be scored
            x, y = [[bos] * K], [target]
        inp[i, : len(x)] = torch.tensor(x)
        tgt[i, : len(y)] = torch.tensor(y)
        last[i] = len(y) - 1
    return inp, tgt, last


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


# ---------------------------------------------------------------------- training

def train_planner(cfg: PlannerTrainConfig) -> dict:
    """Run step 05: train on OUT_LM, validate on OUT_LM_VAL, write OUT_DIR."""
    import torch
    import torch.nn.functional as F

    from .planner import Planner, PlannerModelConfig, cosine_lr
    from .runtime import pick_device, progress, seed_everything

    tmeta = check_trainsets(cfg.train_meta, [cfg.out_lm, cfg.out_lm_val], cfg.k, cfg.v)
    K, V = tmeta["K"], tmeta["V"]
    train_rows, val_rows = load_rows(cfg.out_lm), load_rows(cfg.out_lm_val)
    if not train_rows:
        raise NextSpeedError(f"{cfg.out_lm} is empty: rerun step 04 with more data or a smaller VAL_FRAC")
    seed_everything(cfg.seed, cfg.deterministic)
    device = pick_device(cfg.device)
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
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else _nullctx()
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(x_tr)
    history: list[dict] = []
    best = {"val_loss": float("inf"), "step": 0}
    best_state = None
    t0 = time.perf_counter()
    seen = 0
    bar = progress(range(cfg.steps), desc="05 planner", unit="step")
    for step in bar:
        model.train()
        idx = torch.randint(0, n, (min(cfg.bs, n),), generator=gen)
        xb, yb = x_tr[idx].to(device), y_tr[idx].to(device)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.steps, min(cfg.warmup, cfg.steps // 5), cfg.lr)
        with amp:
            logits = model(xb, yb)  # (B, T, K, V)
            loss = F.cross_entropy(logits.float().reshape(-1, V), yb.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        seen += len(idx)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            rec = {"step": step + 1, "train_loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                   "seq_per_s": seen / (time.perf_counter() - t0)}
            if val is not None:
                m = evaluate_model(model, *val, device=device)
                rec.update(val_loss=m["loss"], val_acc=m["acc"], val_exact=m["exact"])
            history.append(rec)
            score = rec.get("val_loss", rec["train_loss"])
            if score < best["val_loss"]:
                best = {"val_loss": score, "step": step + 1, **{k: v for k, v in rec.items() if k.startswith("val_")}}
                best_state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{rec.get('val_loss', float('nan')):.3f}")
            log.info("step %d: train %.3f val %s acc0 %s", step + 1, loss.item(), f"{rec.get('val_loss', float('nan')):.3f}",
                     f"{rec['val_acc'][0]:.3f}" if "val_acc" in rec else "-")
    elapsed = time.perf_counter() - t0
    assert best_state is not None
    out = Path(cfg.out_dir)
    info = {
        "format": FORMAT, "kind": "planner", "model": mcfg.to_dict(), "train": to_dict(cfg), "K": K, "V": V,
        "context_sents": tmeta["config"]["context_sents"],
        "inputs": {p: {"sha256": sha256_path(p)} for p in (cfg.out_lm, cfg.out_lm_val)},
        "rvq_sha256": tmeta.get("rvq_sha256"), "rvq_path": tmeta.get("rvq_path"),
        "best": best, "history": history, "seconds": round(elapsed, 1),
        "train_seq_per_s": round(seen / elapsed, 1), "num_params": model.num_params(),
        "versions": __import__("next_speed.artifacts", fromlist=["versions"]).versions(),
    }
    with atomic_dir(out) as tmp:
        torch.save(best_state, tmp / "sentence_lm.pt")
        plot_curve(history, tmp / "curve.png", "planner")
        write_json(tmp / "config.json", info)
    log.info("05: best val loss %.3f at step %d; %.0f seq/s -> %s", best["val_loss"], best["step"], seen / elapsed, out)
    return info


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


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


# ---------------------------------------------------------------------- evaluation

def evaluate_model(model, inp, tgt, last, device: str = "cpu", bs: int = 512) -> dict:
    """Score each row's own target: loss, per-head top-1/top-5, tuple exact match, matched prefix."""
    import torch
    import torch.nn.functional as F

    model.eval()
    K, V = model.cfg.K, model.cfg.V
    tot_loss, top5 = 0.0, []
    preds, golds = [], []
    with torch.no_grad():
        for i in range(0, len(inp), bs):
            xb = inp[i : i + bs].to(device)
            lb = last[i : i + bs].to(device)
            gold = tgt[i : i + bs].to(device)[torch.arange(len(xb), device=device), lb]  # (B, K)
            h = model.hidden(xb)[torch.arange(len(xb), device=device), lb]  # (B, D)
            prev = xb[torch.arange(len(xb), device=device), lb]  # (B, K): the previous sentence's codes
            # Loss with teacher-forced lower levels (chained) is the model's likelihood of the tuple.
            logits_tf = model.add_copy(model.head_logits(h, gold) if model.cfg.head_mode == "chained" else model.head_logits(h), h, prev)
            tot_loss += F.cross_entropy(logits_tf.float().reshape(-1, V), gold.reshape(-1), reduction="sum").item()
            # Accuracies use the model's own greedy choices for the lower levels (what generation sees).
            if model.cfg.head_mode == "chained":
                prefix = torch.zeros_like(gold)
                cols = []
                for k in range(K):
                    lk = model.add_copy(model.head_logits(h, prefix), h, prev)[:, k]
                    prefix[:, k] = lk.argmax(-1)
                    cols.append(lk)
                logits = torch.stack(cols, 1)
            else:
                logits = logits_tf
            pred = logits.argmax(-1)
            preds.append(pred.cpu())
            golds.append(gold.cpu())
            top5.append((logits.topk(min(5, V), -1).indices == gold[..., None]).any(-1).cpu())
    pred, gold, t5 = torch.cat(preds), torch.cat(golds), torch.cat(top5)
    return {"loss": tot_loss / max(1, gold.numel()), **tuple_metrics(pred.numpy(), gold.numpy(), t5.numpy())}


def tuple_metrics(pred: np.ndarray, gold: np.ndarray, top5_hit: np.ndarray | None = None) -> dict:
    """Per-level accuracy, tuple exact match and mean matched prefix (levels right from level 0)."""
    hit = pred == gold  # (N, K)
    prefix = np.cumprod(hit, axis=1).sum(1)
    out = {"acc": hit.mean(0).tolist(), "exact": float(hit.all(1).mean()), "prefix": float(prefix.mean()), "n": int(len(gold))}
    out["top5"] = (top5_hit if top5_hit is not None else hit).mean(0).tolist()
    return out


def baselines(train_rows: list[dict], val_rows: list[dict], K: int, V: int) -> dict[str, dict]:
    """Most frequent code per level; copy the previous tuple; level-wise bigram (prev code -> next)."""
    tr_t = np.asarray([r["target"] for r in train_rows])
    va_t = np.asarray([r["target"] for r in val_rows])
    counts = np.stack([np.bincount(tr_t[:, k], minlength=V) for k in range(K)])  # (K, V)
    freq_top = np.argsort(-counts, axis=1, kind="stable")[:, :5]  # (K, 5)
    out = {}
    pred = np.broadcast_to(freq_top[:, 0], va_t.shape)
    out["most frequent"] = tuple_metrics(pred, va_t, (freq_top[None] == va_t[..., None]).any(-1))
    # copy: previous sentence's tuple; a document's first sentence falls back to the most frequent codes
    prev = np.asarray([r["context"][-1] if r["context"] else freq_top[:, 0].tolist() for r in val_rows])
    out["copy previous"] = tuple_metrics(prev, va_t)
    # bigram per level, fit on training rows that have a previous sentence (add-one to unigram fallback)
    big = np.zeros((K, V, V), dtype=np.int32)
    for r in train_rows:
        if r["context"]:
            p = r["context"][-1]
            for k in range(K):
                big[k, p[k], r["target"][k]] += 1
    preds, hits = [], []
    for r, g in zip(val_rows, va_t):
        row_pred, row_hit = [], []
        for k in range(K):
            dist = big[k, r["context"][-1][k]] if r["context"] else None
            if dist is None or dist.sum() == 0:
                top = freq_top[k]
            else:
                top = np.lexsort((-counts[k], -dist))[:5]  # by bigram count, ties by unigram count
            row_pred.append(top[0])
            row_hit.append(g[k] in top[:5])
        preds.append(row_pred)
        hits.append(row_hit)
    out["bigram"] = tuple_metrics(np.asarray(preds), va_t, np.asarray(hits))
    return out


@dataclass
class PlannerEvalConfig:
    """sent_lm_eval.py knobs."""

    out_dir: str = knob("out/sentence_lm", env="OUT_DIR", help="trained planner folder (step 05)")
    out_lm: str = knob("data/sent_lm_train.jsonl", env="OUT_LM", help="training rows (for the baselines)")
    out_lm_val: str = knob("data/sent_lm_val.jsonl", env="OUT_LM_VAL", help="validation rows")
    train_meta: str = knob("data/train_meta.json", env="TRAIN_META", help="training sets metadata")
    out_json: str = knob("out/sent_lm_eval.json", env="OUT_JSON", help="where to write the report JSON")
    device: str = knob("auto", env="DEVICE", help="auto, cpu, cuda, cuda:N or mps")


def eval_planner(cfg: PlannerEvalConfig) -> dict:
    """Planner against the three baselines on the validation split."""
    from .runtime import pick_device

    model, info = load_planner(cfg.out_dir, device := pick_device(cfg.device))
    check_trainsets(cfg.train_meta, [cfg.out_lm, cfg.out_lm_val], info["K"], info["V"])
    val_rows = load_rows(cfg.out_lm_val)
    if not val_rows:
        raise NextSpeedError(f"{cfg.out_lm_val} is empty: rerun step 04 with VAL_FRAC > 0")
    K, V = info["K"], info["V"]
    res = {"planner": evaluate_model(model, *tensorize(val_rows, K, V, cfg.out_lm_val), device=device)}
    res.update(baselines(load_rows(cfg.out_lm), val_rows, K, V))
    report = {"K": K, "V": V, "val_rows": len(val_rows), "head_mode": info["model"]["head_mode"], "results": res}
    write_json(cfg.out_json, report)
    return report


def format_eval(rep: dict) -> str:
    K = rep["K"]
    head = f"{'model':<14}" + "".join(f" {'L' + str(k) + '@1':>7}" for k in range(K)) + f" {'L0@5':>6} {'exact':>6} {'prefix':>6}"
    lines = [f"planner evaluation on {rep['val_rows']} validation sentences (K={K}, V={rep['V']}, {rep['head_mode']} heads)", head]
    for name, m in rep["results"].items():
        lines.append(f"{name:<14}" + "".join(f" {a:>7.3f}" for a in m["acc"]) + f" {m['top5'][0]:>6.3f} {m['exact']:>6.3f} {m['prefix']:>6.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- inference helper

def load_planner(out_dir: str, device: str = "cpu"):
    """Load a trained planner: (model in eval mode, its config.json)."""
    import torch

    from .planner import Planner, PlannerModelConfig

    d = Path(out_dir)
    cfg_path, weights = d / "config.json", d / "sentence_lm.pt"
    if not cfg_path.is_file() or not weights.is_file():
        raise StaleInputError(f"no trained planner in {d}: run step 05 (05_train_sentence_lm.py)")
    info = json.loads(cfg_path.read_text())
    if info.get("format") != FORMAT:
        raise StaleInputError(f"{cfg_path} is not a next-speed planner ({info.get('format')}): rerun step 05")
    model = Planner(PlannerModelConfig(**info["model"]))
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.to(device).eval(), info


class PlannerRunner:
    """Next-tuple distributions and choices for generation, deterministic under an explicit Generator."""

    def __init__(self, model, context_sents: int):
        self.model = model
        self.K, self.V = model.cfg.K, model.cfg.V
        self.context_sents = context_sents

    def _inputs(self, context: Sequence[Sequence[int]], at_doc_start: bool):
        import torch

        ctx = [list(t) for t in context][-self.context_sents :] if self.context_sents else []
        start = at_doc_start and len(context) <= self.context_sents
        seq = ([[self.V] * self.K] if start or not ctx else []) + ctx
        seq = seq[-self.model.cfg.max_len :]
        return torch.tensor([seq], dtype=torch.long, device=next(self.model.parameters()).device)

    def distributions(self, context: Sequence[Sequence[int]], at_doc_start: bool = True):
        """Per-level probabilities (K, V) for the next tuple (greedy lower levels in chained mode)."""
        import torch

        _, logits = self.model.next_logits_levelwise(self._inputs(context, at_doc_start), lambda k, lg: lg.argmax(-1))
        return torch.softmax(logits[0].float(), -1)

    def next_tuple(self, context: Sequence[Sequence[int]], *, greedy: bool = False, temperature: float = 1.0,
                   top_k: int = 0, generator=None, at_doc_start: bool = True) -> list[int]:
        """Choose the next tuple: greedy, or sampled per level with temperature and top-k."""
        import torch

        def choose(k, logits):
            if greedy or temperature <= 0:
                return logits.argmax(-1)
            lg = logits.float() / temperature
            if top_k and top_k < lg.shape[-1]:
                kth = lg.topk(top_k, -1).values[..., -1:]
                lg = lg.masked_fill(lg < kth, float("-inf"))
            probs = torch.softmax(lg, -1)
            return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)

        chosen, _ = self.model.next_logits_levelwise(self._inputs(context, at_doc_start), choose)
        return chosen[0].tolist()
