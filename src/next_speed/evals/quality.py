"""Whole-text quality: is the loop's text better than plain sampling from a model of the same size?

The measures of `bench/bench_quality.py`, each a pure function over texts, plus the prompt sets
and the two token-level baselines it compares the loop with:

- coherence, cos(prompt, text), and closeness to what a person wrote next, cos(text, reference),
  with the project's own sentence encoder (the Large Concept Models paper's coherence, LCM team
  2024, sec. 2.4);
- rep-n and diversity as SimCTG defines them (Su et al. 2022, "A Contrastive Framework for Neural
  Text Generation", sec. 5.1): rep-n = 1 - unique n-grams / all n-grams over whitespace tokens,
  pooled over the texts; diversity = prod_{n=2..4} (1 - rep-n);
- MAUVE (Pillutla et al. 2021, the `mauve-text` package) between the systems' texts and the human
  continuations, on features from a causal LM's last hidden state at the text's last token (what
  MAUVE does with GPT-2; here the packaged base LM);
- sentences delivered of those asked.

Baselines: nucleus sampling (Holtzman et al. 2020) through transformers' `generate`, and
contrastive search (Su et al. 2022). transformers 5 moved contrastive search out of the library
into a Hub repository (`transformers-community/contrastive-search`), which an offline machine
cannot load, so `contrastive_search` implements the paper's rule here: among the top-k tokens,
pick argmax (1 - alpha) p(v) - alpha max_j cos(h_v, h_j) over the hidden states h_j of the text so far.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import StoppingCriteria

from next_speed.core.artifacts import read_jsonl
from next_speed.core.errors import NextSpeedError

log = logging.getLogger(__name__)

# A sentence is complete when it ends with terminal punctuation, closing quotes or brackets allowed.
_COMPLETE = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]]*$")
# An ended sentence followed by the start of another: the point where a continuation has one more sentence.
_BOUNDARY = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]]*\s+\S")


@dataclass
class PromptItem:
    """One prompt of a prompt set: the document's first sentences and what a person wrote next."""

    set: str
    doc: str
    prompt_sents: list[str]
    reference_sents: list[str]

    @property
    def prompt(self) -> str:
        return " ".join(self.prompt_sents)

    @property
    def reference(self) -> str:
        return " ".join(self.reference_sents)


@dataclass
class TextOut:
    """One system's text for one prompt and seed."""

    text: str
    tokens: int  # decoder tokens of the kept text
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------- prompt sets


def windows(
    doc_sents: Sequence[str], n_prompt: int, n_ref: int, rng: random.Random | None = None
) -> tuple[list, list] | None:
    """(prompt sentences, reference sentences) of one document: its first `n_prompt` sentences and
    the `n_ref` after them, or with `rng` a window at a random place (long documents); None when the
    document is too short."""
    need = n_prompt + n_ref
    if len(doc_sents) < need:
        return None
    start = 0 if rng is None else rng.randrange(0, len(doc_sents) - need + 1)
    return list(doc_sents[start : start + n_prompt]), list(doc_sents[start + n_prompt : start + need])


def main_prompt_set(
    dec_val: str, n: int, seed: int = 0, n_prompt: int = 2, n_ref: int = 3, top_up: Iterable[tuple[str, list[str]]] = ()
) -> list[PromptItem]:
    """Prompts from the validation documents of step 04 (`dec_val`, never trained on) with at least
    `n_prompt + n_ref` sentences, in a seeded order; when they are fewer than `n`, documents of
    `top_up` ((id, sentences) pairs the run never read) fill the set."""
    docs: dict[int, list[dict]] = {}
    for r in read_jsonl(dec_val, required=("doc", "pos", "target")):
        docs.setdefault(r["doc"], []).append(r)
    items = []
    for d, rows in sorted(docs.items()):
        rows.sort(key=lambda r: r["pos"])
        w = windows([r["target"] for r in rows], n_prompt, n_ref)
        if w:
            items.append(PromptItem("main", f"val:{d}", *w))
    random.Random(seed).shuffle(items)
    if len(items) < n:
        for doc_id, sents in top_up:
            w = windows(sents, n_prompt, n_ref)
            if w:
                items.append(PromptItem("main", doc_id, *w))
                if len(items) >= n:
                    break
    if len(items) < n:
        log.warning(
            "only %d held-out documents with %d sentences for the main prompt set (asked %d)",
            len(items),
            n_prompt + n_ref,
            n,
        )
    return items[:n]


