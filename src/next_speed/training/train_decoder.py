"""Step 06: train the decoder; the tokenization cache; the report on what codes buy.

On a 2-core CPU the 135M-parameter default cannot see the whole corpus, so training is bounded
by MAX_STEPS, TIME_BUDGET (minutes) or MAX_ROWS, and TRAIN_LAYERS chooses what is trained: `all`,
or the top N transformer blocks plus the final norm and the code-token embedding rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import math as _m
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from next_speed.core.artifacts import atomic_dir, read_jsonl, sha256_path, versions, write_json
from next_speed.core.config import deterministic_knob, device_knob, knob, resolve, seed_knob, to_dict
from next_speed.core.errors import ConfigError, NextSpeedError
from next_speed.core.runtime import autocast, pick_device, resolve_amp, seed_everything
from next_speed.models.decoder_model import (
    CODE_MODES,
    DEFAULT_DECODER,
    Conditioning,
    ExemplarBank,
    PlanInjector,
    add_code_tokens_to_tokenizer,
    attach_injector,
    block_list,
    build_plan_adapter,
    collate,
    encode_example,
    exemplar_bank,
    init_code_embeddings,
    load_base_model,
    load_base_tokenizer,
    load_decoder,
    residual_rms,
    save_decoder,
    token_losses,
)
from next_speed.quant.rvq import RVQ, check_fits_rvq
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
CACHE_FORMAT = 2


def default_decoder_dir(code_mode: str | None) -> str:
    """out/decoder for the main modes (special, the spec's default, and inject, the CPU preset's),
    out/decoder_<mode> for the text and none ablations, which never overwrite the main decoder."""
    return "out/decoder" if code_mode in (None, "auto", "special", "inject") else f"out/decoder_{code_mode}"


@dataclass
class DecoderTrainConfig:
    """Step 06 knobs."""

    model: str = knob(
        DEFAULT_DECODER,
        env="MODEL",
        help="base LM: smollm2-135m (packaged), a local folder, or a hub id (t5-small, ...)",
    )
    max_in: int = knob(160, env="MAX_IN", min=8, help="max input tokens (context cut from the left, codes kept)")
    max_out: int = knob(64, env="MAX_OUT", min=2, help="max target tokens (sentence + end marker)")
    code_mode: str = knob(
        "special",
        env="CODE_MODE",
        choices=CODE_MODES,
        help="special tokens, text codes, none (ablation), or inject: the plan as a vector added at a block",
    )
    k: int | None = knob(None, env="K", min=1, help="RVQ levels (checked against the training sets)")
    v: int | None = knob(None, env="V", min=2, help="codewords per level (checked against the training sets)")
    add_special_tokens: bool = knob(
        True,
        env="ADD_SPECIAL_TOKENS",
        help="special mode: add the K*V code tokens to the vocabulary (0: tokenize them as plain text)",
    )
    num_epochs: float = knob(1.0, env="NUM_EPOCHS", min=0.01, help="passes over the (MAX_ROWS-limited) training rows")
    lr: float = knob(2e-4, env="LR", min=0.0, help="peak learning rate (AdamW)")
    train_bs: int = knob(8, env="TRAIN_BS", min=1, help="batch size")
    grad_accum: int = knob(1, env="GRAD_ACCUM", min=1, help="gradient accumulation steps")
    max_rows: int | None = knob(None, env="MAX_ROWS", min=1, help="use at most this many training rows (seeded sample)")
    max_steps: int | None = knob(None, env="MAX_STEPS", min=1, help="stop after this many optimizer steps")
    time_budget: float | None = knob(None, env="TIME_BUDGET", min=0.05, help="stop training after this many minutes")
    train_layers: str = knob(
        "4", env="TRAIN_LAYERS", help="'all', or N: train the top N blocks + final norm + code embeddings"
    )
    train_code_emb: bool = knob(
        False,
        env="TRAIN_CODE_EMB",
        help="with TRAIN_LAYERS=N, also train the code-token rows (backprop then runs through every block)",
    )
    inject_layer: int | None = knob(
        None,
        env="INJECT_LAYER",
        min=0,
        help="inject: block that receives the plan vector (default: the first trainable one; 0 with TRAIN_LAYERS=all)",
    )
    adapter_width: int = knob(512, env="ADAPTER_WIDTH", min=8, help="inject: hidden width of the plan adapter MLP")
    adapter_lr: float | None = knob(
        None, env="ADAPTER_LR", min=0.0, help="inject: the adapter's learning rate (default: 3 x LR)"
    )
    exemplars: int = knob(
        0,
        env="EXEMPLARS",
        min=0,
        max=8,
        help="write the N training sentences nearest to the plan's RVQ reconstruction into the prompt (0 = off)",
    )
    code_drop: float = knob(
        0.0,
        env="CODE_DROP",
        min=0.0,
        max=1.0,
        help="share of training rows whose plan keeps only its first j levels (j random): tolerance of planner errors",
    )
    amp: str = knob(
        "auto",
        env="AMP",
        choices=("auto", "bf16", "off"),
        help="bf16 mixed precision for training: auto = on CUDA and on CPUs with native bf16 (AMX, AVX512-BF16), "
        "off elsewhere",
    )
    warmup: int = knob(20, env="WARMUP", min=0, help="warmup steps")
    eval_every: int = knob(50, env="EVAL_EVERY", min=1, help="validate every N steps")
    val_rows: int = knob(200, env="VAL_ROWS", min=1, help="validation rows used for the loss")
    num_proc: int = knob(1, env="NUM_PROC", min=1, help="processes for tokenization")
    cache_tokenized: bool = knob(
        False, env="CACHE_TOKENIZED", help="keep tokenized rows on disk, keyed by tokenizer, knobs and input hash"
    )
    map_batch_size: int = knob(1000, env="MAP_BATCH_SIZE", min=1, help="rows per tokenization batch")
    pretokenize_only: bool = knob(False, env="PRETOKENIZE_ONLY", help="build the tokenization cache and exit")
    cache_dir: str = knob("cache/tokenized", env="CACHE_DIR", help="tokenization cache folder")
    out_dec: str = knob("data/decoder_train.jsonl", env="OUT_DEC", help="training rows (step 04)")
    out_dec_val: str = knob("data/decoder_val.jsonl", env="OUT_DEC_VAL", help="validation rows (step 04)")
    train_meta: str = knob("data/train_meta.json", env="TRAIN_META", help="training sets metadata (step 04)")
    out_dir: str | None = knob(
        None, env="OUT_DIR", help="output folder (default out/decoder, or out/decoder_<CODE_MODE>)"
    )
    device: str = device_knob()
    seed: int = seed_knob("random seed")
    deterministic: bool = deterministic_knob()

    def check(self) -> None:
        if self.pretokenize_only and not self.cache_tokenized:
            raise ConfigError(
                "PRETOKENIZE_ONLY=1 builds the tokenization cache, so it needs CACHE_TOKENIZED=1 "
                "(without it the tokens would be thrown away)"
            )
        if self.train_layers != "all":
            try:
                n = int(self.train_layers)
            except ValueError:
                raise ConfigError(
                    f"TRAIN_LAYERS={self.train_layers!r} is not valid: use 'all' or a number of top blocks"
                ) from None
            if n < 0:
                raise ConfigError(f"TRAIN_LAYERS={n} must be 'all' or at least 0")
        if self.code_mode != "inject":
            for name, val, default in (("INJECT_LAYER", self.inject_layer, None), ("CODE_DROP", self.code_drop, 0.0)):
                if val != default:
                    raise ConfigError(f"{name}={val} applies to CODE_MODE=inject only (CODE_MODE={self.code_mode})")
        if self.exemplars and self.code_mode == "none":
            raise ConfigError(
                f"EXEMPLARS={self.exemplars} needs codes to retrieve by: CODE_MODE=none decoders take EXEMPLARS=0"
            )
        if self.out_dir is None:
            self.out_dir = default_decoder_dir(self.code_mode)


# ---------------------------------------------------------------------- tokenization (+ cache)


def _tokenizer_hash(tok) -> str:
    try:
        blob = tok.backend_tokenizer.to_str()
    except AttributeError:  # slow tokenizer
        blob = json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenize_rows(
    rows: list[dict], tok, cond: Conditioning, num_proc: int = 1, map_batch_size: int = 1000
) -> list[dict]:
    """Encode rows with `datasets.map` (batched, optionally in several processes)."""
    import datasets

    datasets.disable_progress_bars()

    def fn(batch):
        exs = batch["exemplars"] if "exemplars" in batch else [None] * len(batch["target"])
        enc = [
            encode_example(tok, cond, c, k, t, e)
            for c, k, t, e in zip(batch["context"], batch["codes"], batch["target"], exs)
        ]
        out = {"input_ids": [e["input_ids"] for e in enc], "labels": [e["labels"] for e in enc]}
        if cond.code_mode == "inject":
            out["codes"] = [e["codes"] for e in enc]
            out["plan_start"] = [e["plan_start"] for e in enc]
        return out

    cols = {
        "context": [r["context"] for r in rows],
        "codes": [r["codes"] for r in rows],
        "target": [r["target"] for r in rows],
    }
    if cond.exemplars:
        cols["exemplars"] = [r.get("exemplars") or [] for r in rows]
    ds = datasets.Dataset.from_dict(cols)
    ds = ds.map(
        fn,
        batched=True,
        batch_size=map_batch_size,
        num_proc=num_proc if num_proc > 1 and len(rows) > map_batch_size else None,
        remove_columns=list(cols),
    )
    return ds


def cached_tokenize(
    rows: list[dict],
    tok,
    cond: Conditioning,
    cfg: DecoderTrainConfig,
    source: str,
    split: str,
    subset_key: str,
    extra_key: dict | None = None,
) -> tuple[object, dict]:
    """Tokenized rows, from the cache when its key (tokenizer, conditioning, input hash, subset)
    matches; else built (and saved when CACHE_TOKENIZED=1). Returns (dataset, info)."""
    import datasets

    key_src = {
        "format": CACHE_FORMAT,
        "tokenizer": _tokenizer_hash(tok),
        "cond": cond.__dict__,
        "input": sha256_path(source),
        "subset": subset_key,
        **(extra_key or {}),
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cfg.cache_dir) / f"{split}-{key}"
    if cfg.cache_tokenized and (path / "cache_meta.json").is_file():
        try:
            meta = json.loads((path / "cache_meta.json").read_text())
            if meta.get("key_src") == key_src:
                ds = datasets.load_from_disk(str(path / "data"))
                if len(ds) == meta["rows"]:
                    log.info("tokenization cache hit: %s", path)
                    return ds, {"cache": str(path), "hit": True}
            log.warning("tokenization cache %s does not match its key: rebuilding it", path)
        except Exception as e:  # noqa: BLE001 - a broken cache is rebuilt, never used
            log.warning("tokenization cache %s is unreadable (%s): rebuilding it", path, type(e).__name__)
    ds = tokenize_rows(rows, tok, cond, cfg.num_proc, cfg.map_batch_size)
    if cfg.cache_tokenized:
        with atomic_dir(path) as tmp:
            ds.save_to_disk(str(tmp / "data"))
            write_json(tmp / "cache_meta.json", {"key_src": key_src, "rows": len(ds), "source": source, "split": split})
        ds = datasets.load_from_disk(str(path / "data"))
        return ds, {"cache": str(path), "hit": False}
    return ds, {"cache": None, "hit": False}


# ---------------------------------------------------------------------- parameter selection


def select_trainable(model, train_layers: str, n_vocab_before: int, train_code_emb: bool = True) -> dict:
    """Freeze what TRAIN_LAYERS says; return a summary. Code-token rows stay trainable via a
    gradient mask on the (shared) embedding matrix."""
    import torch

    if train_layers == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        n = sum(p.numel() for p in model.parameters())
        return {"train_layers": "all", "trainable_params": n, "total_params": n}
    n_top = int(train_layers)
    for p in model.parameters():
        p.requires_grad_(False)
    name, blocks = block_list(model)
    for blk in list(blocks)[len(blocks) - n_top :] if n_top else []:
        for p in blk.parameters():
            p.requires_grad_(True)
    for mname, mod in model.named_modules():  # final norms after the stack
        if mname.endswith(("norm", "final_layer_norm", "ln_f")) and not mname.startswith(name):
            for p in mod.parameters():
                p.requires_grad_(True)
    emb = model.get_input_embeddings().weight
    n_new = emb.shape[0] - n_vocab_before if train_code_emb else 0
    if n_new > 0:
        emb.requires_grad_(True)
        mask = torch.zeros(emb.shape[0], 1)
        mask[n_vocab_before:] = 1.0
        emb.register_hook(lambda g: g * mask.to(g.device, g.dtype))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) - (
        emb.numel() - n_new * emb.shape[1] if n_new > 0 else 0
    )
    return {
        "train_layers": n_top,
        "trainable_params": int(trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "code_rows": int(max(n_new, 0)),
    }


# ---------------------------------------------------------------------- training


def _rows(path: str) -> list[dict]:
    return list(read_jsonl(path, required=("context", "codes", "target")))


def evaluate_loss(
    model, data, pad_id: int, family: str, device: str, bs: int = 16, base_vocab: int | None = None
) -> float:
    """Mean per-token loss over `data` (tokenized examples)."""
    import torch

    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), bs):
            batch = {
                k: v.to(device)
                for k, v in collate([data[j] for j in range(i, min(i + bs, len(data)))], pad_id, family).items()
            }
            s, c = token_losses(model, batch, family, base_vocab)
            tot += s.sum().item()
            n += c.sum().item()
    return tot / max(n, 1)


def sentence_vectors(tmeta: dict, rows: list[dict], rows_path: str):
    """Unit step-02 embeddings (N, D) of the rows' sentences (their `sid`), from the embeddings file
    the training sets were built from (checked against its recorded hash). NextSpeedError naming
    the file and the step to rerun otherwise."""

    emb_path = tmeta.get("emb_path")
    if not emb_path or any("sid" not in r for r in rows):
        raise NextSpeedError(f"{rows_path} does not name each sentence's embedding row: rerun step 04")
    if not Path(emb_path).is_file():
        raise NextSpeedError(f"{emb_path} (the embeddings of the training sets) is missing: rerun steps 02-04")
    if tmeta.get("emb_sha256") and sha256_path(emb_path) != tmeta["emb_sha256"]:
        raise NextSpeedError(f"{emb_path} is not the file the training sets were built from: rerun steps 02-04")
    emb = np.load(emb_path, mmap_mode="r", allow_pickle=False)
    sids = np.asarray([r["sid"] for r in rows], dtype=np.int64)
    if len(sids) and (sids.min() < 0 or sids.max() >= len(emb)):
        raise NextSpeedError(f"{rows_path} names sentence rows beyond {emb_path} ({len(emb)} rows): rerun step 04")
    vec = np.asarray(emb[sids], dtype=np.float32)
    vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
    return vec


def build_bank(cfg: DecoderTrainConfig, tmeta: dict, rows: list[dict]) -> ExemplarBank:
    """The exemplar bank of step 06: every training sentence with its step-02 embedding (found by
    the rows' `sid` in the embeddings that step 03 quantized) and the RVQ codebooks."""

    rvq_path = tmeta.get("rvq_path")
    if not rvq_path or not Path(rvq_path).is_file():
        raise NextSpeedError(f"EXEMPLARS reads {rvq_path}, which is missing: rerun steps 03-04")
    if tmeta.get("rvq_sha256") and sha256_path(rvq_path) != tmeta["rvq_sha256"]:
        raise NextSpeedError(f"{rvq_path} is not the file the training sets were built from: rerun steps 03-04")
    vec = sentence_vectors(tmeta, rows, cfg.out_dec)
    bank = ExemplarBank(
        texts=[r["target"] for r in rows],
        docs=[r["doc"] for r in rows],
        emb=vec,
        codebooks=RVQ.load(rvq_path).codebooks,
        codes=[r["codes"] for r in rows],
    )
    log.info("06: exemplar bank of %d training sentences", len(rows))
    return bank


def add_exemplars(bank: ExemplarBank, rows: list[dict], k: int, codes: list | None = None) -> list[dict]:
    """Rows with `exemplars`: the k bank sentences nearest to each row's plan (its own codes, or
    `codes[i]`), never from the row's own document nor a copy of its target."""
    plans = [r["codes"] for r in rows] if codes is None else codes
    exs = bank.lookup(plans, k, exclude_docs=[r.get("doc") for r in rows], exclude_texts=[{r["target"]} for r in rows])
    return [{**r, "exemplars": e} for r, e in zip(rows, exs)]


def _level_keep(n: int, K: int, p: float, rng: random.Random):
    """(n, K) bool: with probability p a row keeps only levels < j, j uniform in 1..K-1 (the
    coarse part of the plan, as when the planner gets the deeper levels wrong); else all levels."""
    import torch

    keep = torch.ones(n, K, dtype=torch.bool)
    for i in range(n):
        if K > 1 and rng.random() < p:
            keep[i, rng.randint(1, K - 1) :] = False
    return keep


def _make_adapter(model, cfg: DecoderTrainConfig, cond: Conditioning, tmeta: dict, val_ds, pad_id: int, family: str):
    """CODE_MODE=inject: the plan adapter over step 03's codebooks, hooked into the block where
    training starts (its scale is the residual stream's RMS there), and recorded in `cond`."""

    n_blocks = len(block_list(model)[1])
    if cfg.inject_layer is not None:
        layer = cfg.inject_layer
    elif cfg.train_layers == "all":
        layer = 0
    else:
        layer = max(0, n_blocks - int(cfg.train_layers))
    if layer >= n_blocks:
        raise ConfigError(f"INJECT_LAYER={layer} is past the model's last block ({n_blocks - 1})")
    if cfg.train_layers != "all" and layer < n_blocks - int(cfg.train_layers):
        log.warning(
            "06: INJECT_LAYER=%d is below the trainable blocks: gradients to the plan adapter pass through "
            "frozen blocks (slower steps)",
            layer,
        )
    rvq_path = tmeta.get("rvq_path") or "out/rvq.npz"
    if not Path(rvq_path).is_file():
        raise NextSpeedError(
            f"CODE_MODE=inject reads the RVQ codebooks of step 03, but {rvq_path} is missing: rerun step 03"
        )
    rvq = RVQ.load(rvq_path)
    check_fits_rvq("the training sets", cond.K, cond.V, tmeta.get("rvq_sha256"), rvq, rvq_path, sha256_path(rvq_path),
                   "rerun steps 03-04")  # fmt: skip
    calib = collate([val_ds[i] for i in range(min(8, len(val_ds)))], pad_id, family)
    scale = residual_rms(model, layer, calib)
    hidden = model.get_input_embeddings().weight.shape[1]
    adapter = build_plan_adapter(rvq.codebooks, hidden, cfg.adapter_width, scale)
    attach_injector(model, PlanInjector(model, adapter, layer))
    cond.inject_layer, cond.adapter_width = layer, cfg.adapter_width
    log.info(
        "06: plan adapter (%s parameters) injects at block %d of %d (residual RMS %.2f)",
        f"{sum(p.numel() for p in adapter.parameters()):,}",
        layer,
        n_blocks,
        scale,
    )
    return adapter


def _training_rows(cfg: DecoderTrainConfig, tmeta: dict) -> tuple[list[dict], list[dict], object]:
    """The training and validation rows (checked against K and V, sampled by MAX_ROWS and VAL_ROWS)
    and the exemplar bank (EXEMPLARS > 0), exemplars already added to the rows."""
    K, V = tmeta["K"], tmeta["V"]
    train_rows, val_rows = _rows(cfg.out_dec), _rows(cfg.out_dec_val)
    if not train_rows:
        raise NextSpeedError(f"{cfg.out_dec} is empty: rerun step 04 with more data or a smaller VAL_FRAC")
    for path, rows in ((cfg.out_dec, train_rows), (cfg.out_dec_val, val_rows)):
        for i, r in enumerate(rows[:1000]):
            if len(r["codes"]) != K or min(r["codes"]) < 0 or max(r["codes"]) >= V:
                raise NextSpeedError(
                    f"{path}: row {i + 1} has codes {r['codes']} that do not fit K={K} V={V}: rerun step 04"
                )
    bank = build_bank(cfg, tmeta, train_rows) if cfg.exemplars else None
    if cfg.max_rows and cfg.max_rows < len(train_rows):
        train_rows = random.Random(cfg.seed).sample(train_rows, cfg.max_rows)
    val_rows = random.Random(cfg.seed + 1).sample(val_rows, min(cfg.val_rows, len(val_rows)))
    if bank is not None:
        train_rows = add_exemplars(bank, train_rows, cfg.exemplars)
        val_rows = add_exemplars(bank, val_rows, cfg.exemplars)
    return train_rows, val_rows, bank


def _build_decoder(cfg: DecoderTrainConfig, tmeta: dict, tok, cond, family: str, n_before: int, train_rows, val_ds):
    """The base model with the code tokens' embeddings initialized, its trainable parameters
    chosen (TRAIN_LAYERS) and, for CODE_MODE=inject, the plan adapter."""
    model = load_base_model(cfg.model, family)
    init_texts: dict[tuple[int, int], list[str]] = {}
    for r in train_rows:
        for k, c in enumerate(r["codes"]):
            lst = init_texts.setdefault((k, c), [])
            if len(lst) < 16:  # a few sentences per code suffice to place its embedding
                lst.append(r["target"])
    added = init_code_embeddings(model, tok, cond, n_before, init_texts)
    sel = select_trainable(model, cfg.train_layers, n_before, cfg.train_code_emb)
    sel["code_tokens_added"] = added
    adapter = None
    if cfg.code_mode == "inject":
        adapter = _make_adapter(model, cfg, cond, tmeta, val_ds, tok.pad_token_id, family)
        sel["adapter_params"] = sum(p.numel() for p in adapter.parameters())
        sel["trainable_params"] += sel["adapter_params"]
        sel["inject_layer"] = cond.inject_layer
    return model, adapter, sel


def _optimizer(cfg: DecoderTrainConfig, model, adapter):
    """AdamW over the trainable parameters (no decay on the embedding table, biases and norms) and
    the adapter's (ADAPTER_LR, 3x LR by default); returns it and every trained parameter."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    emb = model.get_input_embeddings().weight
    groups = decay_groups(params, lambda p: p.dim() < 2 or p is emb, 0.01)
    if adapter is not None:
        a_lr = cfg.adapter_lr if cfg.adapter_lr is not None else 3 * cfg.lr
        scale = a_lr / cfg.lr if cfg.lr > 0 else 0.0
        groups.append({"params": list(adapter.parameters()), "weight_decay": 0.0, "lr_scale": scale})
        params = params + list(adapter.parameters())
    return torch.optim.AdamW(groups, lr=cfg.lr), params


def train_decoder(cfg: DecoderTrainConfig) -> dict | None:
    """Run step 06: decoder rows -> a fine-tuned decoder in OUT_DIR (or only the cache).

    Under `torchrun --nproc-per-node N`: DistributedDataParallel (gloo on CPU, NCCL on GPUs);
    every rank walks the same shuffled order and trains on its shard of each global micro-batch
    of TRAIN_BS rows, the loss weighted by the global token count; rank 0 validates, decides the
    time budget for all, and writes the decoder once, atomically (other ranks return None)."""

    tmeta = check_trainsets(cfg.train_meta, [cfg.out_dec, cfg.out_dec_val], cfg.k, cfg.v)
    train_rows, val_rows, bank = _training_rows(cfg, tmeta)
    seed_everything(cfg.seed, cfg.deterministic)
    dd, device = dist_init(pick_device(cfg.device))
    if cfg.train_bs < dd.world:
        raise ConfigError(
            f"TRAIN_BS={cfg.train_bs} is smaller than the {dd.world} processes: each needs at least one row"
        )
    tok, family, base_path = load_base_tokenizer(cfg.model)
    cond = Conditioning(K=tmeta["K"], V=tmeta["V"], code_mode=cfg.code_mode, add_special_tokens=cfg.add_special_tokens,
                        max_in=cfg.max_in, max_out=cfg.max_out, family=family, base_vocab=len(tok),
                        exemplars=cfg.exemplars)  # fmt: skip
    extra_key = {"exemplar_bank": [tmeta.get("emb_sha256"), tmeta.get("rvq_sha256")]} if bank is not None else {}
    n_before = len(tok)
    add_code_tokens_to_tokenizer(tok, cond)
    subset = f"max_rows={cfg.max_rows};seed={cfg.seed}"
    train_ds, cache_info = cached_tokenize(train_rows, tok, cond, cfg, cfg.out_dec, "train", subset, extra_key)
    val_subset = f"val_rows={cfg.val_rows};seed={cfg.seed}"
    val_ds, _ = cached_tokenize(val_rows, tok, cond, cfg, cfg.out_dec_val, "val", val_subset, extra_key)
    if cfg.pretokenize_only:
        log.info("06: tokenized %d train / %d val rows; PRETOKENIZE_ONLY=1, stopping", len(train_ds), len(val_ds))
        return {"pretokenize_only": True, "train_rows": len(train_ds), "val_rows": len(val_ds), "cache": cache_info}
    model, adapter, sel = _build_decoder(cfg, tmeta, tok, cond, family, n_before, train_rows, val_ds)
    model.to(device)
    if adapter is not None:
        adapter.to(device)
    opt, params = _optimizer(cfg, model, adapter)
    sel["amp"] = resolve_amp(cfg.amp, device)  # recorded: bf16 changes how far a time budget goes
    run = _DecoderRun(cfg, tmeta["K"], model, adapter, train_ds, val_ds, tok.pad_token_id, family, n_before, dd, device,
                      autocast(sel["amp"], device))  # fmt: skip
    val0 = run.validate() if dd.main else float("nan")
    log.info("06: %s (%s), %d code tokens added, %s of %s parameters trained, AMP %s; val loss before training %.3f",
             cfg.model, family, sel["code_tokens_added"], f"{sel['trainable_params']:,}", f"{sel['total_params']:,}",
             sel["amp"], val0)  # fmt: skip
    res = fit(opt=opt, params=params, total=run.total_steps(), train_step=run.train_step,
              evaluate=lambda step: {"val_loss": run.validate(), "tokens_per_s": run.tokens_per_s()},
              snapshot=run.snapshot, lr_at=lambda step, total: cosine_lr(step, total, cfg.warmup, cfg.lr), dd=dd,
              desc="06 decoder", eval_every=cfg.eval_every, grad_clip=1.0, time_budget=cfg.time_budget,
              before_update=run.average_adapter_grads,
              history=[{"step": 0, "train_loss": float("nan"), "val_loss": val0}])  # fmt: skip
    if not dd.main:
        dist_close(dd)
        return None
    info = _save(cfg, tmeta, run, tok, cond, bank, sel, res, val0, base_path, cache_info)
    dist_close(dd)
    return info


class _DecoderRun:
    """One decoder training run's data walk, forward and validation, for `training.loop.fit`."""

    def __init__(self, cfg, K, model, adapter, train_ds, val_ds, pad_id, family, n_before, dd, device, amp):
        self.cfg, self.K, self.model, self.adapter = cfg, K, model, adapter
        self.train_ds, self.val_ds, self.pad_id, self.family, self.n_before = train_ds, val_ds, pad_id, family, n_before
        self.dd, self.device, self.amp = dd, device, amp
        self.train_model = wrap_ddp(model, dd, device)  # what the training forward calls
        self.order: list[int] = []
        self.rng = random.Random(cfg.seed)
        self.tokens, self.t0 = 0, time.perf_counter()
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    def total_steps(self) -> int:
        cfg = self.cfg
        total = max(1, int(math.ceil(len(self.train_ds) / (cfg.train_bs * cfg.grad_accum)) * cfg.num_epochs))
        return min(total, cfg.max_steps) if cfg.max_steps else total

    def train_step(self, step: int) -> float:
        """GRAD_ACCUM micro-batches of the shuffled order (the same global micro-batch on every rank)."""
        cfg, losses = self.cfg, []
        self.model.train()
        for _ in range(cfg.grad_accum):
            if not self.order:
                self.order = list(range(len(self.train_ds)))
                self.rng.shuffle(self.order)
            idx, self.order = self.order[: cfg.train_bs], self.order[cfg.train_bs :]
            use_keep = self.adapter is not None and cfg.code_drop > 0
            keep = _level_keep(len(idx), self.K, cfg.code_drop, self.rng) if use_keep else None
            mine = shard(list(range(len(idx))), self.dd)
            rows = [self.train_ds[idx[i]] for i in mine]
            batch = {k: v.to(self.device) for k, v in collate(rows, self.pad_id, self.family).items()}
            if keep is not None:
                batch["keep"] = keep[mine].to(self.device)
            with self.amp:
                s, c = token_losses(self.train_model, batch, self.family, self.n_before)
                loss, loss_mean = global_mean(s.sum(), c.sum(), self.dd)
            (loss / cfg.grad_accum).backward()
            losses.append(loss_mean.item())
            self.tokens += int(batch["attention_mask"].sum())
        return sum(losses) / len(losses)

    def average_adapter_grads(self) -> None:
        """The adapter runs inside hooks, outside DDP: its gradients are averaged by hand."""
        if self.adapter is None or self.dd.world <= 1:
            return
        import torch.distributed as dist

        for p in self.adapter.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.dd.world

    def validate(self) -> float:
        return evaluate_loss(self.model, self.val_ds, self.pad_id, self.family, self.device, base_vocab=self.n_before)

    def tokens_per_s(self) -> float:
        return round(self.tokens / (time.perf_counter() - self.t0), 1)

    def snapshot(self):
        sd = self.model.state_dict()
        snap = {n: sd[n].detach().to("cpu", copy=True) for n in self.trainable if n in sd}
        ad = None
        if self.adapter is not None:
            ad = {k: v.detach().to("cpu", copy=True) for k, v in self.adapter.state_dict().items()}
        return snap, ad


def _save(cfg, tmeta, run: _DecoderRun, tok, cond, bank, sel, res, val0, base_path, cache_info) -> dict:
    """Load the best state and write OUT_DIR atomically (weights, tokenizer, config.json, curve)."""
    model, adapter = run.model, run.adapter
    if res.best_state is not None:
        model.load_state_dict(res.best_state[0], strict=False)
        if adapter is not None:
            adapter.load_state_dict(res.best_state[1])
    info = {
        "kind": "decoder",
        "base_model": cfg.model,
        "base_path": base_path,
        "train": to_dict(cfg),
        "K": tmeta["K"],
        "V": tmeta["V"],
        "selection": {k: v for k, v in sel.items() if k != "code_tokens_added"},
        "code_tokens_added": sel["code_tokens_added"],
        "best": {"val_loss": res.best["val_loss"], "step": res.best["step"]},
        "history": res.history,
        "steps": res.steps,
        "stopped_by": res.stopped_by,
        "seconds": round(res.seconds, 1),
        "val_loss_before": val0,
        "world_size": run.dd.world,
        "inputs": {p: {"sha256": sha256_path(p)} for p in (cfg.out_dec, cfg.out_dec_val)},
        "rvq_sha256": tmeta.get("rvq_sha256"),
        "rvq_path": tmeta.get("rvq_path"),
        "versions": versions(),
        "tokenization_cache": cache_info,
    }
    model.to("cpu")
    if adapter is not None:
        adapter.to("cpu")
    curve = [h for h in res.history if h["step"] > 0] or res.history
    title = f"decoder ({cfg.code_mode})"
    save_decoder(model, tok, cond, cfg.out_dir, info, adapter=adapter, bank=bank,
                 write_extra=lambda tmp: plot_curve(curve, Path(tmp) / "curve.png", title))  # fmt: skip
    log.info("06: %d steps in %.0fs, best val loss %.3f (from %.3f) -> %s", res.steps, res.seconds,
             res.best["val_loss"], val0, cfg.out_dir)  # fmt: skip
    return info


# ---------------------------------------------------------------------- what codes buy


@dataclass
class DecoderEvalConfig:
    """eval-decoder knobs: per-token validation loss with true codes, shuffled codes, and no codes."""

    out_dir: str = knob("out/decoder", env="OUT_DIR", help="decoder trained with codes")
    none_dir: str = knob("out/decoder_none", env="NONE_DIR", help="decoder trained with CODE_MODE=none, same budget")
    train_none: bool = knob(
        True,
        env="TRAIN_NONE",
        help="train the no-codes decoder with the main decoder's recorded settings when it is missing or differs",
    )
    out_dec_val: str = knob("data/decoder_val.jsonl", env="OUT_DEC_VAL", help="validation rows (step 04)")
    val_rows: int = knob(300, env="VAL_ROWS", min=1, help="validation rows scored")
    out_json: str = knob("out/decoder_eval.json", env="OUT_JSON", help="where to write the report JSON")
    device: str = device_knob()
    seed: int = seed_knob("seed for the row sample and the code shuffle")


# Settings that define the budget and the data of a decoder run; a no-codes decoder is comparable
# to a codes decoder when all of these agree.
_BUDGET_KEYS = (
    "model",
    "max_in",
    "max_out",
    "num_epochs",
    "lr",
    "train_bs",
    "grad_accum",
    "max_rows",
    "max_steps",
    "time_budget",
    "train_layers",
    "amp",
    "warmup",
    "eval_every",
    "val_rows",
    "out_dec",
    "out_dec_val",
    "seed",
)


def none_config_for(meta: dict, none_dir: str) -> dict:
    """The step-06 settings of a CODE_MODE=none decoder with the same budget as the decoder of `meta`."""
    return {
        **{k: meta["train"][k] for k in _BUDGET_KEYS if k in meta["train"]},
        "code_mode": "none",
        "out_dir": none_dir,
        "device": meta["train"].get("device", "auto"),
        "deterministic": meta["train"].get("deterministic", True),
        "train_meta": meta["train"].get("train_meta", "data/train_meta.json"),
    }


def _none_mismatch(meta: dict, none_meta: dict) -> str | None:
    """Why a no-codes decoder is not comparable to the codes decoder (None when it is)."""
    for k in _BUDGET_KEYS:
        if meta["train"].get(k) != none_meta["train"].get(k):
            return f"{k.upper()}={none_meta['train'].get(k)} there, {meta['train'].get(k)} for the codes decoder"
    a, b = meta.get("selection", {}).get("amp"), none_meta.get("selection", {}).get("amp")
    if a != b:  # AMP=auto resolves by machine: the same knob can mean bf16 on one and fp32 on another
        return f"it trained with AMP resolved to {b or 'off'}, the codes decoder with {a or 'off'}"
    if meta.get("inputs") != none_meta.get("inputs"):
        return "it was trained on other training rows"
    return None


def ensure_none_decoder(meta: dict, none_dir: str, train: bool = True) -> str | None:
    """Make sure `none_dir` holds a CODE_MODE=none decoder comparable to the decoder of `meta`
    (same recorded budget, data and base model): train it there with those settings when it is
    missing or differs and `train` is on. Returns None when it is comparable, else why not."""

    why = "missing"
    if (Path(none_dir) / "config.json").is_file():
        _, _, _, nmeta = load_decoder(none_dir, "cpu")
        why = (
            _none_mismatch(meta, nmeta)
            if nmeta.get("train", {}).get("code_mode") == "none"
            else "not a CODE_MODE=none decoder"
        )
    if why and train:
        log.info("training the no-codes decoder in %s (%s) with the codes decoder's settings", none_dir, why)
        train_decoder(resolve(DecoderTrainConfig, cli=none_config_for(meta, none_dir), environ={}))
        why = None
    return why


def eval_decoder(cfg: DecoderEvalConfig) -> dict:
    """Codes are worth something only if the true-code loss is clearly below the other two. The
    no-codes decoder is trained here (same recorded settings and budget) when it is missing or
    not comparable, unless TRAIN_NONE=0."""

    device = pick_device(cfg.device)
    rows = _rows(cfg.out_dec_val)
    if not rows:
        raise NextSpeedError(f"{cfg.out_dec_val} is empty: rerun step 04 with VAL_FRAC > 0")
    rows = random.Random(cfg.seed).sample(rows, min(cfg.val_rows, len(rows)))
    model, tok, cond, meta = load_decoder(cfg.out_dir, device)
    if cond.code_mode == "none":
        raise NextSpeedError(
            f"{cfg.out_dir} was trained with CODE_MODE=none: point OUT_DIR at a decoder trained with codes"
        )
    shuffled = [r["codes"] for r in rows]
    random.Random(cfg.seed + 1).shuffle(shuffled)

    def loss(m, t, c, codes_list, exemplars=None):
        bank = exemplar_bank(m)
        if exemplars is None:
            exemplars = (
                [e.get("exemplars") for e in add_exemplars(bank, rows, c.exemplars, codes_list)]
                if bank is not None
                else [None] * len(rows)
            )
        data = [
            encode_example(t, c, r["context"], codes, r["target"], e)
            for r, codes, e in zip(rows, codes_list, exemplars)
        ]
        return evaluate_loss(m, data, t.pad_token_id, c.family, device, base_vocab=c.base_vocab)

    res = {
        "rows": len(rows),
        "code_mode": cond.code_mode,
        "exemplars": cond.exemplars,
        "decoder": cfg.out_dir,
        "true_codes": loss(model, tok, cond, [r["codes"] for r in rows]),
        "shuffled_codes": loss(model, tok, cond, shuffled),
    }
    oracle, why_not = _oracle_exemplars(model, cond, meta, rows, cfg.out_dec_val)
    res["oracle_exemplars"] = loss(model, tok, cond, [r["codes"] for r in rows], oracle) if oracle is not None else None
    if why_not:
        res["oracle_note"] = why_not
    del model
    why = ensure_none_decoder(meta, cfg.none_dir, cfg.train_none)
    if why is None:
        m2, t2, c2, meta2 = load_decoder(cfg.none_dir, device)
        res["no_codes_decoder"] = loss(m2, t2, c2, [r["codes"] for r in rows])
        res["budgets"] = {
            "codes": {"steps": meta["steps"], "seconds": meta["seconds"]},
            "none": {"steps": meta2["steps"], "seconds": meta2["seconds"]},
        }
    else:
        res["no_codes_decoder"] = None
        res["note"] = (
            f"no comparable CODE_MODE=none decoder in {cfg.none_dir} ({why}): rerun with TRAIN_NONE=1 or "
            f"train one with `CODE_MODE=none uv run python 06_train_decoder.py` and the same settings"
        )
    lt, ls, ln, lo = res["true_codes"], res["shuffled_codes"], res["no_codes_decoder"], res["oracle_exemplars"]
    res["summary"] = {
        "loss_true": round(lt, 4),
        "loss_shuffled": round(ls, 4),
        "loss_none": None if ln is None else round(ln, 4),
        "rows": len(rows),
        "ratio_shuffled": round(lt / ls, 4),
        "ratio_none": None if ln is None else round(lt / ln, 4),
        "loss_oracle_exemplars": None if lo is None else round(lo, 4),
        "ratio_oracle_none": None if lo is None or ln is None else round(lo / ln, 4),
    }
    write_json(cfg.out_json, res)
    return res


def _oracle_exemplars(
    model, cond: Conditioning, meta: dict, rows: list[dict], rows_path: str
) -> tuple[list | None, str | None]:
    """The exemplar channel's bound: for each row, the bank sentences nearest to the true next
    sentence's own embedding (retrieval keyed without the RVQ's loss; same exclusions as the plan's
    lookup). (None, why) when the decoder has no bank or step 02's embeddings are not at hand."""

    bank = exemplar_bank(model)
    if bank is None or not cond.exemplars:
        return None, None
    tm = Path(meta.get("train", {}).get("train_meta") or "data/train_meta.json")
    try:
        tmeta = json.loads(tm.read_text())
    except (OSError, ValueError):
        tmeta = None
    if not isinstance(tmeta, dict):
        return None, f"no oracle-exemplar bound: {tm} is not a readable training-sets metadata file"
    try:
        vec = sentence_vectors(tmeta, rows, rows_path)
    except NextSpeedError as e:
        return None, f"no oracle-exemplar bound: {e}"
    return bank.nearest(
        vec, cond.exemplars, exclude_docs=[r.get("doc") for r in rows], exclude_texts=[{r["target"]} for r in rows]
    ), None


def format_decoder_eval(res: dict) -> str:

    lines = [f"decoder per-token validation loss on {res['rows']} rows (perplexity in brackets)"]
    for name, key in (
        ("true codes", "true_codes"),
        ("shuffled codes", "shuffled_codes"),
        ("no-codes decoder", "no_codes_decoder"),
        ("oracle exemplars", "oracle_exemplars"),
    ):
        if key == "oracle_exemplars" and res.get(key) is None:
            continue  # a decoder without exemplars
        v = res.get(key)
        lines.append(f"  {name:<18} " + (f"{v:.4f} ({_m.exp(v):.1f})" if v is not None else "n/a"))
    sm = res.get("summary", {})
    if sm.get("ratio_none") is not None:
        lines.append(f"  true / no-codes {sm['ratio_none']:.3f}, true / shuffled {sm['ratio_shuffled']:.3f}")
    if res.get("oracle_note"):
        lines.append("  " + res["oracle_note"])
    if sm.get("ratio_oracle_none") is not None:
        lines.append(
            "  oracle exemplars (retrieved by the true next sentence's embedding) / no-codes "
            f"{sm['ratio_oracle_none']:.3f}: "
            f"the bound of the exemplar channel"
        )
    if res.get("note"):
        lines.append("  " + res["note"])
    return "\n".join(lines)


__all__ = ["DecoderTrainConfig", "train_decoder", "DecoderEvalConfig", "eval_decoder"]
