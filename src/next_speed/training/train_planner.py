"""Step 05: train the planner (its evaluation is `planner_eval`, its inference `planner`).

Training sequences come from `sent_lm_*.jsonl` rows: a row whose context starts at its
document's first sentence gets a BOS tuple in front, so the planner knows where documents begin.
The loss covers every position of the window (each predicts the following tuple); evaluation
scores only each row's own target (the last position), so every validation sentence counts once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from next_speed.core.artifacts import (
    StaleInputError,
    atomic_dir,
    read_jsonl,
    sha256_path,
    versions,
    write_checkpoint_meta,
    write_json,
)
from next_speed.core.config import deterministic_knob, device_knob, knob, seed_knob, to_dict
from next_speed.core.errors import ConfigError, NextSpeedError
from next_speed.core.runtime import autocast, pick_device, resolve_amp, seed_everything
from next_speed.data.embed import open_embeddings
from next_speed.evals.planner_eval import evaluate_model
from next_speed.models.planner import (
    FORMAT,
    EmbeddingTable,
    Planner,
    PlannerModelConfig,
    input_sids,
    load_rows,
    tensorize,
)
from next_speed.quant.rvq import RVQ, check_fits_rvq, load_rvq
from next_speed.training.loop import (
    check_trainsets,
    cosine_lr,
    decay_groups,
    dist_close,
    dist_init,
    fit,
    global_mean,
    plot_curve,
    shard,
    wrap_ddp,
)

log = logging.getLogger(__name__)


@dataclass
class PlannerTrainConfig:
    """Step 05 knobs."""

    d_model: int = knob(256, env="D_MODEL", min=8, help="hidden size")
    n_layers: int = knob(4, env="N_LAYERS", min=1, help="transformer blocks")
    n_heads: int = knob(4, env="N_HEADS", min=1, help="attention heads (must divide D_MODEL)")
    drop: float = knob(0.3, env="DROP", min=0.0, max=0.9, help="dropout")
    head_mode: str = knob(
        "independent",
        env="HEAD_MODE",
        choices=("independent", "chained"),
        help="independent K heads (spec) or chained: level k sees levels < k",
    )
    codebook_features: bool = knob(
        True, env="CODEBOOK_FEATURES", help="feed RVQ codewords into the input and heads (needs RVQ_PATH)"
    )
    rvq_path: str = knob("out/rvq.npz", env="RVQ_PATH", help="RVQ codebooks (step 03), for CODEBOOK_FEATURES")
    copy_gate: bool = knob(True, env="COPY_GATE", help="learned bonus for repeating the previous sentence's codes")
    pointer: bool = knob(
        True,
        env="POINTER",
        help="pointer-generator output: each level's distribution is mixed with attention over the codes "
        "of every context sentence (0: the generated distribution and the copy gate only)",
    )
    planner_input: str = knob(
        "emb",
        env="PLANNER_INPUT",
        choices=("codes", "emb"),
        help="what the planner reads of each previous sentence: its code tuple (the spec's planner), "
        "or the tuple and its encoder embedding",
    )
    emb_meta: str = knob(
        "data/emb_meta.json", env="EMB_META", help="embeddings metadata (step 02), for PLANNER_INPUT=emb"
    )
    recon_input: float = knob(
        0.25,
        env="RECON_INPUT",
        min=0.0,
        max=1.0,
        help="with PLANNER_INPUT=emb, the share of training positions that read their codes' RVQ "
        "reconstruction instead of the sentence's embedding: what the planner reads of a sentence "
        "it planned itself when it plans several ahead (generation's PARALLEL)",
    )
    extra_data: str = knob(
        "",
        env="EXTRA_DATA",
        help="comma-separated folders holding other step 01-02 outputs (sentences.jsonl, embeddings.npy, "
        "emb_meta.json): their sentences, quantized with this RVQ, join the training rows",
    )
    bs: int = knob(64, env="BS", min=1, help="batch size (rows)")
    lr: float = knob(1e-3, env="LR", min=0.0, help="peak learning rate (AdamW)")
    weight_decay: float = knob(0.1, env="WEIGHT_DECAY", min=0.0, help="AdamW weight decay")
    warmup: int = knob(100, env="WARMUP", min=0, help="warmup steps")
    steps: int = knob(3000, env="STEPS", min=1, help="optimizer steps")
    log_every: int = knob(250, env="LOG_EVERY", min=1, help="validate and log every N steps")
    grad_clip: float = knob(1.0, env="GRAD_CLIP", min=0.0, help="gradient-norm clip (0 = off)")
    amp: str = knob(
        "off",
        env="AMP",
        choices=("auto", "bf16", "off"),
        help="bf16 mixed precision (as step 06's AMP): auto = on CUDA and on CPUs with native bf16; "
        "off by default, as the planner's matrices are small (the full preset sets auto)",
    )
    k: int | None = knob(None, env="K", min=1, help="RVQ levels (checked against the training sets)")
    v: int | None = knob(None, env="V", min=2, help="codewords per level (checked against the training sets)")
    out_lm: str = knob("data/sent_lm_train.jsonl", env="OUT_LM", help="training rows (step 04)")
    out_lm_val: str = knob("data/sent_lm_val.jsonl", env="OUT_LM_VAL", help="validation rows (step 04)")
    train_meta: str = knob("data/train_meta.json", env="TRAIN_META", help="training sets metadata (step 04)")
    out_dir: str = knob("out/sentence_lm", env="OUT_DIR", help="output folder")
    device: str = device_knob()
    seed: int = seed_knob("random seed")
    deterministic: bool = deterministic_knob()

    def check(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"D_MODEL={self.d_model} is not divisible by N_HEADS={self.n_heads}")


# ---------------------------------------------------------------------- data


def extra_folders(cfg: PlannerTrainConfig) -> list[str]:
    """The folders named by EXTRA_DATA."""
    return [f.strip() for f in cfg.extra_data.split(",") if f.strip()]


def planner_data(cfg: PlannerTrainConfig, tmeta: dict, train_rows: list[dict], val_rows: list[dict]) -> dict:
    """Training and validation tensors: (inputs, targets, last index, sentence ids) each, the
    embedding table they index (None for PLANNER_INPUT=codes), the encoder's name and the count
    of rows added from EXTRA_DATA."""
    K, V = tmeta["K"], tmeta["V"]
    x_tr, y_tr, _ = tensorize(train_rows, K, V, cfg.out_lm)
    val = list(tensorize(val_rows, K, V, cfg.out_lm_val)) if val_rows else None

    table, encoder = None, None
    ids_tr = _no_ids(x_tr)
    if val:
        val.append(_no_ids(val[0]))
    emb = None
    if cfg.planner_input == "emb" or extra_folders(cfg):
        emb, emb_meta = open_embeddings(tmeta.get("emb_path") or "data/embeddings.npy", cfg.emb_meta, what="EMB_META")
        if tmeta.get("emb_sha256") and emb_meta["outputs"].get(tmeta.get("emb_path"), {}).get("sha256") not in (
            None,
            tmeta["emb_sha256"],
        ):
            raise StaleInputError(
                f"the training sets were built from other embeddings than {tmeta.get('emb_path')}: rerun steps 03-04"
            )
        encoder = {
            "model": emb_meta.get("model"),
            "maxlen": emb_meta.get("config", {}).get("maxlen"),
            "normalized": emb_meta.get("normalized"),
        }
    if cfg.planner_input == "emb":
        what = tmeta.get("emb_path", "the embeddings")
        table = EmbeddingTable(int(emb.shape[1]))
        ids_tr = table.add(emb, input_sids(train_rows, x_tr.shape[1], cfg.out_lm), what)
        if val:
            val[3] = table.add(emb, input_sids(val_rows, val[0].shape[1], cfg.out_lm_val), what)
    extra = 0
    own = _own_texts(tmeta) if extra_folders(cfg) else set()
    for folder in extra_folders(cfg):
        rows, xemb = extra_rows(folder, tmeta, encoder, own)
        if not rows:
            continue
        xx, yy, _ = tensorize(rows, K, V, folder)
        ii = table.add(xemb, input_sids(rows, xx.shape[1], folder), folder) if table is not None else _no_ids(xx)
        x_tr, y_tr, ids_tr = (
            _cat_padded(a, b, pad) for a, b, pad in ((x_tr, xx, V + 1), (y_tr, yy, -100), (ids_tr, ii, -1))
        )
        extra += len(rows)
        log.info("05: %d training rows from %s", len(rows), folder)
    return {"train": (x_tr, y_tr, ids_tr), "val": val, "table": table, "encoder": encoder, "extra_rows": extra}


def _no_ids(x):
    """Sentence ids for inputs `x` (N, L, K) when no embeddings are read: all -1."""
    import torch

    return torch.full(x.shape[:2], -1, dtype=torch.long)


def _cat_padded(a, b, pad):
    """Concatenate along rows, right-padding the shorter sequence dimension with `pad`."""
    import torch
    import torch.nn.functional as F

    if a.dim() == 1:
        return torch.cat([a, b])
    L = max(a.shape[1], b.shape[1])

    def grow(t):
        return F.pad(t, (0, 0) * (t.dim() - 2) + (0, L - t.shape[1]), value=pad) if t.shape[1] < L else t

    return torch.cat([grow(a), grow(b)])


def extra_rows(folder: str, tmeta: dict, encoder: dict | None, own: set[str]):
    """Planner rows from another step 01-02 output folder (EXTRA_DATA): its embeddings are
    quantized with this run's RVQ (no re-embedding), and windowed by document as step 04 does.
    Documents that share a sentence with `own` (the text of this run's sentence file) are left
    out: those of its validation split must stay held out, those of its training split are in
    already. Returns (rows with `sid` into the folder's embeddings, the memory-mapped embeddings)."""

    d = Path(folder)
    if not d.is_dir():
        raise ConfigError(
            f"EXTRA_DATA: {folder} is not a folder "
            "(expected one holding sentences.jsonl, embeddings.npy, emb_meta.json)"
        )
    for name in ("sentences.jsonl", "embeddings.npy", "emb_meta.json"):
        if not (d / name).is_file():
            raise ConfigError(f"EXTRA_DATA: {d / name} is missing (run steps 01-02 with that folder as their output)")
    emb, meta = open_embeddings(str(d / "embeddings.npy"), str(d / "emb_meta.json"), what="EXTRA_DATA", elsewhere=True)
    if encoder is not None:
        for what, theirs, ours in (
            ("the encoder", meta.get("model"), encoder.get("model")),
            ("MAXLEN", meta.get("config", {}).get("maxlen"), encoder.get("maxlen")),
            ("normalization", meta.get("normalized"), encoder.get("normalized")),
        ):
            if theirs != ours:
                raise ConfigError(
                    f"EXTRA_DATA: {folder} was embedded with {what} {theirs}, this run with {ours}: "
                    f"its vectors live in another space"
                )
    rvq_meta_path = tmeta["config"].get("rvq_meta", "out/rvq_meta.json")
    rvq, rvq_meta = load_rvq(tmeta.get("rvq_path") or "out/rvq.npz", rvq_meta_path)
    if emb.shape[1] != rvq.D:
        raise ConfigError(f"EXTRA_DATA: {folder} has {emb.shape[1]}-d vectors, the RVQ quantizes {rvq.D}-d ones")
    beam = int(rvq_meta.get("config", {}).get("beam", 1) or 1)
    sents = list(read_jsonl(d / "sentences.jsonl", required=("doc", "pos", "text")))
    if len(sents) != len(emb):
        raise StaleInputError(
            f"EXTRA_DATA: {d / 'sentences.jsonl'} has {len(sents)} sentences, {d / 'embeddings.npy'} "
            f"{len(emb)} rows: rerun step 02 there"
        )
    bad_docs = {s["doc"] for s in sents if s["text"] in own}
    codes = (
        np.concatenate([rvq.encode(np.asarray(emb[i : i + 65536]), beam=beam) for i in range(0, len(emb), 65536)])
        if len(emb)
        else np.zeros((0, rvq.K), np.int64)
    )
    c = tmeta["config"]["context_sents"]
    rows, doc, start = [], None, 0
    for i, s in enumerate(sents):
        if s["doc"] != doc:
            doc, start = s["doc"], i
        if s["doc"] in bad_docs:
            continue
        lo = max(start, i - c) if c else i
        rows.append(
            {"doc": s["doc"], "pos": i - start, "sid": i, "context": codes[lo:i].tolist(), "target": codes[i].tolist()}
        )
    if bad_docs:
        log.info("05: %d documents of %s share sentences with this run's: left out", len(bad_docs), folder)
    return rows, emb


def _own_texts(tmeta: dict) -> set[str]:
    """The text of every sentence of this run's sentence file."""

    return {r["text"] for r in read_jsonl(tmeta["config"].get("sent_path", "data/sentences.jsonl"), required=("text",))}


# ---------------------------------------------------------------------- training


def with_reconstructions(emb, codes, books, swap):
    """(B, L, E) inputs where the real positions that `swap` (B, L) marks read the unit RVQ
    reconstruction of their codes (B, L, K) instead of their embedding (`books` (K, V, E)):
    the vector generation feeds back for a sentence the planner planned but nobody wrote yet."""
    import torch

    V = books.shape[1]
    swap = swap.to(codes.device) & (codes < V).all(-1)  # BOS/PAD rows have neither
    if not bool(swap.any()):
        return emb
    safe = codes.clamp(max=V - 1)
    books = books.to(emb.device)
    rec = sum(books[k][safe[:, :, k]] for k in range(codes.shape[-1]))  # (B, L, E)
    rec = rec / rec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.where(swap[..., None], rec.to(emb.dtype), emb)


def _codebooks(cfg: PlannerTrainConfig, tmeta: dict, table):
    """The RVQ codebooks (K, V, D) the model reads (CODEBOOK_FEATURES) and the ones reconstruction
    inputs are built from (RECON_INPUT, as a tensor); either may be None."""
    import torch

    if not (cfg.codebook_features or (cfg.recon_input > 0 and table is not None)):
        return None, None

    K, V = tmeta["K"], tmeta["V"]
    rvq = RVQ.load(cfg.rvq_path)
    check_fits_rvq("the training sets", K, V, tmeta.get("rvq_sha256"), rvq, cfg.rvq_path, sha256_path(cfg.rvq_path),
                   "rerun step 04")  # fmt: skip
    recon = torch.as_tensor(rvq.codebooks, dtype=torch.float32) if cfg.recon_input > 0 and table is not None else None
    return (rvq.codebooks if cfg.codebook_features else None), recon


def _build_planner(cfg: PlannerTrainConfig, tmeta: dict, max_len: int, books, table):

    mcfg = PlannerModelConfig(
        K=tmeta["K"],
        V=tmeta["V"],
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_layers=cfg.n_layers,
        dropout=cfg.drop,
        max_len=max_len,
        head_mode=cfg.head_mode,
        codebook_dim=books.shape[-1] if books is not None else 0,
        copy_gate=cfg.copy_gate,
        pointer=cfg.pointer,
        emb_dim=table.dim if table is not None else 0,
    )
    model = Planner(mcfg)
    if books is not None:
        model.set_codebooks(books)
    return model, mcfg


def train_planner(cfg: PlannerTrainConfig) -> dict | None:
    """Run step 05: train on OUT_LM, validate on OUT_LM_VAL, write OUT_DIR.

    Under `torchrun --nproc-per-node N` (DDP, gloo on CPU, NCCL on GPUs) every rank draws the same
    global batch of BS rows and trains on its shard, the loss weighted by the global token count,
    so N processes follow one's trajectory (with DROP=0, as dropout masks differ). Rank 0
    validates, logs and writes the checkpoint atomically; other ranks return None."""
    import torch
    import torch.nn.functional as F

    tmeta = check_trainsets(cfg.train_meta, [cfg.out_lm, cfg.out_lm_val], cfg.k, cfg.v)
    V = tmeta["V"]
    train_rows, val_rows = load_rows(cfg.out_lm), load_rows(cfg.out_lm_val)
    if not train_rows:
        raise NextSpeedError(f"{cfg.out_lm} is empty: rerun step 04 with more data or a smaller VAL_FRAC")
    seed_everything(cfg.seed, cfg.deterministic)
    dd, device = dist_init(pick_device(cfg.device))
    data = planner_data(cfg, tmeta, train_rows, val_rows)
    (x_tr, y_tr, ids_tr), val, table = data["train"], data["val"], data["table"]
    max_len = max(x_tr.shape[1], val[0].shape[1] if val else 0, tmeta["config"]["context_sents"] + 1)
    books, recon = _codebooks(cfg, tmeta, table)
    core, mcfg = _build_planner(cfg, tmeta, max_len, books, table)
    core = core.to(device)  # the module itself (validation, saving); `model` is what trains
    model = wrap_ddp(core, dd, device)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    groups = decay_groups(model.parameters(), lambda p: p.dim() < 2 or id(p) in tables, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    amp = autocast(resolve_amp(cfg.amp, device), device)
    gen = torch.Generator().manual_seed(cfg.seed)
    swap_gen = torch.Generator().manual_seed(cfg.seed + 1)  # its own stream: the batches stay RECON_INPUT=0's
    n, seen, t0 = len(x_tr), [0], time.perf_counter()

    def train_step(step: int) -> float:
        model.train()
        idx = torch.randint(0, n, (min(cfg.bs, n),), generator=gen)  # the global batch, the same on every rank
        # which positions read reconstructions: drawn for the global batch, so N processes train as one
        swap = (
            torch.rand((len(idx), x_tr.shape[1]), generator=swap_gen) < cfg.recon_input if recon is not None else None
        )
        idx = shard(idx, dd)
        xb, yb = x_tr[idx].to(device), y_tr[idx].to(device)
        eb = table.lookup(ids_tr[idx]).to(device) if table is not None else None  # (B, L, E)
        if recon is not None:
            eb = with_reconstructions(eb, xb, recon, shard(swap, dd))
        with amp:
            logits = model(xb, yb, eb)  # (B, T, K, V)
            total = F.cross_entropy(logits.float().reshape(-1, V), yb.reshape(-1), ignore_index=-100, reduction="sum")
            loss, loss_mean = global_mean(total, (yb != -100).sum(), dd)
        loss.backward()
        seen[0] += len(idx) * dd.world
        return loss_mean.item()

    def evaluate(step: int) -> dict:
        rec = {"seq_per_s": seen[0] / (time.perf_counter() - t0)}
        if val is not None:
            m = evaluate_model(core, *val[:3], device=device, ids=val[3], table=table)
            rec.update(val_loss=m["loss"], val_acc=m["acc"], val_exact=m["exact"])
        return rec

    res = fit(
        opt=opt,
        params=list(model.parameters()),
        total=cfg.steps,
        train_step=train_step,
        evaluate=evaluate,
        snapshot=lambda: {k: v.detach().to("cpu").clone() for k, v in core.state_dict().items()},
        lr_at=lambda step, total: cosine_lr(step, total, min(cfg.warmup, cfg.steps // 5), cfg.lr),
        dd=dd,
        desc="05 planner",
        eval_every=cfg.log_every,
        grad_clip=cfg.grad_clip,
    )
    if not dd.main:  # rank 0 alone writes the checkpoint
        dist_close(dd)
        return None
    info = _save_planner(cfg, tmeta, data, core, mcfg, res, seen[0], dd)
    dist_close(dd)
    return info


def _save_planner(cfg: PlannerTrainConfig, tmeta: dict, data: dict, model, mcfg, res, seen: int, dd) -> dict:
    """Write OUT_DIR atomically: the best weights, config.json (how it was trained), the curve and
    the checkpoint's metadata."""
    import torch

    assert res.best_state is not None
    out = Path(cfg.out_dir)
    info = {
        "format": FORMAT,
        "kind": "planner",
        "model": mcfg.to_dict(),
        "train": to_dict(cfg),
        "K": tmeta["K"],
        "V": tmeta["V"],
        "context_sents": tmeta["config"]["context_sents"],
        "planner_input": cfg.planner_input,
        "encoder": (data["encoder"] or {}).get("model"),
        "train_rows": len(data["train"][0]),
        "extra_rows": data["extra_rows"],
        "inputs": {p: {"sha256": sha256_path(p)} for p in (cfg.out_lm, cfg.out_lm_val)},
        "rvq_sha256": tmeta.get("rvq_sha256"),
        "rvq_path": tmeta.get("rvq_path"),
        "best": res.best,
        "history": res.history,
        "seconds": round(res.seconds, 1),
        "train_seq_per_s": round(seen / res.seconds, 1),
        "num_params": model.num_params(),
        "world_size": dd.world,
        "versions": versions(),
    }
    with atomic_dir(out) as tmp:
        torch.save(res.best_state, tmp / "sentence_lm.pt")
        plot_curve(res.history, tmp / "curve.png", "planner")
        write_json(tmp / "config.json", info)
        inputs = {
            "train": cfg.out_lm,
            "val": cfg.out_lm_val,
            "rvq": tmeta.get("rvq_path"),
            **{f"extra_{i}": str(Path(f) / "embeddings.npy") for i, f in enumerate(extra_folders(cfg))},
        }
        write_checkpoint_meta(
            tmp,
            "planner",
            to_dict(cfg),
            {r: p for r, p in inputs.items() if p and Path(p).is_file()},
            counts={"steps": cfg.steps, "params": model.num_params()},
            best=res.best,
            history=res.history,
        )
    log.info("05: best val loss %.3f at step %d; %.0f seq/s -> %s", res.best["val_loss"], res.best["step"],
             seen / res.seconds, out)  # fmt: skip
    return info