def other_prompt_set(
    docs: Sequence[tuple[str, str]],
    n: int,
    split: Callable[[str], list[str]],
    seed: int = 0,
    n_prompt: int = 2,
    n_ref: int = 3,
    excerpt: int = 3000,
) -> list[PromptItem]:
    """Prompts from another corpus (no training on it): from `n` documents ((id, text) pairs) in a
    seeded order, one window each at a seeded random place. Only an excerpt of `excerpt`
    characters is split (long documents), and its first and last sentences, which the cut may
    have broken, are dropped."""
    rng = random.Random(seed)
    order = list(docs)
    rng.shuffle(order)
    items = []
    for doc_id, text in order:
        off = rng.randrange(0, max(1, len(text) - excerpt))
        sents = split(text[off : off + excerpt])[1:-1]
        w = windows(sents, n_prompt, n_ref)
        if w:
            items.append(PromptItem("other", f"{doc_id}@{off}", *w))
            if len(items) >= n:
                break
    return items


# ---------------------------------------------------------------------- measures


def rep_n(texts: Sequence[str], n: int) -> float:
    """SimCTG's rep-n: 1 - unique n-grams / all n-grams, whitespace tokens, pooled over the texts
    (each text's n-grams counted within that text)."""
    uniq = total = 0
    for t in texts:
        w = t.split()
        grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
        uniq += len(set(grams))
        total += len(grams)
    return 1.0 - uniq / total if total else 0.0


def diversity(texts: Sequence[str]) -> float:
    """SimCTG's diversity: prod over n = 2, 3, 4 of (1 - rep-n)."""
    return float(np.prod([1.0 - rep_n(texts, n) for n in (2, 3, 4)]))


def complete_sentences(text: str, split: Callable[[str], list[str]]) -> int:
    """Sentences of `text` that end (terminal punctuation), as split by `split`."""
    return sum(1 for s in split(text) if _COMPLETE.search(s.strip()))


def first_sentences(text: str, n: int, split: Callable[[str], list[str]]) -> str:
    """The first `n` sentences of a continuation (a token-level sampler writes on past them)."""
    return " ".join(split(text)[:n]).strip()


def ended_sentences(text: str) -> int:
    """Sentence ends followed by more text: a cheap count while sampling (no splitter)."""
    return len(_BOUNDARY.findall(text))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (N, D) arrays; 0 where either row is zero (an empty text)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return np.where((na > 0) & (nb > 0), (a * b).sum(1) / np.maximum(na * nb, 1e-12), 0.0)


def embed_texts(embed: Callable[[list[str]], np.ndarray], texts: Sequence[str]) -> np.ndarray:
    """Unit embeddings of whole texts; an empty text gets the zero vector (cosine 0 with anything)."""
    idx = [i for i, t in enumerate(texts) if t.strip()]
    vecs = embed([texts[i] for i in idx]) if idx else np.zeros((0, 1), np.float32)
    out = np.zeros((len(texts), vecs.shape[1] if idx else 1), np.float32)
    if idx:
        out[idx] = vecs
    return out


