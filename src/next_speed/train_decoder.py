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
import random
import time
from dataclasses import dataclass
from pathlib import Path

from .artifacts import atomic_dir, read_jsonl, sha256_path, versions, write_json
from .config import knob, to_dict
from .decoder_model import (CODE_MODES, DEFAULT_DECODER, Conditioning, add_code_tokens_to_tokenizer, collate,
                            encode_example, init_code_embeddings, load_base_model, load_base_tokenizer, save_decoder,
                            token_losses)
from .errors import ConfigError, NextSpeedError
from .train_planner import check_trainsets, plot_curve

log = logging.getLogger(__name__)
CACHE_FORMAT = 1


def default_decoder_dir(code_mode: str) -> str:
    """out/decoder for the default CODE_MODE, out/decoder_<mode> for the others (ablations never
    overwrite the main decoder)."""
    return "out/decoder" if code_mode == "special" else f"out/decoder_{code_mode}"


@dataclass
class DecoderTrainConfig:
    """Step 06 knobs."""

    model: str = knob(DEFAULT_DECODER, env="MODEL", help="base LM: smollm2-135m (packaged), a local folder, or a hub id (t5-small, ...)")
    max_in: int = knob(160, env="MAX_IN", min=8, help="max input tokens (context cut from the left, codes kept)")
    max_out: int = knob(64, env="MAX_OUT", min=2, help="max target tokens (sentence + end marker)")
    code_mode: str = knob("special", env="CODE_MODE", choices=CODE_MODES, help="special tokens, text codes, or none (ablation)")
    k: int | None = knob(None, env="K", min=1, help="RVQ levels (checked against the training sets)")
    v: int | None = knob(None, env="V", min=2, help="codewords per level (checked against the training sets)")
    add_special_tokens: bool = knob(True, env="ADD_SPECIAL_TOKENS", help="special mode: add the K*V code tokens to the vocabulary (0: tokenize them as plain text)")
    num_epochs: float = knob(1.0, env="NUM_EPOCHS", min=0.01, help="passes over the (MAX_ROWS-limited) training rows")
    lr: float = knob(2e-4, env="LR", min=0.0, help="peak learning rate (AdamW)")
    train_bs: int = knob(8, env="TRAIN_BS", min=1, help="batch size")
    grad_accum: int = knob(1, env="GRAD_ACCUM", min=1, help="gradient accumulation steps")
    max_rows: int | None = knob(None, env="MAX_ROWS", min=1, help="use at most this many training rows (seeded sample)")
    max_steps: int | None = knob(None, env="MAX_STEPS", min=1, help="stop after this many optimizer steps")
    time_budget: float | None = knob(None, env="TIME_BUDGET", min=0.05, help="stop training after this many minutes")
    train_layers: str = knob("4", env="TRAIN_LAYERS", help="'all', or N: train the top N blocks + final norm + code embeddings")
    train_code_emb: bool = knob(False, env="TRAIN_CODE_EMB",
                                help="with TRAIN_LAYERS=N, also train the code-token rows (backprop then runs through every block)")
    warmup: int = knob(20, env="WARMUP", min=0, help="warmup steps")
    eval_every: int = knob(50, env="EVAL_EVERY", min=1, help="validate every N steps")
    val_rows: int = knob(200, env="VAL_ROWS", min=1, help="validation rows used for the loss")
    num_proc: int = knob(1, env="NUM_PROC", min=1, help="processes for tokenization")
    cache_tokenized: bool = knob(False, env="CACHE_TOKENIZED", help="keep tokenized rows on disk, keyed by tokenizer, knobs and input hash")
    map_batch_size: int = knob(1000, env="MAP_BATCH_SIZE", min=1, help="rows per tokenization batch")
    pretokenize_only: bool = knob(False, env="PRETOKENIZE_ONLY", help="build the tokenization cache and exit")
    cache_dir: str = knob("cache/tokenized", env="CACHE_DIR", help="tokenization cache folder")
    out_dec: str = knob("data/decoder_train.jsonl", env="OUT_DEC", help="training rows (step 04)")
    out_dec_val: str = knob("data/decoder_val.jsonl", env="OUT_DEC_VAL", help="validation rows (step 04)")
    train_meta: str = knob("data/train_meta.json", env="TRAIN_META", help="training sets metadata (step 04)")
    out_dir: str | None = knob(None, env="OUT_DIR", help="output folder (default out/decoder, or out/decoder_<CODE_MODE>)")
    device: str = knob("auto", env="DEVICE", help="auto, cpu, cuda, cuda:N or mps")
    seed: int = knob(0, env="SEED", help="random seed")
    deterministic: bool = knob(True, env="DETERMINISTIC", help="deterministic torch kernels")

    def check(self) -> None:
        if self.train_layers != "all":
            try:
                n = int(self.train_layers)
            except ValueError:
                raise ConfigError(f"TRAIN_LAYERS={self.train_layers!r} is not valid: use 'all' or a number of top blocks") from None
            if n < 0:
                raise ConfigError(f"TRAIN_LAYERS={n} must be 'all' or at least 0")
        if self.out_dir is None:
            self.out_dir = default_decoder_dir(self.code_mode)


