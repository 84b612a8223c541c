"""Benchmark steps 01-03 on the default corpus, each beside its plain baseline, in one run.

  uv run python bench/bench_data.py [--embed-n 4000] [--k 6 --v 256 --niter 20]

- step 01: sentences/s of `make_sentences` (pysbd in parallel over documents) vs one process;
- step 02: `embed_shard` (length-sorted batches into a memmap) vs a plain
  `SentenceTransformer.encode` of the same sentences, same batch size;
- step 03: faiss residual k-means fit time and error vs a plain numpy residual k-means
  (Lloyd iterations, same K, V, NITER, same init).
Prints a table and writes bench/results/bench_data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def numpy_rvq(x: np.ndarray, K: int, V: int, niter: int, seed: int = 0) -> np.ndarray:
    """Residual k-means in plain numpy: Lloyd's algorithm per level on the residual."""
    rng = np.random.default_rng(seed)
    resid = x.copy()
    books = np.zeros((K, V, x.shape[1]), dtype=np.float32)
    for k in range(K):
        c = resid[rng.choice(len(resid), V, replace=False)].copy()
        for _ in range(niter):
            d = (resid**2).sum(1)[:, None] - 2 * resid @ c.T + (c**2).sum(1)[None]
            a = d.argmin(1)
            for v in range(V):
                m = a == v
                if m.any():
                    c[v] = resid[m].mean(0)
        d = (resid**2).sum(1)[:, None] - 2 * resid @ c.T + (c**2).sum(1)[None]
        a = d.argmin(1)
        books[k] = c
        resid -= c[a]
    return books


def rel_error(x, books):
    from next_speed.quant.rvq import RVQ

    r = RVQ(codebooks=books)
    return float(((x - r.decode(r.encode(x))) ** 2).sum() / (x**2).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--embed-n", type=int, default=4000, help="sentences for the step-02 comparison")
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--v", type=int, default=256)
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--steps", default="01,02,03", help="which comparisons to run")
    args = ap.parse_args()
    from next_speed.core.config import resolve
    from next_speed.data.embed import embed_shard, load_encoder
    from next_speed.data.sentences import SentencesConfig, make_sentences
    from next_speed.quant.rvq import RVQ

    res: dict = {"cpus": os.cpu_count()}
    steps = set(args.steps.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        # ---- step 01
        for procs in (0, 1) if "01" in steps else (0,):
            t0 = time.perf_counter()
            meta = make_sentences(
                resolve(
                    SentencesConfig,
                    environ={
                        "SENT_PATH": f"{tmp}/s{procs}.jsonl",
                        "SENT_META": f"{tmp}/s{procs}.json",
                        "NUM_PROC": str(procs),
                    },
                )
            )
            dt = time.perf_counter() - t0
            res[f"step01_procs{procs or os.cpu_count()}"] = {
                "sentences": meta["counts"]["sentences"],
                "seconds": round(dt, 2),
                "sentences_per_s": round(meta["counts"]["sentences"] / dt, 1),
            }
        texts = [json.loads(line)["text"] for line in Path(f"{tmp}/s0.jsonl").read_text().splitlines()]
    # ---- step 02 vs plain encode, same sentences (a seeded sample), same model and batch size
    rng = np.random.default_rng(0)
    sample = [texts[i] for i in rng.choice(len(texts), min(args.embed_n, len(texts)), replace=False)]
    model = load_encoder("all-MiniLM-L6-v2", device="cpu", maxlen=128)
    model.encode(sample[:64], batch_size=args.bs)  # warm-up
    out = np.zeros((len(sample), 384), dtype=np.float32)
    # alternate the two (plain, ours, plain, ours) and keep each one's best, so drift cannot favour either
    t_ours = t_plain = float("inf")
    for _ in range(2 if "02" in steps else 0):
        t0 = time.perf_counter()
        ref = model.encode(
            sample, batch_size=args.bs, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        t_plain = min(t_plain, time.perf_counter() - t0)
        t0 = time.perf_counter()
        embed_shard(model, sample, out, bs=args.bs, show_progress=False)
        t_ours = min(t_ours, time.perf_counter() - t0)
    if "02" not in steps:
        embed_shard(model, sample, out, bs=args.bs, show_progress=False)
        ref = out
    res["step02"] = {
        "sentences": len(sample),
        "ours_s": round(t_ours, 2),
        "plain_encode_s": round(t_plain, 2),
        "ours_sentences_per_s": round(len(sample) / t_ours, 1),
        "plain_sentences_per_s": round(len(sample) / t_plain, 1),
        "max_abs_diff": float(np.abs(out - ref).max()),
    }
    # ---- step 03: faiss vs numpy on the embeddings of the sample (both on the same vectors)
    x = out
    if "03" not in steps:
        print(json.dumps(res, indent=2))
        return
    t0 = time.perf_counter()
    r = RVQ.fit(x, K=args.k, V=args.v, niter=args.niter)
    t_faiss = time.perf_counter() - t0
    t0 = time.perf_counter()
    books = numpy_rvq(x, args.k, args.v, args.niter)
    t_np = time.perf_counter() - t0
    t0 = time.perf_counter()
    greedy = rel_error(x, r.codebooks)
    beam = float(((x - r.decode(r.encode(x, beam=4))) ** 2).sum() / (x**2).sum())
    t_beam = time.perf_counter() - t0
    res["step03"] = {
        "rows": len(x),
        "K": args.k,
        "V": args.v,
        "niter": args.niter,
        "faiss_fit_s": round(t_faiss, 2),
        "numpy_fit_s": round(t_np, 2),
        "faiss_rel_error": round(greedy, 4),
        "numpy_rel_error": round(rel_error(x, books), 4),
        "faiss_beam4_rel_error": round(beam, 4),
        "greedy_plus_beam_encode_s": round(t_beam, 2),
    }
    print(json.dumps(res, indent=2))
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/bench_data.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
