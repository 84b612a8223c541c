"""Step 04: training sets for the planner and the decoder, split by document.

No document appears on both sides of the split. Planner rows hold the previous CONTEXT_SENTS code
tuples (fewer at a document start), the next tuple and its row `sid` in the sentence file and
the embeddings (a planner with PLANNER_INPUT=emb reads the context sentences' vectors); decoder rows hold the
previous sentences'
text, the target's codes and the target sentence, and the sentence's row `sid` in the sentence
file and the embeddings (so step 06 can find the training sentences' embeddings for its exemplar
bank).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from next_speed.core.artifacts import (
    NpyRows,
    StaleInputError,
    atomic_path,
    load_meta,
    make_meta,
    read_jsonl,
    sha256_path,
    write_json,
)
from next_speed.core.config import knob, seed_knob, to_dict
from next_speed.core.errors import NextSpeedError
from next_speed.quant.rvq import check_codes

log = logging.getLogger(__name__)


CODES_CHUNK = 65536  # code rows read at a time by step 04


@dataclass
class TrainSetsConfig:
    """Step 04 knobs."""

    context_sents: int = knob(8, env="CONTEXT_SENTS", min=0, help="previous sentences kept as context")
    val_frac: float = knob(0.05, env="VAL_FRAC", min=0.0, max=0.9, help="share of documents held out for validation")
    k: int | None = knob(None, env="K", min=1, help="expected RVQ levels (checked against step 03; default: take it)")
    v: int | None = knob(None, env="V", min=2, help="expected codewords per level (checked against step 03)")
    sent_path: str = knob("data/sentences.jsonl", env="SENT_PATH", help="input sentences (step 01)")
    sent_meta: str = knob("data/sentences.meta.json", env="SENT_META", help="input sentences metadata")
    codes_path: str = knob("data/codes.npy", env="CODES_PATH", help="input codes (step 03)")
    rvq_meta: str = knob("out/rvq_meta.json", env="RVQ_META", help="input RVQ metadata (step 03)")
    out_lm: str = knob("data/sent_lm_train.jsonl", env="OUT_LM", help="planner training rows")
    out_lm_val: str = knob("data/sent_lm_val.jsonl", env="OUT_LM_VAL", help="planner validation rows")
    out_dec: str = knob("data/decoder_train.jsonl", env="OUT_DEC", help="decoder training rows")
    out_dec_val: str = knob("data/decoder_val.jsonl", env="OUT_DEC_VAL", help="decoder validation rows")
    train_meta: str = knob("data/train_meta.json", env="TRAIN_META", help="metadata JSON for the four files")
    seed: int = seed_knob("split seed")


def split_docs(doc_ids: np.ndarray, val_frac: float, seed: int) -> set[int]:
    """Seeded choice of validation documents: round(val_frac * n), at least 1 when val_frac > 0 and n > 1."""
    docs = np.unique(doc_ids)
    n_val = int(round(val_frac * len(docs)))
    if val_frac > 0 and len(docs) > 1:
        n_val = max(1, min(n_val, len(docs) - 1))
    rng = np.random.default_rng(seed)
    return set(rng.permutation(docs)[:n_val].tolist())


def _checked_inputs(cfg: TrainSetsConfig) -> tuple[dict, list]:
    """Step 03's metadata, after checking the sentences and codes belong together, and the
    documents in file order (a first pass over the sentence file)."""
    load_meta(cfg.sent_meta, "sentences", cfg.sent_path)
    rvq_meta = check_codes(cfg.codes_path, cfg.rvq_meta, cfg.k, cfg.v)
    if rvq_meta.get("sentences_sha256") and rvq_meta["sentences_sha256"] != sha256_path(cfg.sent_path):
        raise StaleInputError(
            f"{cfg.codes_path} was built from another sentence file than {cfg.sent_path}: rerun steps 02-03"
        )
    n, docs = 0, []
    for r in read_jsonl(cfg.sent_path, required=("doc", "pos", "text")):
        if not docs or r["doc"] != docs[-1]:
            docs.append(r["doc"])
        n += 1
    rows = len(NpyRows(cfg.codes_path))
    if n != rows:
        raise StaleInputError(
            f"{cfg.sent_path} has {n} sentences but {cfg.codes_path} has {rows} rows: rerun steps 02-03"
        )
    if not n:
        raise NextSpeedError(f"{cfg.sent_path} has no sentences: rerun step 01")
    return rvq_meta, docs


def _write_rows(cfg: TrainSetsConfig, val_docs: set, out: dict) -> dict:
    """Stream the sentence file once, writing each sentence's planner row and decoder row to its
    side of the split; memory holds the document's last CONTEXT_SENTS sentences and one chunk of codes."""
    c = cfg.context_sents
    codes = NpyRows(cfg.codes_path)
    counts = {"train": 0, "val": 0}
    texts: deque = deque(maxlen=c or 1)
    ctx_codes: deque = deque(maxlen=c or 1)
    chunk, chunk_start, doc, start = None, 0, None, 0
    for i, r in enumerate(read_jsonl(cfg.sent_path, required=("doc", "pos", "text"))):
        if chunk is None or i >= chunk_start + len(chunk):
            chunk_start, chunk = i, codes.read(i, i + CODES_CHUNK)
        if r["doc"] != doc:
            doc, start = r["doc"], i
            texts.clear()
            ctx_codes.clear()
        side = "val" if r["doc"] in val_docs else "train"
        target = chunk[i - chunk_start].tolist()
        where = {"doc": r["doc"], "pos": i - start, "sid": i}
        lm = {**where, "context": list(ctx_codes) if c else [], "target": target}
        dec = {**where, "context": " ".join(texts) if c else "", "codes": target, "target": r["text"]}
        out["lm", side].write(json.dumps(lm, ensure_ascii=False) + "\n")
        out["dec", side].write(json.dumps(dec, ensure_ascii=False) + "\n")
        counts[side] += 1
        texts.append(r["text"])
        ctx_codes.append(target)
    if not counts["train"]:
        raise NextSpeedError(f"VAL_FRAC={cfg.val_frac} leaves no training documents: lower VAL_FRAC")
    return counts