# ---------------------------------------------------------------------- tokenization (+ cache)

def _tokenizer_hash(tok) -> str:
    try:
        blob = tok.backend_tokenizer.to_str()
    except AttributeError:  # slow tokenizer
        blob = json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenize_rows(rows: list[dict], tok, cond: Conditioning, num_proc: int = 1, map_batch_size: int = 1000) -> list[dict]:
    """Encode rows with `datasets.map` (batched, optionally in several processes)."""
    import datasets

    datasets.disable_progress_bars()

    def fn(batch):
        enc = [encode_example(tok, cond, c, k, t) for c, k, t in zip(batch["context"], batch["codes"], batch["target"])]
        return {"input_ids": [e["input_ids"] for e in enc], "labels": [e["labels"] for e in enc]}

    ds = datasets.Dataset.from_dict({"context": [r["context"] for r in rows], "codes": [r["codes"] for r in rows],
                                     "target": [r["target"] for r in rows]})
    ds = ds.map(fn, batched=True, batch_size=map_batch_size, num_proc=num_proc if num_proc > 1 and len(rows) > map_batch_size else None,
                remove_columns=["context", "codes", "target"])
    return ds


def cached_tokenize(rows: list[dict], tok, cond: Conditioning, cfg: DecoderTrainConfig, source: str, split: str,
                    subset_key: str) -> tuple[object, dict]:
    """Tokenized rows, from the cache when its key (tokenizer, conditioning, input hash, subset)
    matches; else built (and saved when CACHE_TOKENIZED=1). Returns (dataset, info)."""
    import datasets

    key_src = {"format": CACHE_FORMAT, "tokenizer": _tokenizer_hash(tok), "cond": cond.__dict__,
               "input": sha256_path(source), "subset": subset_key}
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

def _block_list(model):
    """The model's main stack of transformer blocks (the decoder's, for seq2seq models)."""
    import torch.nn as nn

    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and name.split(".")[-1] in ("layers", "block", "h", "layer"):
            best = (name, mod)  # the last registered stack: the decoder's in encoder-decoder models
    if best is None:
        raise NextSpeedError("could not find the model's transformer blocks: use TRAIN_LAYERS=all")
    return best


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
    name, blocks = _block_list(model)
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
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) - (emb.numel() - n_new * emb.shape[1] if n_new > 0 else 0)
    return {"train_layers": n_top, "trainable_params": int(trainable), "total_params": sum(p.numel() for p in model.parameters()),
            "code_rows": int(max(n_new, 0))}


# ---------------------------------------------------------------------- training

