"""RVQ fits side by side on held-out vectors: this project's fit (RVQ_FIT=spherical,
the default, and kmeans, the one before), faiss's ResidualQuantizer (beam 1 and 5) and faiss's
LocalSearchQuantizer, at the same K and V.

  uv run python bench/bench_rvq.py [--emb data/embeddings.npy] [--name wiki] [--k 6 --v 256] [--holdout 3000] [--no-lsq]

A seeded `--holdout` of the vectors is kept out of every fit; each method is scored on it:
relative squared error, cosine, per-level perplexity of code use (and its minimum), fit time.
Writes bench/results/bench_rvq_<name>.json with a flat `summary`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def perplexities(codes: np.ndarray, V: int) -> list[float]:
    out = []
    for k in range(codes.shape[1]):
        c = np.bincount(codes[:, k], minlength=V)
        p = c[c > 0] / len(codes)
        out.append(round(float(np.exp(-(p * np.log(p)).sum())), 1))
    return out


def score(x: np.ndarray, rec: np.ndarray, codes: np.ndarray, V: int, seconds: float) -> dict:
    cos = (x * rec).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(rec, axis=1) + 1e-12)
    ppl = perplexities(codes, V)
    return {
        "rel_error": round(float(((x - rec) ** 2).sum() / (x**2).sum()), 4),
        "cosine": round(float(cos.mean()), 4),
        "perplexity": ppl,
        "min_perplexity": min(ppl),
        "fit_seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--emb", default="data/embeddings.npy")
    ap.add_argument("--name", default="wiki")
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--v", type=int, default=256)
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--holdout", type=int, default=3000)
    ap.add_argument("--no-lsq", action="store_true", help="skip faiss's LocalSearchQuantizer (the slowest)")
    a = ap.parse_args()

    import faiss

    from next_speed.quant.rvq import RVQ

    x = np.load(a.emb).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(x))
    held, train = x[perm[: a.holdout]], x[perm[a.holdout :]]
    K, V = a.k, a.v
    res: dict = {}
    for method in ("spherical", "kmeans"):
        t = time.perf_counter()
        r = RVQ.fit(train, K=K, V=V, niter=a.niter, method=method)
        t = time.perf_counter() - t
        c = r.encode(held)
        res[f"next_speed_{method}"] = score(held, r.decode(c), c, V, t)
        print(f"{'next-speed ' + method:32s} {res[f'next_speed_{method}']}", flush=True)
    nbits = int(np.log2(V))
    if 2**nbits == V and nbits <= 8:
        for beam in (1, 5):
            t = time.perf_counter()
            rq = faiss.ResidualQuantizer(x.shape[1], K, nbits)
            rq.max_beam_size = beam
            rq.train(train)
            t = time.perf_counter() - t
            codes = faiss.unpack_bitstrings(K, nbits, rq.compute_codes(held)) if nbits < 8 else rq.compute_codes(held)
            res[f"faiss_rq_beam{beam}"] = score(
                held, rq.decode(rq.compute_codes(held)), np.asarray(codes, dtype=np.int64), V, t
            )
            print(f"{'faiss ResidualQuantizer beam ' + str(beam):32s} {res[f'faiss_rq_beam{beam}']}", flush=True)
        if not a.no_lsq:
            t = time.perf_counter()
            lsq = faiss.LocalSearchQuantizer(x.shape[1], K, nbits)
            lsq.train(train)
            t = time.perf_counter() - t
            codes = lsq.compute_codes(held)
            res["faiss_lsq"] = score(held, lsq.decode(codes), np.asarray(codes, dtype=np.int64), V, t)
            print(f"{'faiss LocalSearchQuantizer':32s} {res['faiss_lsq']}", flush=True)
    summary = {"K": K, "V": V, "train": len(train), "held_out": len(held)}
    for name, r in res.items():
        summary[f"{name}_rel_error"] = r["rel_error"]
        summary[f"{name}_min_perplexity"] = r["min_perplexity"]
        summary[f"{name}_fit_seconds"] = r["fit_seconds"]
    out = ROOT / f"bench/results/bench_rvq_{a.name}.json"
    out.write_text(json.dumps({"emb": a.emb, "methods": res, "summary": summary}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