def build_training_sets(cfg: TrainSetsConfig) -> dict:
    """Run step 04: sentences + codes -> four JSONL files + TRAIN_META.

    Streamed: a first pass over the sentence file lists the documents (for the split), a second
    writes every row as it reads it."""
    rvq_meta, docs = _checked_inputs(cfg)
    doc_ids = np.asarray(docs)
    val_docs = split_docs(doc_ids, cfg.val_frac, cfg.seed)
    paths = {
        ("lm", "train"): cfg.out_lm,
        ("lm", "val"): cfg.out_lm_val,
        ("dec", "train"): cfg.out_dec,
        ("dec", "val"): cfg.out_dec_val,
    }
    with contextlib.ExitStack() as stack:
        # entered in reverse: the stack publishes last-in first, so the files appear in the order
        # of `paths` (planner train, planner val, decoder train, decoder val)
        out = {
            key: stack.enter_context(open(stack.enter_context(atomic_path(path)), "w", encoding="utf-8"))
            for key, path in reversed(list(paths.items()))
        }
        counts = _write_rows(cfg, val_docs, out)
    n_docs = len(np.unique(doc_ids))
    rvq_cfg = rvq_meta["config"]
    meta = make_meta(
        "trainsets",
        to_dict(cfg),
        inputs={"sentences": cfg.sent_path, "codes": cfg.codes_path},
        outputs={
            "lm_train": cfg.out_lm,
            "lm_val": cfg.out_lm_val,
            "dec_train": cfg.out_dec,
            "dec_val": cfg.out_dec_val,
        },
        counts={"docs": n_docs, "val_docs": len(val_docs), "train_rows": counts["train"], "val_rows": counts["val"]},
        K=rvq_meta["K"],
        V=rvq_meta["V"],
        rvq_path=rvq_cfg["rvq_path"],
        rvq_sha256=rvq_meta["outputs"].get(rvq_cfg["rvq_path"], {}).get("sha256"),
        emb_path=rvq_cfg.get("emb_path"),
        emb_sha256=rvq_meta.get("inputs", {}).get(rvq_cfg.get("emb_path"), {}).get("sha256"),
    )
    write_json(cfg.train_meta, meta)
    log.info("04: %d train / %d val rows (%d of %d documents held out)", counts["train"], counts["val"],
             len(val_docs), n_docs)  # fmt: skip
    return meta