def _rows(path: str) -> list[dict]:
    return list(read_jsonl(path, required=("context", "codes", "target")))


def evaluate_loss(model, data, pad_id: int, family: str, device: str, bs: int = 16, base_vocab: int | None = None) -> float:
    """Mean per-token loss over `data` (tokenized examples)."""
    import torch

    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), bs):
            batch = {k: v.to(device) for k, v in collate([data[j] for j in range(i, min(i + bs, len(data)))], pad_id, family).items()}
            s, c = token_losses(model, batch, family, base_vocab)
            tot += s.sum().item()
            n += c.sum().item()
    return tot / max(n, 1)


def train_decoder(cfg: DecoderTrainConfig) -> dict:
    """Run step 06: decoder rows -> a fine-tuned decoder in OUT_DIR (or only the cache)."""
    import torch

    from .runtime import pick_device, progress, seed_everything

    tmeta = check_trainsets(cfg.train_meta, [cfg.out_dec, cfg.out_dec_val], cfg.k, cfg.v)
    K, V = tmeta["K"], tmeta["V"]
    train_rows, val_rows = _rows(cfg.out_dec), _rows(cfg.out_dec_val)
    if not train_rows:
        raise NextSpeedError(f"{cfg.out_dec} is empty: rerun step 04 with more data or a smaller VAL_FRAC")
    for path, rows in ((cfg.out_dec, train_rows), (cfg.out_dec_val, val_rows)):
        for i, r in enumerate(rows[:1000]):
            if len(r["codes"]) != K or min(r["codes"]) < 0 or max(r["codes"]) >= V:
                raise NextSpeedError(f"{path}: row {i + 1} has codes {r['codes']} that do not fit K={K} V={V}: rerun step 04")
    rng = random.Random(cfg.seed)
    if cfg.max_rows and cfg.max_rows < len(train_rows):
        train_rows = rng.sample(train_rows, cfg.max_rows)
    val_rows = random.Random(cfg.seed + 1).sample(val_rows, min(cfg.val_rows, len(val_rows)))

    seed_everything(cfg.seed, cfg.deterministic)
    device = pick_device(cfg.device)
    tok, family, base_path = load_base_tokenizer(cfg.model)
    cond = Conditioning(K=K, V=V, code_mode=cfg.code_mode, add_special_tokens=cfg.add_special_tokens,
                        max_in=cfg.max_in, max_out=cfg.max_out, family=family, base_vocab=len(tok))
    n_before = len(tok)
    add_code_tokens_to_tokenizer(tok, cond)
    subset = f"max_rows={cfg.max_rows};seed={cfg.seed}"
    train_ds, cache_info = cached_tokenize(train_rows, tok, cond, cfg, cfg.out_dec, "train", subset)
    val_ds, _ = cached_tokenize(val_rows, tok, cond, cfg, cfg.out_dec_val, "val", f"val_rows={cfg.val_rows};seed={cfg.seed}")
    if cfg.pretokenize_only:
        log.info("06: tokenized %d train / %d val rows; PRETOKENIZE_ONLY=1, stopping", len(train_ds), len(val_ds))
        return {"pretokenize_only": True, "train_rows": len(train_ds), "val_rows": len(val_ds), "cache": cache_info}

    model = load_base_model(cfg.model, family)
    init_texts: dict[tuple[int, int], list[str]] = {}
    for r in train_rows:
        for k, c in enumerate(r["codes"]):
            lst = init_texts.setdefault((k, c), [])
            if len(lst) < 16:
                lst.append(r["target"])
    added = init_code_embeddings(model, tok, cond, n_before, init_texts)
    sel = select_trainable(model, cfg.train_layers, n_before, cfg.train_code_emb)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    emb = model.get_input_embeddings().weight
    decay = [p for p in params if p.dim() >= 2 and p is not emb]
    no_decay = [p for p in params if not (p.dim() >= 2 and p is not emb)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)

    steps_per_epoch = math.ceil(len(train_ds) / (cfg.train_bs * cfg.grad_accum))
    total = max(1, int(steps_per_epoch * cfg.num_epochs))
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    order: list[int] = []
    g = random.Random(cfg.seed)
    pad_id = tok.pad_token_id
    history, best, best_state = [], {"val_loss": float("inf"), "step": 0}, None
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]

    def snapshot():
        sd = model.state_dict()
        return {n: sd[n].detach().to("cpu", copy=True) for n in trainable_names if n in sd}

    val0 = evaluate_loss(model, val_ds, pad_id, family, device, base_vocab=n_before)
    history.append({"step": 0, "train_loss": float("nan"), "val_loss": val0})
    log.info("06: %s (%s), %d code tokens added, %s of %s parameters trained; val loss before training %.3f",
             cfg.model, family, added, f"{sel['trainable_params']:,}", f"{sel['total_params']:,}", val0)
    t0 = time.perf_counter()
    bar = progress(total=total, desc="06 decoder", unit="step")
    step, run_loss, tokens = 0, [], 0
    stopped = "steps"
    while step < total:
        model.train()
        for _ in range(cfg.grad_accum):
            if not order:
                order = list(range(len(train_ds)))
                g.shuffle(order)
            idx, order = order[: cfg.train_bs], order[cfg.train_bs :]
            batch = {k: v.to(device) for k, v in collate([train_ds[i] for i in idx], pad_id, family).items()}
            with amp:
                s, c = token_losses(model, batch, family, n_before)
                loss = s.sum() / c.sum().clamp(min=1)
            (loss / cfg.grad_accum).backward()
            run_loss.append(loss.item())
            tokens += int(batch["attention_mask"].sum())
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        elapsed = time.perf_counter() - t0
        if cfg.time_budget and step == 3:  # re-plan the schedule to what fits in the budget
            total = max(step + 1, min(total, int(cfg.time_budget * 60 / (elapsed / step))))
            bar.total = total
        out_of_time = cfg.time_budget is not None and elapsed > cfg.time_budget * 60
        if step % cfg.eval_every == 0 or step == total or out_of_time:
            vl = evaluate_loss(model, val_ds, pad_id, family, device, base_vocab=n_before)
            rec = {"step": step, "train_loss": sum(run_loss) / len(run_loss), "val_loss": vl, "lr": lr,
                   "seconds": round(time.perf_counter() - t0, 1), "tokens_per_s": round(tokens / (time.perf_counter() - t0), 1)}
            history.append(rec)
            run_loss = []
            bar.set_postfix(train=f"{rec['train_loss']:.3f}", val=f"{vl:.3f}")
            log.info("06 step %d/%d: train %.3f val %.3f (%.0fs)", step, total, rec["train_loss"], vl, rec["seconds"])
            if vl < best["val_loss"]:
                best = {"val_loss": vl, "step": step}
                best_state = snapshot()
        if out_of_time:
            stopped = "time budget"
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    elapsed = time.perf_counter() - t0
    info = {"kind": "decoder", "base_model": cfg.model, "base_path": base_path, "train": to_dict(cfg), "K": K, "V": V,
            "selection": sel, "code_tokens_added": added, "best": best, "history": history, "steps": step,
            "stopped_by": stopped, "seconds": round(elapsed, 1), "val_loss_before": val0,
            "inputs": {p: {"sha256": sha256_path(p)} for p in (cfg.out_dec, cfg.out_dec_val)},
            "rvq_sha256": tmeta.get("rvq_sha256"), "rvq_path": tmeta.get("rvq_path"), "versions": versions(),
            "tokenization_cache": cache_info}
    model.to("cpu")
    save_decoder(model, tok, cond, cfg.out_dir, info)
    plot_curve([h for h in history if h["step"] > 0] or history, Path(cfg.out_dir) / "curve.png", f"decoder ({cfg.code_mode})")
    log.info("06: %d steps in %.0fs, best val loss %.3f (from %.3f) -> %s", step, elapsed, best["val_loss"], val0, cfg.out_dir)
    return info


