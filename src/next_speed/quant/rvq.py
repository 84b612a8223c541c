"""Step 03: residual vector quantization (RVQ) of sentence embeddings.

Level k's codebook is a k-means (faiss) fit to the residuals left by levels 0..k-1, so a sentence
becomes a tuple of K codes, coarse to fine (Juang & Gray 1982; as in SoundStream's RVQ).
`encode` is greedy nearest-codeword per level, or a beam search over partial tuples that
minimizes the final residual (faiss' ResidualQuantizer idea); `decode` sums the chosen codewords.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from next_speed.core.artifacts import NpyRows, atomic_path, load_meta, make_meta, sha256_path, write_json
from next_speed.core.config import knob, seed_knob, to_dict
from next_speed.core.console import progress
from next_speed.core.errors import ConfigError, NextSpeedError, StaleInputError
from next_speed.core.runtime import ray_session
from next_speed.data.embed import open_embeddings

log = logging.getLogger(__name__)


class RVQ:
    """K codebooks of V codewords in D dimensions: `encode(x) -> (N, K)` codes, `decode(codes) -> (N, D)`."""

    def __init__(self, *, codebooks: np.ndarray):
        if codebooks.ndim != 3:
            raise ValueError(f"codebooks must be (K, V, D), got shape {codebooks.shape}")
        self.codebooks = np.ascontiguousarray(codebooks, dtype=np.float32)  # (K, V, D)
        self._indexes = None

    K = property(lambda self: self.codebooks.shape[0])
    V = property(lambda self: self.codebooks.shape[1])
    D = property(lambda self: self.codebooks.shape[2])

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        *,
        K: int,
        V: int,
        niter: int = 20,
        seed: int = 0,
        verbose: bool = False,
        method: str = "spherical",
        refine: int = 2,
    ) -> RVQ:
        """Fit level by level on the running residual.

        `kmeans`: faiss k-means on the residuals themselves. Deeper residuals are nearly isotropic
        noise of similar norms, and L2 k-means then settles with most of its codewords on a few
        outlying points each and one codeword near zero that most sentences pick (a collapsed level).
        `spherical` (default): cluster the residuals' *directions* (faiss spherical k-means on the
        unit residuals), set each codeword to the mean residual of its cluster (the L2-optimal
        vector for that assignment), then `refine` ordinary Lloyd steps from there. Every codeword
        starts with a share of the directions, so no level collapses, and the error is lower too
        (docs/results.md, "RVQ")."""
        if method not in ("spherical", "kmeans"):
            raise ConfigError(f"RVQ_FIT={method!r}: choose spherical or kmeans")
        x = np.ascontiguousarray(x, dtype=np.float32)
        n, d = x.shape
        if n < V:
            raise ConfigError(f"V={V} is larger than the number of sentences ({n}): lower V or use more data")
        resid = x.copy()
        books = np.zeros((K, V, d), dtype=np.float32)
        for k in range(K):
            books[k] = _fit_level(resid, V, niter, seed + k, verbose, method, refine)
            resid -= books[k][_nearest(books[k], resid)]
        return cls(codebooks=books)

    # ------------------------------------------------------------------ encode / decode
    def _level_index(self, k: int):
        import faiss

        if self._indexes is None:
            self._indexes = []
            for book in self.codebooks:
                ix = faiss.IndexFlatL2(self.D)
                ix.add(book)
                self._indexes.append(ix)
        return self._indexes[k]

    def encode(self, x: np.ndarray, *, beam: int = 1, batch: int = 8192) -> np.ndarray:
        """(N, D) vectors -> (N, K) int64 codes. `beam` > 1 searches that many partial tuples."""
        x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
        if x.shape[1] != self.D:
            raise NextSpeedError(f"vectors have dimension {x.shape[1]}, the RVQ codebooks {self.D}: rerun step 03")
        if beam <= 1:
            resid = x.copy()
            codes = np.empty((len(x), self.K), dtype=np.int64)
            for k in range(self.K):
                _, idx = self._level_index(k).search(resid, 1)
                codes[:, k] = idx[:, 0]
                resid -= self.codebooks[k][idx[:, 0]]
            return codes
        return np.concatenate([self._beam_encode(x[i : i + batch], beam) for i in range(0, len(x), batch)])

    def _beam_encode(self, x: np.ndarray, beam: int) -> np.ndarray:
        n = len(x)
        norms = (self.codebooks**2).sum(-1)  # (K, V)
        resid = x[:, None, :]  # (N, B, D), B=1 at level 0
        err = (x**2).sum(-1)[:, None]  # (N, B)
        codes = np.zeros((n, 1, 0), dtype=np.int64)  # (N, B, k)
        for k in range(self.K):
            book = self.codebooks[k]  # (V, D)
            # ||r - c||^2 = ||r||^2 - 2 r.c + ||c||^2, for every beam entry and codeword: (N, B, V)
            d2 = err[:, :, None] - 2.0 * resid @ book.T + norms[k][None, None, :]
            b = d2.shape[1]
            flat = d2.reshape(n, -1)
            keep = min(beam, flat.shape[1])
            top = np.argpartition(flat, keep - 1, axis=1)[:, :keep]  # (N, keep)
            top = np.take_along_axis(top, np.argsort(np.take_along_axis(flat, top, 1), axis=1), 1)
            src, cw = top // self.V, top % self.V
            codes = np.concatenate([np.take_along_axis(codes, src[:, :, None], 1), cw[:, :, None]], axis=2)
            resid = np.take_along_axis(resid, src[:, :, None], 1) - book[cw]
            err = np.take_along_axis(flat, top, 1)
            del b
        return codes[:, 0, :]  # best final tuple

    def decode(self, codes: np.ndarray, levels: int | None = None) -> np.ndarray:
        """(N, K) codes -> (N, D): the sum of the chosen codewords of the first `levels` levels."""
        codes = np.atleast_2d(np.asarray(codes))
        if codes.shape[1] != self.K:
            raise NextSpeedError(f"code tuples have {codes.shape[1]} levels, the RVQ has K={self.K}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.V):
            raise NextSpeedError(f"codes out of range [0, {self.V}) for V={self.V}")
        out = np.zeros((len(codes), self.D), dtype=np.float32)
        for k in range(self.K if levels is None else levels):
            out += self.codebooks[k][codes[:, k]]
        return out

    # ------------------------------------------------------------------ io
    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, codebooks=self.codebooks, K=self.K, V=self.V, D=self.D)

    @classmethod
    def load(cls, path: str | Path) -> RVQ:
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(codebooks=z["codebooks"])
        except FileNotFoundError:
            raise StaleInputError(f"{path} not found: run step 03 (03_fit_rvq.py)") from None
        except (ValueError, KeyError, OSError) as e:
            raise StaleInputError(f"{path} is not a valid RVQ file ({e}): rerun step 03") from None


ENCODE_CHUNK = 65536  # vectors encoded per chunk by step 03 (memory: one chunk)


def _nearest(book: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Index of each point's nearest codeword (L2)."""
    import faiss

    ix = faiss.IndexFlatL2(book.shape[1])
    ix.add(book)
    return ix.search(pts, 1)[1][:, 0]


