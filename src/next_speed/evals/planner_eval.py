"""`sent_lm_eval.py`: the planner against four baselines (most frequent tuple, copy the previous
sentence's tuple, bigram, and retrieval: the tuple of the sentence that followed the training
sentence nearest to the current one) on the validation split. Each row's own target is scored
(its last position), so every validation sentence counts once.

Beside per-level accuracy, the measures of the Large Concept Models paper (Barrault et al. 2024,
section 2.4): the cosine and L2 distance between the planned tuple's RVQ reconstruction and the
true next sentence's embedding, and contrastive accuracy, the share of rows whose plan is closer
to their own next sentence than to every other next sentence of its batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from next_speed.core.artifacts import write_json
from next_speed.core.config import device_knob, knob, seed_knob
from next_speed.core.errors import NextSpeedError
from next_speed.core.runtime import pick_device
from next_speed.data.embed import open_embeddings
from next_speed.models.planner import (
    EmbeddingTable,
    PlannerRunner,
    input_sids,
    load_planner,
    load_rows,
    mean_detail,
    tensorize,
)
from next_speed.quant.rvq import levels_matched_rows, load_rvq
from next_speed.training.loop import check_trainsets


def evaluate_model(
    model,
    inp,
    tgt,
    last,
    device: str = "cpu",
    bs: int = 512,
    ids=None,
    table=None,
    return_pred: bool = False,
    codebooks=None,
) -> dict:
    """Score each row's own target: loss, per-head top-1/top-5, tuple exact match, matched prefix.
    A planner that reads embeddings gets them from `table` at the sentence ids `ids` (N, L).
    With `return_pred`, the greedy tuples (N, K) come back under "pred" (a numpy array), with "gold"
    and "top5_hit" (N, K); with `codebooks` (K, V, D) too, the `PLAN_DEEP=mean` tuples under "pred_mean"."""
    import torch
    import torch.nn.functional as F

    model.eval()
    K, V = model.cfg.K, model.cfg.V
    if codebooks is not None:
        codebooks = torch.as_tensor(codebooks, dtype=torch.float32)  # once, not per batch
    tot_loss, top5 = 0.0, []
    preds, golds, means = [], [], []
    with torch.no_grad():
        for i in range(0, len(inp), bs):
            xb = inp[i : i + bs].to(device)
            lb = last[i : i + bs].to(device)
            gold = tgt[i : i + bs].to(device)[torch.arange(len(xb), device=device), lb]  # (B, K)
            eb = table.lookup(ids[i : i + bs]).to(device) if model.cfg.emb_dim else None  # (B, L, E)
            hs = model.hidden(xb, eb)  # (B, L, D)
            # Loss with teacher-forced lower levels (chained) is the model's likelihood of the tuple.
            logits_tf = model.outputs_at(hs, xb, lb, gold if model.cfg.head_mode == "chained" else None)
            tot_loss += F.cross_entropy(logits_tf.float().reshape(-1, V), gold.reshape(-1), reduction="sum").item()
            # Accuracies use the model's own greedy choices for the lower levels (what generation sees).
            if model.cfg.head_mode == "chained":
                prefix = torch.zeros_like(gold)
                cols = []
                for k in range(K):
                    lk = model.outputs_at(hs, xb, lb, prefix)[:, k]
                    prefix[:, k] = lk.argmax(-1)
                    cols.append(lk)
                logits = torch.stack(cols, 1)
            else:
                logits = logits_tf
            pred = logits.argmax(-1)
            preds.append(pred.cpu())
            if codebooks is not None:
                means.append(mean_detail(torch.softmax(logits.float(), -1).cpu(), pred.cpu(), codebooks))
            golds.append(gold.cpu())
            top5.append((logits.topk(min(5, V), -1).indices == gold[..., None]).any(-1).cpu())
    pred, gold, t5 = torch.cat(preds), torch.cat(golds), torch.cat(top5)
    out = {"loss": tot_loss / max(1, gold.numel()), **tuple_metrics(pred.numpy(), gold.numpy(), t5.numpy())}
    if return_pred:
        out.update(pred=pred.numpy(), gold=gold.numpy(), top5_hit=t5.numpy())
        if means:
            out["pred_mean"] = torch.cat(means).numpy()
    return out


def tuple_metrics(pred: np.ndarray, gold: np.ndarray, top5_hit: np.ndarray | None = None) -> dict:
    """Per-level accuracy, tuple exact match and mean matched prefix (levels right from level 0)."""
    hit = pred == gold  # (N, K)
    prefix = levels_matched_rows(hit)
    out = {
        "acc": hit.mean(0).tolist(),
        "exact": float(hit.all(1).mean()),
        "prefix": float(prefix.mean()),
        "n": int(len(gold)),
    }
    out["top5"] = (top5_hit if top5_hit is not None else hit).mean(0).tolist()
    return out


def baselines(train_rows: list[dict], val_rows: list[dict], K: int, V: int, emb=None) -> dict[str, dict]:
    """Most frequent code per level; copy the previous tuple; level-wise bigram (prev code -> next);
    with `emb` (the sentence embeddings, indexed by the rows' `sid`) also retrieval. Each entry
    carries its predicted tuples under "pred"."""
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
            # by bigram count, ties by unigram count; the most frequent codes where the bigram knows nothing
            top = freq_top[k] if dist is None or dist.sum() == 0 else np.lexsort((-counts[k], -dist))[:5]
            row_pred.append(top[0])
            row_hit.append(g[k] in top[:5])
        preds.append(row_pred)
        hits.append(row_hit)
    out["bigram"] = tuple_metrics(np.asarray(preds), va_t, np.asarray(hits))
    out["most frequent"]["pred"] = np.asarray(pred)
    out["copy previous"]["pred"] = prev
    out["bigram"]["pred"] = np.asarray(preds)
    if emb is not None:
        out["retrieval"] = retrieval_baseline(train_rows, val_rows, emb, freq_top)
    return out


def retrieval_baseline(
    train_rows: list[dict], val_rows: list[dict], emb, freq_top: np.ndarray, depth: int = 50
) -> dict:
    """Nearest neighbour by embedding: find the training sentence most similar (inner product of
    the encoder's vectors) to the current sentence, and predict the tuple of the sentence that
    followed it. Top-5 at each level: the distinct codes of the followers of the nearest `depth`
    neighbours, nearest first. A document's first sentence has no current sentence: it gets the
    most frequent codes, as for the copy baseline."""
    import faiss

    keys = [r for r in train_rows if r["context"]]
    va_t = np.asarray([r["target"] for r in val_rows])
    K = va_t.shape[1]
    pred = np.broadcast_to(freq_top[:, 0], va_t.shape).copy()
    top5 = (freq_top[None] == va_t[..., None]).any(-1)
    q_rows = [i for i, r in enumerate(val_rows) if r["context"]]
    if keys and q_rows:
        kv = np.ascontiguousarray(np.asarray(emb[np.asarray([r["sid"] - 1 for r in keys])], dtype=np.float32))
        follow = np.asarray([r["target"] for r in keys])  # (M, K)
        index = faiss.IndexFlatIP(kv.shape[1])
        index.add(kv)
        qv = np.ascontiguousarray(
            np.asarray(emb[np.asarray([val_rows[i]["sid"] - 1 for i in q_rows])], dtype=np.float32)
        )
        _, nn = index.search(qv, min(depth, len(keys)))  # (Q, depth)
        for qi, i in enumerate(q_rows):
            cand = follow[nn[qi]]  # (depth, K)
            pred[i] = cand[0]
            for k in range(K):
                _, first = np.unique(cand[:, k], return_index=True)
                top = cand[np.sort(first), k][:5]
                top5[i, k] = va_t[i, k] in top
    out = tuple_metrics(pred, va_t, top5)
    out["pred"] = pred
    return out


def in_context(pred0: np.ndarray, val_rows: list[dict]) -> dict:
    """Where the next level-0 code is: the share of rows whose target's level-0 code is among the
    context's level-0 codes (the part a planner can find by pointing), and the planner's level-0
    accuracy `pred0` (N,) on those rows and on the others (codes the context never showed)."""
    gold = np.asarray([r["target"][0] for r in val_rows])
    seen = np.asarray([g in {c[0] for c in r["context"]} for g, r in zip(gold, val_rows)], dtype=bool)
    hit = pred0 == gold
    return {
        "share": float(seen.mean()),
        "planner_acc_in": float(hit[seen].mean()) if seen.any() else None,
        "planner_acc_out": float(hit[~seen].mean()) if (~seen).any() else None,
    }


def lcm_metrics(pred: np.ndarray, nxt: np.ndarray, decode, batch: int = 64, seed: int = 0) -> dict:
    """The plan against the true next sentence in embedding space: mean cosine and L2 distance
    between the RVQ reconstruction of `pred` (N, K) and `nxt` (N, D), and contrastive accuracy over
    seeded batches of `batch` rows (a row counts when its plan is closer, by cosine, to its own
    next sentence than to each other row's)."""
    rec = decode(pred)  # (N, D)
    rn = rec / (np.linalg.norm(rec, axis=1, keepdims=True) + 1e-12)
    nn_ = nxt / (np.linalg.norm(nxt, axis=1, keepdims=True) + 1e-12)
    cos = (rn * nn_).sum(1)
    l2 = np.linalg.norm(rec - nxt, axis=1)
    order = np.random.default_rng(seed).permutation(len(pred))
    hits, n = 0, 0
    for i in range(0, len(order), batch):
        b = order[i : i + batch]
        if len(b) < 2:
            continue
        sim = rn[b] @ nn_[b].T  # (B, B): plan i vs next sentence j
        own = np.diag(sim)
        other = np.where(np.eye(len(b), dtype=bool), -np.inf, sim).max(1)
        hits += int((own > other).sum())
        n += len(b)
    return {
        "cos_next": float(cos.mean()),
        "l2_next": float(l2.mean()),
        "contrastive_acc": hits / max(n, 1),
        "contrastive_batch": batch,
    }


@dataclass
class PlannerEvalConfig:
    """sent_lm_eval.py knobs."""

    out_dir: str = knob("out/sentence_lm", env="OUT_DIR", help="trained planner folder (step 05)")
    out_lm: str = knob("data/sent_lm_train.jsonl", env="OUT_LM", help="training rows (for the baselines)")
    out_lm_val: str = knob("data/sent_lm_val.jsonl", env="OUT_LM_VAL", help="validation rows")
    train_meta: str = knob("data/train_meta.json", env="TRAIN_META", help="training sets metadata")
    emb_meta: str = knob(
        "data/emb_meta.json", env="EMB_META", help="embeddings metadata (step 02): the true next sentences' vectors"
    )
    contrast_batch: int = knob(64, env="CONTRAST_BATCH", min=2, help="rows per batch for contrastive accuracy")
    out_json: str = knob("out/sent_lm_eval.json", env="OUT_JSON", help="where to write the report JSON")
    device: str = device_knob()
    seed: int = seed_knob("seed of the contrastive batches")
    plan_deep: str = knob(
        "mean",
        env="PLAN_DEEP",
        choices=("mean", "levels"),
        help="the planner's levels 1..K-1, as generation chooses them (greedy level 0): mean = MBR "
        "under cosine, levels = each level's argmax; both are reported, the summary uses this one",
    )


SUMMARY_KEYS = ("l0_top1", "l0_top5", "cos_next", "contrastive_acc")
LOOKAHEAD = 4  # distances reported by lookahead_accuracy (generation's PARALLEL=4)


def lookahead_accuracy(
    runner, val_rows: list[dict], emb, codebooks, ahead: int = LOOKAHEAD, max_rows: int = 300, plan_deep: str = "mean"
) -> list[float | None]:
    """Level-0 top-1 accuracy of the plan `d` sentences ahead, d = 1..`ahead`, as PARALLEL plans:
    the planner reads the true sentences before position t-d+1, plans the d-1 sentences after
    them greedily, each fed back as its codes and their unit RVQ reconstruction, then predicts
    sentence t. Over at most `max_rows` positions per distance (the first in document order)."""
    docs: dict[int, list[dict]] = {}
    for r in val_rows:
        docs.setdefault(r["doc"], []).append(r)
    out: list[float | None] = []
    books = np.asarray(codebooks, dtype=np.float32)
    for d in range(1, ahead + 1):
        hits = n = 0
        for rows in docs.values():
            rows = sorted(rows, key=lambda r: r["pos"])
            codes = [list(r["target"]) for r in rows]
            vecs = np.asarray(emb[np.asarray([r["sid"] for r in rows])], dtype=np.float32)
            for t in range(d - 1, len(rows)):
                if n >= max_rows:
                    break
                start = t - d + 1
                ctx, ctx_emb = codes[:start], list(vecs[:start])
                for _ in range(d - 1):
                    pl = runner.next_tuple(
                        ctx,
                        greedy=True,
                        at_doc_start=True,
                        embeddings=np.asarray(ctx_emb).reshape(len(ctx), books.shape[-1]),
                        deep=plan_deep,
                    )
                    rec = sum(books[k][c] for k, c in enumerate(pl))
                    ctx, ctx_emb = ctx + [pl], ctx_emb + [rec / max(float(np.linalg.norm(rec)), 1e-12)]
                pred = runner.next_tuple(
                    ctx,
                    greedy=True,
                    at_doc_start=True,
                    embeddings=np.asarray(ctx_emb).reshape(len(ctx), books.shape[-1]),
                    deep="levels",
                )
                hits += int(pred[0] == codes[t][0])
                n += 1
        out.append(round(hits / n, 4) if n else None)
    return out


def eval_planner(cfg: PlannerEvalConfig) -> dict:
    """Planner against the four baselines on the validation split, per level and in embedding space."""
    import torch

    model, info = load_planner(cfg.out_dir, device := pick_device(cfg.device))
    tmeta = check_trainsets(cfg.train_meta, [cfg.out_lm, cfg.out_lm_val], info["K"], info["V"])
    val_rows = load_rows(cfg.out_lm_val)
    if not val_rows:
        raise NextSpeedError(f"{cfg.out_lm_val} is empty: rerun step 04 with VAL_FRAC > 0")
    if any("sid" not in r for r in val_rows):
        raise NextSpeedError(f"{cfg.out_lm_val} has no sentence ids ('sid'): rerun step 04")
    K, V = info["K"], info["V"]
    emb, _ = open_embeddings(tmeta.get("emb_path") or "data/embeddings.npy", cfg.emb_meta, what="EMB_META")
    rvq, _ = load_rvq(tmeta.get("rvq_path") or "out/rvq.npz", tmeta["config"].get("rvq_meta", "out/rvq_meta.json"))
    inp, tgt, last = tensorize(val_rows, K, V, cfg.out_lm_val)
    table, ids = None, None
    if model.cfg.emb_dim:
        table = EmbeddingTable(model.cfg.emb_dim)
        ids = table.add(
            emb, input_sids(val_rows, inp.shape[1], cfg.out_lm_val), tmeta.get("emb_path", "the embeddings")
        )
    with torch.no_grad():
        pm = evaluate_model(
            model, inp, tgt, last, device=device, ids=ids, table=table, return_pred=True, codebooks=rvq.codebooks
        )
    # The tuple generation would plan greedily: level 0 the argmax, the deeper levels by PLAN_DEEP.
    # Both choices are reported; per-level accuracy is the tuple's own.
    gold, t5 = pm.pop("gold"), pm.pop("top5_hit")
    mean = pm.pop("pred_mean")
    pm_mean = {"loss": pm["loss"], **tuple_metrics(mean, gold, t5), "pred": mean}
    other = "levels" if cfg.plan_deep == "mean" else "mean"
    res = {
        "planner": pm_mean if cfg.plan_deep == "mean" else pm,
        f"planner (PLAN_DEEP={other})": pm if cfg.plan_deep == "mean" else pm_mean,
    }
    where = in_context(pm["pred"][:, 0], val_rows)
    res.update(baselines(load_rows(cfg.out_lm), val_rows, K, V, emb=emb))
    nxt = np.asarray(emb[np.asarray([r["sid"] for r in val_rows])], dtype=np.float32)
    for m in res.values():
        m.update(lcm_metrics(m.pop("pred"), nxt, rvq.decode, cfg.contrast_batch, cfg.seed))
    summary = {}
    for key, get in (
        ("l0_top1", lambda m: m["acc"][0]),
        ("l0_top5", lambda m: m["top5"][0]),
        ("cos_next", lambda m: m["cos_next"]),
        ("contrastive_acc", lambda m: m["contrastive_acc"]),
    ):
        best_name, best = max(((n, get(m)) for n, m in res.items() if not n.startswith("planner")), key=lambda t: t[1])
        summary[key] = round(get(res["planner"]), 4)
        summary[f"{key}_best_baseline"] = round(best, 4)
        summary[f"{key}_best_baseline_name"] = best_name
        summary[f"{key}_ratio"] = round(get(res["planner"]) / best, 3) if best > 0 else None

    runner = PlannerRunner(model, info["context_sents"], codebooks=rvq.codebooks)
    ahead = lookahead_accuracy(runner, val_rows, emb, rvq.codebooks, plan_deep=cfg.plan_deep)
    for d, acc in enumerate(ahead, start=1):
        summary[f"l0_top1_ahead_{d}"] = acc
    report = {
        "K": K,
        "V": V,
        "val_rows": len(val_rows),
        "head_mode": info["model"]["head_mode"],
        "planner_input": info.get("planner_input", "codes"),
        "plan_deep": cfg.plan_deep,
        "results": res,
        "level0_in_context": where,
        "summary": summary,
    }
    write_json(cfg.out_json, report)
    return report


def format_eval(rep: dict) -> str:
    K = rep["K"]
    w = max(14, *(len(n) for n in rep["results"]))
    head = (
        f"{'model':<{w}}"
        + "".join(f" {'L' + str(k) + '@1':>7}" for k in range(K))
        + f" {'L0@5':>6} {'exact':>6} {'prefix':>6} {'cos':>6} {'L2':>6} {'contr':>6}"
    )
    lines = [
        f"planner evaluation on {rep['val_rows']} validation sentences (K={K}, V={rep['V']}, {rep['head_mode']} heads, "
        f"input: {rep.get('planner_input', 'codes')}, levels 1..K-1: PLAN_DEEP={rep.get('plan_deep', 'levels')})",
        head,
    ]
    for name, m in rep["results"].items():
        lines.append(
            f"{name:<{w}}" + "".join(f" {a:>7.3f}" for a in m["acc"]) + f" {m['top5'][0]:>6.3f} {m['exact']:>6.3f} "
            f"{m['prefix']:>6.2f} {m.get('cos_next', float('nan')):>6.3f} {m.get('l2_next', float('nan')):>6.3f} "
            f"{m.get('contrastive_acc', float('nan')):>6.3f}"
        )
    where = rep.get("level0_in_context")
    if where and where["planner_acc_in"] is not None and where["planner_acc_out"] is not None:
        lines.append(
            f"next level-0 code among the context's: {where['share']:.1%} of rows; planner level-0 accuracy "
            f"{where['planner_acc_in']:.3f} there, {where['planner_acc_out']:.3f} elsewhere"
        )
    sm = rep.get("summary", {})
    ahead = [sm.get(f"l0_top1_ahead_{d}") for d in range(1, LOOKAHEAD + 1)]
    if any(a is not None for a in ahead):
        lines.append(
            "level-0 top-1 planning ahead (PARALLEL), sentences 1.."
            + str(LOOKAHEAD)
            + " ahead: "
            + ", ".join("-" if a is None else f"{a:.3f}" for a in ahead)
        )
    for key in SUMMARY_KEYS:
        if key in sm:
            lines.append(
                f"{key}: planner {sm[key]:.3f}, best baseline ({sm[key + '_best_baseline_name']}) "
                f"{sm[key + '_best_baseline']:.3f}, ratio {sm[key + '_ratio']}"
            )
    return "\n".join(lines)