def lm_features(model, tok, texts: Sequence[str], max_len: int = 256, bs: int = 16) -> np.ndarray:
    """MAUVE features: the LM's last hidden state at each text's last token (N, H), as MAUVE
    featurizes with GPT-2. An empty text is read as the end-of-sequence token alone."""
    import torch

    feats = []
    old_side = tok.padding_side
    tok.padding_side = "right"
    try:
        for i in range(0, len(texts), bs):
            chunk = [t if t.strip() else (tok.eos_token or " ") for t in texts[i : i + bs]]
            enc = tok(
                chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_len, add_special_tokens=False
            )
            with torch.inference_mode():
                out = model(**enc, output_hidden_states=True)
            last = enc["attention_mask"].sum(1) - 1  # (B,)
            h = out.hidden_states[-1][torch.arange(len(chunk)), last]  # (B, H)
            feats.append(h.float().cpu().numpy())
    finally:
        tok.padding_side = old_side
    return np.concatenate(feats) if feats else np.zeros((0, 1), np.float32)


def mauve_score(p_feats: np.ndarray, q_feats: np.ndarray, seed: int = 0, buckets: int | None = None) -> dict:
    """MAUVE of q (a system's texts) against p (the human continuations), `mauve-text`'s
    defaults except the number of k-means buckets: `buckets` (default: a fifth of the smaller
    sample, at least 4; the package's own default, a tenth, leaves too few buckets to tell
    distributions of about a hundred texts apart)."""
    import mauve

    n = min(len(p_feats), len(q_feats))
    if n < 8:
        raise NextSpeedError(f"MAUVE needs at least 8 texts per side, got {n}")
    k = buckets or max(4, n // 5)
    out = mauve.compute_mauve(
        p_features=p_feats, q_features=q_feats, num_buckets=k, seed=seed, device_id=-1, verbose=False
    )
    return {"mauve": round(float(out.mauve), 4), "p": len(p_feats), "q": len(q_feats), "buckets": k}


def text_measures(
    texts: Sequence[str],
    prompts_emb: np.ndarray,
    refs_emb: np.ndarray,
    texts_emb: np.ndarray,
    asked: int,
    split: Callable[[str], list[str]],
) -> dict:
    """Every per-system measure but MAUVE and speed, over texts aligned with their prompts' and
    references' embeddings."""
    coh = cosines(prompts_emb, texts_emb)
    ref = cosines(texts_emb, refs_emb)
    delivered = [min(asked, complete_sentences(t, split)) / asked for t in texts]
    return {
        "coherence": round(float(coh.mean()), 4),
        "ref_sim": round(float(ref.mean()), 4),
        "rep2": round(rep_n(texts, 2), 4),
        "rep3": round(rep_n(texts, 3), 4),
        "rep4": round(rep_n(texts, 4), 4),
        "diversity": round(diversity(texts), 4),
        "sentences": round(float(np.mean(delivered)), 4),
        "empty": sum(1 for t in texts if not t.strip()),
        "n": len(texts),
    }


def plan_gap(oracle_ref: float, loop_ref: float, base_ref: float) -> float:
    """Where the loop's text stands between plain sampling's (1) and the true plan's (0)."""
    den = oracle_ref - base_ref
    return round((oracle_ref - loop_ref) / den, 4) if abs(den) > 1e-9 else float("nan")


# ---------------------------------------------------------------------- token-level baselines


def plain_decoder_sampling(gen, prompt: str, n_tokens: int, seed: int) -> tuple[int, float]:
    """The speed baseline of the loop's benchmarks: plain token-level sampling from the
    generator's own decoder (`generate`, the loop's TEMP and TOP_P, no plan, no rerank), exactly
    `n_tokens` new tokens after `prompt`. Returns (tokens written, seconds)."""
    torch = gen.torch
    ids = gen.tok(prompt + "\n", return_tensors="pt").to(gen.device)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = gen.model.generate(
            **ids,
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,
            do_sample=True,
            top_p=gen.params.top_p,
            temperature=gen.params.temp,
            pad_token_id=gen.tok.pad_token_id,
        )
    return out.shape[1] - ids["input_ids"].shape[1], time.perf_counter() - t0


class EnoughSentences(StoppingCriteria):
    """A row is done once its new text (the tokens from `start` on) holds `n_sents` ended sentences
    and the start of another."""

    def __init__(self, tok, start: int, n_sents: int):
        self.tok, self.start, self.n_sents = tok, start, n_sents

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tok.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([ended_sentences(t) >= self.n_sents for t in texts], device=input_ids.device)


def nucleus_sample_texts(
    model,
    tok,
    prompts: Sequence[str],
    n_sents: int,
    seed: int,
    *,
    temp: float,
    top_p: float,
    repetition_penalty: float,
    max_new_tokens: int,
) -> list[str]:
    """Plain nucleus sampling of continuations of a batch of prompts (left-padded), each stopped
    once it has written `n_sents` sentences and begun another; the raw continuations."""
    import torch
    from transformers import StoppingCriteriaList

    enc = _left_padded(tok, prompts)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=temp,
            top_p=top_p,
            top_k=0,
            repetition_penalty=repetition_penalty,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            stopping_criteria=StoppingCriteriaList([EnoughSentences(tok, enc["input_ids"].shape[1], n_sents)]),
        )
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _left_padded(tok, prompts: Sequence[str]) -> dict:
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        return dict(tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False))
    finally:
        tok.padding_side = old