def _cluster_means(a: np.ndarray, resid: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """Each cluster's mean residual; an empty cluster keeps its codeword."""
    import torch  # index_add_: a segmented sum, far faster than np.add.at

    V, d = prev.shape
    sums = torch.zeros(V, d).index_add_(0, torch.from_numpy(a.astype(np.int64)), torch.from_numpy(resid)).numpy()
    cnt = np.bincount(a, minlength=V)[:, None]
    return np.where(cnt > 0, sums / np.maximum(cnt, 1), prev).astype(np.float32)


def _fit_level(resid: np.ndarray, V: int, niter: int, seed: int, verbose: bool, method: str, refine: int) -> np.ndarray:
    """One level's codebook (V, D) for the residuals (see `RVQ.fit`)."""
    import faiss

    d = resid.shape[1]
    opts = dict(niter=niter, seed=seed, verbose=verbose, max_points_per_centroid=1 << 30, min_points_per_centroid=1)
    if method == "kmeans":
        km = faiss.Kmeans(d, V, **opts)
        km.train(resid)
        return km.centroids
    unit = resid / (np.linalg.norm(resid, axis=1, keepdims=True) + 1e-12)
    km = faiss.Kmeans(d, V, spherical=True, **opts)
    km.train(unit)
    book = _cluster_means(km.index.search(unit, 1)[1][:, 0], resid, km.centroids)
    for _ in range(refine):
        book = _cluster_means(_nearest(book, resid), resid, book)
    return book


def check_fits_rvq(what: str, k: int, v: int, recorded_sha: str | None, rvq: RVQ, rvq_path: str, rvq_hash: str,
                   rerun: str) -> None:  # fmt: skip
    """The one compatibility check of a model (or data) against the RVQ at hand: the same K and V,
    and, where it recorded one, the same RVQ file (hash). `what` names it, `rerun` says what to do."""
    if (k, v) != (rvq.K, rvq.V):
        raise StaleInputError(f"{what}: K={k} V={v}, but {rvq_path} has K={rvq.K} V={rvq.V}: {rerun}")
    if recorded_sha and recorded_sha != rvq_hash:
        raise StaleInputError(f"{what}: built on codes of another {rvq_path}: {rerun}")


def levels_matched(planned, realized) -> int:
    """How many levels of two code tuples agree from level 0 on: RVQ levels refine the ones above,
    so a deep code only means something beside its prefix (the measure every rerank, agreement
    figure and API answer uses)."""
    n = 0
    for a, b in zip(planned, realized or ()):
        if a != b:
            break
        n += 1
    return n


def levels_matched_rows(hit: np.ndarray) -> np.ndarray:
    """`levels_matched` over rows: hit (N, K) bool, level-wise equality -> (N,) levels matched from level 0."""
    return np.cumprod(hit, axis=-1).sum(-1)


@dataclass
class RVQConfig:
    """Step 03 knobs."""

    k: int = knob(6, env="K", min=1, max=64, help="RVQ levels (codes per sentence)")
    v: int = knob(256, env="V", min=2, max=65536, help="codewords per level")
    niter: int = knob(20, env="NITER", min=1, help="k-means iterations per level")
    beam: int = knob(1, env="BEAM", min=1, max=64, help="beam width for encoding (1 = greedy)")
    emb_path: str = knob("data/embeddings.npy", env="OUT_EMB", help="input embeddings (step 02)")
    emb_meta: str = knob("data/emb_meta.json", env="EMB_META", help="input embeddings metadata")
    rvq_path: str = knob("out/rvq.npz", env="RVQ_PATH", help="output codebooks")
    rvq_meta: str = knob("out/rvq_meta.json", env="RVQ_META", help="output metadata JSON")
    codes_path: str = knob("data/codes.npy", env="CODES_PATH", help="output codes (N x K int)")
    seed: int = seed_knob("k-means seed")
    backend: str = knob(
        "local",
        env="BACKEND",
        choices=("local", "ray"),
        help="local: encode here; ray: the encoding pass as Ray Data map_batches over chunks (the fit stays here)",
    )
    ray_address: str | None = knob(
        None, env="RAY_ADDRESS", help="Ray cluster to join; unset starts a local Ray instance"
    )
    ray_actors: int = knob(0, env="RAY_ACTORS", min=0, help="encoding actors (0 = one per CPU of the cluster)")
    rvq_fit: str = knob(
        "spherical",
        env="RVQ_FIT",
        choices=("spherical", "kmeans"),
        help="spherical: cluster residual directions, codewords = cluster means (no level collapses); "
        "kmeans: plain k-means on the residuals (before; deep levels collapse)",
    )
    fit_sample: int = knob(
        200_000,
        env="FIT_SAMPLE",
        min=0,
        help="fit the codebooks on a seeded sample of this many vectors (0 = all); every vector is then "
        "encoded, in chunks, so memory does not grow with the corpus",
    )


class LevelStats:
    """Per-level quantization statistics accumulated over chunks of vectors (see `level_stats`)."""

    def __init__(self, rvq: RVQ):
        self.rvq = rvq
        self.err = np.zeros(rvq.K)
        self.cos = np.zeros(rvq.K)
        self.xn = 0.0
        self.n = 0
        self.counts = np.zeros((rvq.K, rvq.V), dtype=np.int64)

    def add(self, x: np.ndarray, codes: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        xn = (x**2).sum(1)
        recon = np.zeros_like(x)
        for k in range(self.rvq.K):
            recon += self.rvq.codebooks[k][codes[:, k]]
            self.err[k] += float(((x - recon) ** 2).sum(1).sum())
            self.cos[k] += float(((x * recon).sum(1) / (np.sqrt(xn) * np.linalg.norm(recon, axis=1) + 1e-12)).sum())
            self.counts[k] += np.bincount(codes[:, k], minlength=self.rvq.V)
        self.xn += float(xn.sum())
        self.n += len(x)

    def merge(self, err, cos, xn: float, n: int, counts) -> None:
        """Add another chunk's sums (as a Ray worker computed them)."""
        self.err += err
        self.cos += cos
        self.xn += float(xn)
        self.n += int(n)
        self.counts += counts

    def result(self) -> list[dict]:
        rows = []
        for k in range(self.rvq.K):
            p = self.counts[k][self.counts[k] > 0] / max(self.n, 1)
            rows.append(
                {
                    "level": k,
                    "rel_error": float(self.err[k] / self.xn),
                    "cosine": float(self.cos[k] / self.n),
                    "used": int((self.counts[k] > 0).sum()),
                    "perplexity": float(np.exp(-(p * np.log(p)).sum())),
                }
            )
        return rows


class RayChunkEncoder:
    """A Ray Data actor of step 03's encoding pass: reads its chunks of the embeddings file (which
    every node must be able to read), encodes them and returns the codes with the chunk's stats."""

    def __init__(self, codebooks: np.ndarray, emb_path: str, beam: int, chunk: int, threads: int):
        import faiss

        faiss.omp_set_num_threads(max(threads, 1))  # actors share the machine

        self.rvq, self.rows, self.beam, self.chunk = RVQ(codebooks=codebooks), NpyRows(emb_path), beam, chunk

    def __call__(self, batch: dict) -> dict:
        out: dict = {k: [] for k in ("start", "n", "codes", "err", "cos", "xn", "counts")}
        for c in batch["id"]:
            start = int(c) * self.chunk
            x = self.rows.read(start, start + self.chunk)
            codes = self.rvq.encode(x, beam=self.beam)
            acc = LevelStats(self.rvq)
            acc.add(x, codes)
            padded = np.zeros((self.chunk, self.rvq.K), dtype=np.int32)
            padded[: len(codes)] = codes
            for k, v in (
                ("start", start),
                ("n", len(codes)),
                ("codes", padded),
                ("err", acc.err),
                ("cos", acc.cos),
                ("xn", acc.xn),
                ("counts", acc.counts),
            ):
                out[k].append(v)
        return {k: np.asarray(v) for k, v in out.items()}


def encode_with_ray(cfg: RVQConfig, rvq: RVQ, n: int, codes: np.ndarray, acc: LevelStats) -> int:
    """Step 03's encoding pass on Ray Data: one task per chunk of ENCODE_CHUNK vectors over a pool
    of actors; the driver writes each chunk's codes in place and merges its stats. Returns the
    number of actors."""

    with ray_session(cfg.ray_address) as ray:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = cfg.ray_actors or cpus
        per_actor = max((cpus - 0.25) / actors, 0.1)
        chunks = -(-n // ENCODE_CHUNK)
        # from_items, not range: range's read tasks would each want a whole CPU the actors hold
        ds = ray.data.from_items(
            [{"id": i} for i in range(chunks)], override_num_blocks=min(chunks, 4 * actors)
        ).map_batches(
            RayChunkEncoder,
            fn_constructor_kwargs={
                "codebooks": rvq.codebooks,
                "emb_path": str(Path(cfg.emb_path).resolve()),
                "beam": cfg.beam,
                "chunk": ENCODE_CHUNK,
                "threads": max(int(per_actor), 1),
            },
            batch_size=1,
            batch_format="numpy",
            concurrency=actors,
            num_cpus=per_actor,
        )
        done = 0
        with progress(total=n, desc="03 encode (ray)", unit="vec") as bar:
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for i in range(len(b["start"])):
                    start, m = int(b["start"][i]), int(b["n"][i])
                    codes[start : start + m] = b["codes"][i][:m]
                    acc.merge(b["err"][i], b["cos"][i], b["xn"][i], m, b["counts"][i])
                    done += m
                    bar.update(m)
        if done != n:
            raise NextSpeedError(f"Ray encoded {done} of the {n} vectors of {cfg.emb_path}")
        return actors


def level_stats(x: np.ndarray, rvq: RVQ, codes: np.ndarray) -> list[dict]:
    """Per level k: relative squared error and cosine of the k+1-level reconstruction, codewords
    used and codebook perplexity."""
    acc = LevelStats(rvq)
    acc.add(x, codes)
    return acc.result()


def shared_tuple_share(codes: np.ndarray) -> float:
    """Share of rows whose full code tuple also belongs to another row."""
    codes = np.asarray(codes)
    bits = max(int(codes.max(initial=0)).bit_length(), 1)
    if bits * codes.shape[1] <= 63:  # one int64 key per tuple: a 1-d unique, far lighter than axis=0
        key = np.zeros(len(codes), dtype=np.int64)
        for k in range(codes.shape[1]):
            key = (key << bits) | codes[:, k].astype(np.int64)
        _, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
    else:
        _, inv, cnt = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return float((cnt[inv.ravel()] > 1).mean())


def fit_rvq(cfg: RVQConfig) -> dict:
    """Run step 03: embeddings -> RVQ_PATH codebooks, CODES_PATH codes, RVQ_META.

    The codebooks are fitted on all vectors, or on a seeded sample of FIT_SAMPLE of them; then
    every vector is encoded chunk by chunk, read from the file (not mapped), so peak memory is the
    fit sample plus the codes, whatever the corpus size."""

    rows, emb_meta = open_embeddings(cfg.emb_path, cfg.emb_meta, stream=True)
    N, D = rows.shape
    if N == 0:
        raise NextSpeedError(f"{cfg.emb_path} is empty: rerun steps 01-02")
    t0 = time.perf_counter()
    if cfg.fit_sample and cfg.fit_sample < N:
        sample = np.sort(np.random.default_rng(cfg.seed).choice(N, cfg.fit_sample, replace=False))
        x_fit = rows.take(sample)
        log.info("03: fitting on a seeded sample of %d of %d vectors (FIT_SAMPLE)", len(sample), N)
    else:
        x_fit = rows.read(0, N)
    rvq = RVQ.fit(x_fit, K=cfg.k, V=cfg.v, niter=cfg.niter, seed=cfg.seed, method=cfg.rvq_fit)
    fit_rows = len(x_fit)
    del x_fit
    t_fit = time.perf_counter() - t0
    codes = np.empty((N, cfg.k), dtype=np.int32)
    acc = LevelStats(rvq)

    extra = {}
    if cfg.backend == "ray":
        extra["ray_actors"] = encode_with_ray(cfg, rvq, N, codes, acc)
    else:
        with progress(total=N, desc="03 encode", unit="vec") as bar:
            for start, x in rows.chunks(ENCODE_CHUNK):
                c = rvq.encode(x, beam=cfg.beam)
                codes[start : start + len(x)] = c
                acc.add(x, c)
                bar.update(len(x))
    t_enc = time.perf_counter() - t0 - t_fit
    stats = acc.result()
    rvq.save(cfg.rvq_path)
    with atomic_path(cfg.codes_path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, codes)
    meta = make_meta(
        "rvq",
        to_dict(cfg),
        inputs={"embeddings": cfg.emb_path},
        outputs={"rvq": cfg.rvq_path, "codes": cfg.codes_path},
        counts={"rows": int(N), "dim": int(D), "fit_rows": int(fit_rows)},
        K=cfg.k,
        V=cfg.v,
        dim=int(D),
        encoder=emb_meta.get("model"),
        sentences_sha256=_sentences_hash(emb_meta),
        fit_seconds=round(t_fit, 2),
        encode_seconds=round(t_enc, 2),
        levels=stats,
        shared_tuple_share=shared_tuple_share(codes),
        **extra,
    )
    write_json(cfg.rvq_meta, meta)
    for r in collapsed_levels(stats, cfg.v):
        log.warning("03: level %d has collapsed: perplexity %.1f < V/10 = %g", r["level"], r["perplexity"], cfg.v / 10)
    log.info(
        "03: K=%d V=%d fit in %.1fs, final rel. error %.3f -> %s",
        cfg.k,
        cfg.v,
        t_fit,
        stats[-1]["rel_error"],
        cfg.rvq_path,
    )
    return meta


def _sentences_hash(emb_meta: dict) -> str | None:
    role = emb_meta.get("input_roles", {}).get("sentences")
    return emb_meta.get("inputs", {}).get(role, {}).get("sha256") if role else None


def load_rvq(rvq_path: str, rvq_meta: str) -> tuple[RVQ, dict]:
    """Load codebooks after checking them against their metadata."""
    meta = load_meta(rvq_meta, "rvq", rvq_path)
    rvq = RVQ.load(rvq_path)
    if (meta["K"], meta["V"]) != (rvq.K, rvq.V):
        raise StaleInputError(
            f"{rvq_path} has K={rvq.K} V={rvq.V} but {rvq_meta} says K={meta['K']} V={meta['V']}: rerun step 03"
        )
    return rvq, meta


def check_codes(codes_path: str, rvq_meta_path: str, k: int | None = None, v: int | None = None) -> dict:
    """The RVQ metadata, after checking `codes.npy` against it and against the K/V asked for (if given)."""
    meta = load_meta(rvq_meta_path, "rvq", codes_path)
    for name, want, have in (("K", k, meta["K"]), ("V", v, meta["V"])):
        if want is not None and want != have:
            raise StaleInputError(
                f"{name}={want} here, but {codes_path} was built with {name}={have}: "
                f"rerun step 03 with {name}={want}, or set {name}={have}"
            )
    return meta


def load_codes(
    codes_path: str, rvq_meta_path: str, k: int | None = None, v: int | None = None
) -> tuple[np.ndarray, dict]:
    """Load `codes.npy` checked against the RVQ metadata, and against the K/V asked for (if given)."""
    meta = check_codes(codes_path, rvq_meta_path, k, v)
    codes = np.load(codes_path, allow_pickle=False).astype(np.int64)
    return codes, meta


# ---------------------------------------------------------------------- evaluation


@dataclass
class RVQEvalConfig:
    """rvq_recon_error.py knobs."""

    emb_path: str = knob("data/embeddings.npy", env="OUT_EMB", help="embeddings (step 02)")
    emb_meta: str = knob("data/emb_meta.json", env="EMB_META", help="embeddings metadata")
    rvq_path: str = knob("out/rvq.npz", env="RVQ_PATH", help="codebooks (step 03)")
    rvq_meta: str = knob("out/rvq_meta.json", env="RVQ_META", help="codebooks metadata")
    beam: int = knob(1, env="BEAM", min=1, max=64, help="beam width for encoding (1 = greedy)")
    out_json: str = knob("out/rvq_recon_error.json", env="OUT_JSON", help="where to write the report JSON")


def rvq_report(cfg: RVQEvalConfig) -> dict:
    """Quantization error per level, codebook usage and tuple sharing for the fitted RVQ."""

    rvq, meta = load_rvq(cfg.rvq_path, cfg.rvq_meta)
    x, _ = open_embeddings(cfg.emb_path, cfg.emb_meta)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not _same_input(meta, cfg.emb_path):
        raise StaleInputError(f"{cfg.rvq_path} was fitted on other embeddings than {cfg.emb_path}: rerun step 03")
    codes = rvq.encode(x, beam=cfg.beam)
    report = {
        "K": rvq.K,
        "V": rvq.V,
        "rows": int(len(x)),
        "beam": cfg.beam,
        "levels": level_stats(x, rvq, codes),
        "shared_tuple_share": shared_tuple_share(codes),
        "unique_tuples": int(len(np.unique(codes, axis=0))),
    }
    for r in collapsed_levels(report["levels"], rvq.V):
        log.warning("RVQ level %d has collapsed: perplexity %.1f < V/10 = %g", r["level"], r["perplexity"], rvq.V / 10)
    write_json(cfg.out_json, report)
    return report


def _same_input(meta: dict, path: str) -> bool:

    rec = meta["inputs"].get(path)
    return rec is None or rec["sha256"] == sha256_path(path)


def format_report(rep: dict) -> str:
    lines = [
        f"RVQ K={rep['K']} V={rep['V']} on {rep['rows']} sentences (beam {rep['beam']})",
        f"{'level':>5} {'rel.err':>8} {'cosine':>7} {'used':>6} {'perplex':>8}",
    ]
    for r in rep["levels"]:
        lines.append(
            f"{r['level']:>5} {r['rel_error']:>8.4f} {r['cosine']:>7.4f} {r['used']:>6} {r['perplexity']:>8.1f}"
        )
    lines.append(
        f"unique tuples: {rep['unique_tuples']}; sentences sharing their full tuple: "
        f"{100 * rep['shared_tuple_share']:.1f}%"
    )
    for r in collapsed_levels(rep["levels"], rep["V"]):
        lines.append(
            f"warning: level {r['level']} has collapsed: perplexity {r['perplexity']:.1f} is below V/10 = "
            f"{rep['V'] / 10:g} "
            "(most sentences share a few codes there; RVQ_FIT=spherical avoids it)"
        )
    return "\n".join(lines)


def collapsed_levels(levels: list[dict], V: int) -> list[dict]:
    """Levels whose code-use perplexity is below a tenth of V: codes the planner must predict and
    the decoder must read, for almost nothing."""
    return [r for r in levels if r["perplexity"] < V / 10]