# ---------------------------------------------------------------------- what codes buy

@dataclass
class DecoderEvalConfig:
    """eval-decoder knobs: per-token validation loss with true codes, shuffled codes, and no codes."""

    out_dir: str = knob("out/decoder", env="OUT_DIR", help="decoder trained with codes")
    none_dir: str = knob("out/decoder_none", env="NONE_DIR", help="decoder trained with CODE_MODE=none, same budget")
    out_dec_val: str = knob("data/decoder_val.jsonl", env="OUT_DEC_VAL", help="validation rows (step 04)")
    val_rows: int = knob(300, env="VAL_ROWS", min=1, help="validation rows scored")
    out_json: str = knob("out/decoder_eval.json", env="OUT_JSON", help="where to write the report JSON")
    device: str = knob("auto", env="DEVICE", help="auto, cpu, cuda, cuda:N or mps")
    seed: int = knob(0, env="SEED", help="seed for the row sample and the code shuffle")


def eval_decoder(cfg: DecoderEvalConfig) -> dict:
    """Codes are worth something only if the true-code loss is clearly below the other two."""
    from .decoder_model import load_decoder
    from .runtime import pick_device

    device = pick_device(cfg.device)
    rows = _rows(cfg.out_dec_val)
    if not rows:
        raise NextSpeedError(f"{cfg.out_dec_val} is empty: rerun step 04 with VAL_FRAC > 0")
    rows = random.Random(cfg.seed).sample(rows, min(cfg.val_rows, len(rows)))
    model, tok, cond, meta = load_decoder(cfg.out_dir, device)
    if cond.code_mode == "none":
        raise NextSpeedError(f"{cfg.out_dir} was trained with CODE_MODE=none: point OUT_DIR at a decoder trained with codes")
    shuffled = [r["codes"] for r in rows]
    random.Random(cfg.seed + 1).shuffle(shuffled)

    def loss(m, t, c, codes_list):
        data = [encode_example(t, c, r["context"], codes, r["target"]) for r, codes in zip(rows, codes_list)]
        return evaluate_loss(m, data, t.pad_token_id, c.family, device, base_vocab=c.base_vocab)

    res = {"rows": len(rows), "code_mode": cond.code_mode,
           "true_codes": loss(model, tok, cond, [r["codes"] for r in rows]),
           "shuffled_codes": loss(model, tok, cond, shuffled)}
    if Path(cfg.none_dir).is_dir():
        m2, t2, c2, meta2 = load_decoder(cfg.none_dir, device)
        res["no_codes_decoder"] = loss(m2, t2, c2, [r["codes"] for r in rows])
        res["budgets"] = {"codes": {"steps": meta["steps"], "seconds": meta["seconds"]},
                          "none": {"steps": meta2["steps"], "seconds": meta2["seconds"]}}
    else:
        res["no_codes_decoder"] = None
        res["note"] = f"no CODE_MODE=none decoder in {cfg.none_dir}: train one with `CODE_MODE=none uv run python 06_train_decoder.py`"
    write_json(cfg.out_json, res)
    return res


def format_decoder_eval(res: dict) -> str:
    import math as _m

    lines = [f"decoder per-token validation loss on {res['rows']} rows (perplexity in brackets)"]
    for name, key in (("true codes", "true_codes"), ("shuffled codes", "shuffled_codes"), ("no-codes decoder", "no_codes_decoder")):
        v = res.get(key)
        lines.append(f"  {name:<18} " + (f"{v:.4f} ({_m.exp(v):.1f})" if v is not None else "n/a"))
    if res.get("note"):
        lines.append("  " + res["note"])
    return "\n".join(lines)


__all__ = ["DecoderTrainConfig", "train_decoder", "DecoderEvalConfig", "eval_decoder"]
