"""`sent_lm_eval.py`: the planner against three baselines (most frequent tuple, copy the previous
sentence's tuple, bigram) on the validation split. Each row's own target is scored (its last
position), so every validation sentence counts once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .artifacts import write_json
from .config import knob
from .errors import NextSpeedError
from .planner import load_planner, load_rows, tensorize
from .training import check_trainsets


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