def contrastive_search(
    model, tok, prompts: Sequence[str], n_sents: int, *, alpha: float = 0.6, k: int = 4, max_new_tokens: int = 144
) -> list[str]:
    """Contrastive search (Su et al. 2022, eq. 5) for a batch of prompts, deterministic: at each
    step the top-`k` tokens are each run one step further (the batch's cache repeated k times),
    and the token maximizing (1 - alpha) p(v | x) - alpha max_j cos(h_v, h_j) is kept, h_j the
    last-layer hidden states of the prompt and the text so far. A row stops at the end-of-sequence
    token or once it has `n_sents` sentences and the start of another."""
    import torch
    import torch.nn.functional as F

    enc = _left_padded(tok, prompts)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    B = ids.shape[0]
    rows = torch.arange(B)
    with torch.inference_mode():
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, output_hidden_states=True)
        past = out.past_key_values
        ctx_h = F.normalize(out.hidden_states[-1].float(), dim=-1)  # (B, T, H)
        ctx_ok = mask.bool()  # (B, T): padding never counts as context
        logits = out.logits[:, -1].float()  # (B, V)
        new = torch.zeros(B, 0, dtype=torch.long)
        done = torch.zeros(B, dtype=torch.bool)
        eos = tok.eos_token_id
        for _ in range(max_new_tokens):
            top_p, top_i = torch.softmax(logits, -1).topk(k, -1)  # (B, k)
            past.batch_repeat_interleave(k)
            m = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
            step_pos = mask.sum(-1, keepdim=True)  # (B, 1): the new token's position
            o = model(
                input_ids=top_i.reshape(B * k, 1),
                attention_mask=m.repeat_interleave(k, 0),
                position_ids=step_pos.repeat_interleave(k, 0),
                cache=past,
                use_cache=True,
                output_hidden_states=True,
            )
            h = F.normalize(o.hidden_states[-1][:, -1].float(), dim=-1).view(B, k, -1)  # (B, k, H)
            sim = torch.einsum("bkh,bth->bkt", h, ctx_h).masked_fill(~ctx_ok[:, None, :], -1.0).amax(-1)  # (B, k)
            best = ((1 - alpha) * top_p - alpha * sim).argmax(-1)  # (B,)
            sel = rows * k + best
            past.batch_select_indices(sel)
            tok_new = top_i[rows, best]
            tok_new = torch.where(done, torch.full_like(tok_new, tok.pad_token_id), tok_new)
            new = torch.cat([new, tok_new[:, None]], 1)
            ctx_h = torch.cat([ctx_h, h[rows, best][:, None]], 1)
            ctx_ok = torch.cat([ctx_ok, (~done)[:, None]], 1)
            mask = m
            logits = o.logits[sel, -1].float()
            done |= tok_new == eos
            texts = tok.batch_decode(new, skip_special_tokens=True)
            done |= torch.tensor([ended_sentences(t) >= n_sents for t in texts])
            if bool(done.all()):
                break
    return tok.batch_decode(new, skip_special_tokens=True)
