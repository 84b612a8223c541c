"""Small synthetic data sets and settings the model and training tests share."""

import json
from pathlib import Path

import numpy as np
from conftest import TOPICS

from next_speed.core.artifacts import make_meta, write_json, write_jsonl

SENTS = [s for v in TOPICS.values() for s in v]


def write_decoder_sets(root: Path, K=2, V=4, n_docs=12):
    names = sorted(TOPICS)
    rows = {"train": [], "val": []}
    for d in range(n_docs):
        topic = names[d % 4]
        sents = TOPICS[topic]
        for i, s in enumerate(sents):
            codes = [d % 4, i % V][:K] + [0] * max(0, K - 2)
            rows["val" if d < 2 else "train"].append(
                {"doc": d, "pos": i, "context": " ".join(sents[max(0, i - 2) : i]), "codes": codes, "target": s}
            )
    paths = {n: root / f"data/decoder_{n}.jsonl" for n in rows}
    for n, p in paths.items():
        write_jsonl(p, rows[n])
    write_json(
        root / "data/train_meta.json",
        make_meta(
            "trainsets",
            {"context_sents": 2},
            outputs={"dec_train": paths["train"], "dec_val": paths["val"]},
            K=K,
            V=V,
            rvq_path="out/rvq.npz",
        ),
    )
    return rows


def env(model, **kw):
    e = {
        "MODEL": model,
        "MAX_STEPS": "6",
        "EVAL_EVERY": "3",
        "TRAIN_BS": "4",
        "LR": "1e-3",
        "WARMUP": "1",
        "DEVICE": "cpu",
        "TRAIN_LAYERS": "all",
        "VAL_ROWS": "8",
    }
    e.update({k: str(v) for k, v in kw.items()})
    return e


def write_rvq(root: Path, K=2, V=4, D=16, seed=0):
    """A small random RVQ at out/rvq.npz, recorded in the training sets' metadata."""
    import numpy as np

    from next_speed.core.artifacts import sha256_path
    from next_speed.quant.rvq import RVQ

    rvq = RVQ(codebooks=np.random.default_rng(seed).normal(size=(K, V, D)).astype("float32"))
    rvq.save(root / "out/rvq.npz")
    meta_path = root / "data/train_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["rvq_path"], meta["rvq_sha256"] = "out/rvq.npz", sha256_path(root / "out/rvq.npz")
    write_json(meta_path, meta)
    return rvq


def write_code_function_sets(root: Path, n_train=96, n_val=24, seed=0):
    """Synthetic rows where the target is a function of the codes alone: code 0 picks a topic, code 1
    one of its sentences, and the context is the same filler for every row."""
    import random as _r

    names = sorted(TOPICS)
    rng = _r.Random(seed)
    rows = {"train": [], "val": []}
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            c0, c1 = rng.randrange(4), rng.randrange(4)
            rows[split].append(
                {
                    "doc": i if split == "train" else 10_000 + i,
                    "pos": 1,
                    "context": "Here is a sentence.",
                    "codes": [c0, c1],
                    "target": TOPICS[names[c0]][c1],
                }
            )
    paths = {n: root / f"data/decoder_{n}.jsonl" for n in rows}
    for n, p in paths.items():
        write_jsonl(p, rows[n])
    write_json(
        root / "data/train_meta.json",
        make_meta(
            "trainsets",
            {"context_sents": 1},
            outputs={"dec_train": paths["train"], "dec_val": paths["val"]},
            K=2,
            V=4,
            rvq_path="out/rvq.npz",
        ),
    )
    write_rvq(root)
    return rows


def synthetic_docs(n_docs=60, doc_len=8, V=5, seed=0):
    """next = ((a + b) % V, a): level 0 depends on both previous levels, so no per-level table predicts it."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        t = [int(rng.integers(V)), int(rng.integers(V))]
        seq = [t]
        for _ in range(doc_len - 1):
            a, b = seq[-1]
            seq.append([(a + b) % V, a])
        docs.append(seq)
    return docs


def hidden_docs(n_docs=80, doc_len=8, V=5, D=8, seed=0):
    """A sequence only the embeddings can predict. Each sentence has a hidden h in [0, V) that its
    embedding shows (one-hot + noise) and its codes do not; the next sentence's level-0 code is
    (h_t + h_t-1) % V, level 1 is noise. Copy, bigram and retrieval (the follower of the nearest
    sentence by embedding: it sees h_t, not h_t-1) sit near chance."""
    rng = np.random.default_rng(seed)
    docs, embs = [], []
    for _ in range(n_docs):
        h = rng.integers(V, size=doc_len)
        seq = [[int(rng.integers(V)), int(rng.integers(V))]]
        for t in range(1, doc_len):
            prev2 = h[t - 2] if t >= 2 else 0
            seq.append([int((h[t - 1] + prev2) % V), int(rng.integers(V))])
        e = np.eye(D)[h] + 0.1 * rng.normal(size=(doc_len, D))
        docs.append(seq)
        embs.append(e / np.linalg.norm(e, axis=1, keepdims=True))
    return docs, np.concatenate(embs).astype("float32")


def write_sentences(folder: Path, docs, emb, model="tiny-encoder", tag="s"):
    """A step 01-02 output folder: sentences.jsonl, embeddings.npy, emb_meta.json."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(
        folder / "sentences.jsonl",
        [
            {"doc": d, "pos": i, "text": f"{tag} doc {d} sentence {i}"}
            for d, seq in enumerate(docs)
            for i in range(len(seq))
        ],
    )
    np.save(folder / "embeddings.npy", emb)
    write_json(
        folder / "emb_meta.json",
        make_meta(
            "embeddings",
            {},
            outputs={"embeddings": folder / "embeddings.npy"},
            counts={"rows": len(emb)},
            model=model,
            dim=int(emb.shape[1]),
        ),
    )


def write_trainsets(root: Path, docs, K=2, V=5, context=3, val_docs=10, emb=None, D=8):
    """Planner rows as step 04 writes them, with the sentence file, embeddings (random unless
    given) and RVQ codebooks (random) they refer to."""
    from next_speed.quant.rvq import RVQ

    n = sum(len(seq) for seq in docs)
    emb = np.random.default_rng(1).normal(size=(n, D)).astype("float32") if emb is None else emb
    write_sentences(root / "data", docs, emb)
    RVQ(codebooks=np.random.default_rng(2).normal(size=(K, V, emb.shape[1])).astype("float32")).save(
        root / "out/rvq.npz"
    )
    write_json(
        root / "out/rvq_meta.json", make_meta("rvq", {"beam": 1}, outputs={"rvq": root / "out/rvq.npz"}, K=K, V=V)
    )
    rows = {"train": [], "val": []}
    sid = 0
    for d, seq in enumerate(docs):
        side = "val" if d < val_docs else "train"
        for i, tgt in enumerate(seq):
            rows[side].append({"doc": d, "pos": i, "sid": sid, "context": seq[max(0, i - context) : i], "target": tgt})
            sid += 1
    paths = {n: root / f"data/sent_lm_{n}.jsonl" for n in ("train", "val")}
    for n, p in paths.items():
        write_jsonl(p, rows[n])
    meta = make_meta(
        "trainsets",
        {"context_sents": context, "sent_path": "data/sentences.jsonl", "rvq_meta": "out/rvq_meta.json"},
        outputs={"lm_train": paths["train"], "lm_val": paths["val"]},
        K=K,
        V=V,
        rvq_path="out/rvq.npz",
        emb_path="data/embeddings.npy",
    )
    write_json(root / "data/train_meta.json", meta)
    return paths


def tiny_env(**kw):
    env = {
        "D_MODEL": "32",
        "N_HEADS": "2",
        "N_LAYERS": "2",
        "DROP": "0",
        "STEPS": "300",
        "LOG_EVERY": "100",
        "CODEBOOK_FEATURES": "0",
        "BS": "32",
        "LR": "3e-3",
        "WARMUP": "10",
        "DEVICE": "cpu",
        "PLANNER_INPUT": "codes",
    }
    env.update({k: str(v) for k, v in kw.items()})
    return env
