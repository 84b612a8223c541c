"""The decoding engine: sentence steps of one or many generations rendered in one decoder batch.

A sentence step is a prompt (context, exemplars, plan) and N candidates sampled from it. The
engine
1. keeps each generation's prompt KV cache from one sentence to the next and prefills only the
   tokens after the longest common prefix with the previous prompt (automatic prefix caching as
   in vLLM, Kwon et al. 2023, kept per generation);
2. reads the prompt once and copies its keys/values to the candidates (not once per candidate);
3. stacks the steps of several generations, left-padded, into one persistent batch
   (`DecodeBatch`) that steps join between two tokens and leave when all their candidates have
   ended (continuous batching with iteration-level scheduling; Orca, Yu et al. 2022);
4. drops a row from the batch as soon as it ends its sentence (end of sequence or a newline), so
   ended candidates stop costing;
5. keeps the batch's keys/values in buffers with room for the step's tokens and for more rows
   (`RoomyLayer`), so a token is written in place instead of copying the whole cache (transformers'
   DynamicCache concatenates, a copy of every row at every token), a job whose prompt fits the
   batch's columns joins by writing its own rows, and a row that ends is replaced by the batch's
   last row (the slot reuse of paged serving engines, without pages): a join or an end copies the
   rows concerned, not the whole batch's cache (the costs: docs/design.md, "The engine").

Each job samples with its own seeded generator and its own settings, so with fp32 weights a job's
text does not depend on what it was batched with (in bf16, the rounding of other batch shapes can
change a token: see `runtime.resolve_dtype`). Causal decoders only; `render_hf` is the straightforward
reference (transformers' `generate` on the whole prompt) and serves seq2seq decoders.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import LogitsProcessor, LogitsProcessorList

from next_speed.generation.roomy_cache import RoomyLayer
from next_speed.models.decoder_model import plan_injector

log = logging.getLogger(__name__)


class SentenceOnly(LogitsProcessor):
    """A logits processor applied to the generated sentence only (the tokens from `start` on), for
    transformers' `generate` on a whole prompt (the reference engine, `render_hf`)."""

    def __init__(self, inner, start: int):
        self.inner, self.start = inner, start

    def __call__(self, input_ids, scores):
        return self.inner(input_ids[:, self.start :], scores)


def roomy_layer(keys, values, room: int, rows: int | None = None):
    """A cache layer holding `keys`/`values` (R, H, T, D) with `room` free positions after them
    and room for `rows` rows in all."""

    return RoomyLayer.of(keys, values, room, rows)


@dataclass
class PromptCache:
    """One generation's last prompt and its keys/values (batch 1), reused by its next sentence."""

    ids: list[int] = field(default_factory=list)
    kv: Any = None  # transformers DynamicCache
    clean: int = 0  # leading positions whose keys/values do not depend on the plan (CODE_MODE=inject)
    reused: int = 0  # prompt tokens read from the cache, over the generation's life
    prefilled: int = 0  # prompt tokens run through the model


class PrefixPool:
    """One generation's prompt caches for plan-parallel rendering (PARALLEL > 1): the prompts of
    its steps and drafts and its verification rows share long prefixes (the text so far), so a
    prompt starts from the kept cache with the longest common prefix and only its new tokens are
    prefilled: automatic prefix caching (vLLM's, across requests; here within one generation).
    At most `size` caches are kept, the oldest dropped."""

    def __init__(self, size: int = 8):
        self.size = size
        self.caches: list[PromptCache] = []
        self.reused = self.prefilled = 0  # prompt tokens read from the pool, and run through the model

    def take(self, ids: Sequence[int], limit: int | None = None) -> PromptCache:
        """A new PromptCache holding a copy of the longest kept prefix of `ids` (at most `limit`
        positions): the jobs of one batch never share a cache."""
        limit = len(ids) - 1 if limit is None else limit
        best, L = None, 0
        for c in self.caches:
            if c.kv is not None:
                n = _common_prefix(c.ids[: min(c.clean, limit)], ids)
                if n > L:
                    best, L = c, n
        out = PromptCache()
        if best is not None:
            from transformers import DynamicCache

            kv = DynamicCache()
            for li, layer in enumerate(best.kv.layers):
                kv.update(layer.keys[:, :, :L], layer.values[:, :, :L], li)
            out.kv, out.ids, out.clean = kv, list(ids[:L]), L
        return out

    def longest(self, ids: Sequence[int], limit: int | None = None) -> int:
        """How many leading tokens of `ids` (at most `limit`) `take` would read from a kept cache."""
        limit = len(ids) - 1 if limit is None else limit
        return max(
            (_common_prefix(c.ids[: min(c.clean, limit)], ids) for c in self.caches if c.kv is not None), default=0
        )

    def put(self, cache: PromptCache | None) -> None:
        if cache is not None and cache.kv is not None and all(c is not cache for c in self.caches):
            self.caches = (self.caches + [cache])[-self.size :]


@dataclass
class SentenceJob:
    """One sentence step: `n` candidates for one prompt. `out` is filled by the engine:
    [{"text", "ended", "tokens"}] per candidate; `ended` is False when the candidate reached
    `max_new_tokens` before ending its sentence (truncated)."""

    prompt: list[int]
    n: int
    params: Any  # generate.GenParams
    seed: int
    planned: list[int] = field(default_factory=list)  # the plan this step renders
    plan_start: int | None = None  # CODE_MODE=inject: the plan vector is added from this position on
    cache: PromptCache | None = None
    context: str = ""
    exemplars: list[str] = field(default_factory=list)
    # Called with a candidate's text up to its last whitespace (complete words only) whenever that
    # grows; True stops the candidate there (`out[i]["vetoed"]`). The generation loop passes its
    # copy guard, so a candidate that its stop rules would refuse stops costing when the copy shows.
    veto: Callable[[str], bool] | None = None
    # Token ids of the earlier sentences (generate.copy_ids): no candidate writes a run of
    # `params.no_copy_ngram` tokens found there.
    earlier_ids: list[int] | None = None
    # Token ids of the sentences this generation wrote (generate.copy_ids): no candidate repeats a
    # run of `params.no_repeat_written` tokens of theirs.
    written_ids: list[int] | None = None
    # Continuing running text (a plain LM, not the decoder, which writes one sentence per line):
    # a candidate ends where its first sentence ends, i.e. when the next token starts another.
    one_sentence: bool = False
    engine: str = "decoder"  # which of the generator's engines renders the job: "decoder" or "base"
    # PARALLEL > 1: the generation's prefix pool; the prompt starts from its best cache (not `cache`) and joins it
    pool: PrefixPool | None = None
    out: list[dict] | None = None


class _KeepColumn:
    """A logits processor that runs `inner` but leaves token `keep`'s score as it was."""

    def __init__(self, inner: Callable, keep: int):
        self.inner, self.keep = inner, keep

    def __call__(self, input_ids, scores):
        kept = scores[:, self.keep].clone()
        scores = self.inner(input_ids, scores)
        scores[:, self.keep] = kept
        return scores


def sentence_processors(
    p: Any,
    earlier_ids: Sequence[int] | None = None,
    end_id: int | None = None,
    written_ids: Sequence[int] | None = None,
) -> list:
    """HF's repetition penalty and no-repeat-n-gram processors, applied to the sentence being
    written only (the processors get the sentence's own tokens): the prompt (context, exemplars)
    is meant to be echoed, a loop within the sentence is not ("Canada, Canada, Canada, ...").
    With `earlier_ids`, HF's encoder-no-repeat-n-gram processor (made to keep a summary from
    copying its source) over the earlier sentences' tokens: a candidate that starts copying the
    sentence before it is steered off the copy at its NO_COPY_NGRAM-th token, where the copy
    guard would otherwise refuse the whole candidate a few words later. That ban never bans
    `end_id` (end of sequence, the separator of `generate.copy_ids`): ending a sentence whose last
    words an earlier one also ends with is no copy, and banning the end made the decoder append
    a stray token to a finished sentence ("... region.LEGATO")."""
    import torch
    from transformers import (
        EncoderNoRepeatNGramLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    procs = []
    if p.repetition_penalty > 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.no_repeat_ngram > 0:
        procs.append(NoRepeatNGramLogitsProcessor(p.no_repeat_ngram))
    if getattr(p, "no_copy_ngram", 0) > 0 and earlier_ids:
        ban = EncoderNoRepeatNGramLogitsProcessor(p.no_copy_ngram, torch.tensor([list(earlier_ids)], dtype=torch.long))
        procs.append(ban if end_id is None else _KeepColumn(ban, end_id))
    if getattr(p, "no_repeat_written", 0) > 0 and written_ids:
        # the same ban with a shorter run over the generated sentences alone (the prompt exempt):
        # a text that restates its own sentence openings ("He was a German ... He was a German")
        ban = EncoderNoRepeatNGramLogitsProcessor(
            p.no_repeat_written, torch.tensor([list(written_ids)], dtype=torch.long)
        )
        procs.append(ban if end_id is None else _KeepColumn(ban, end_id))
    return procs


def nucleus_sample(logits, top_p: float, generator, k: int = 256):
    """One token per row (a,) from the smallest set of most probable tokens whose mass reaches
    `top_p` (Holtzman et al. 2020), the same set as transformers' TopPLogitsWarper. The set is
    looked for among the top `k` tokens first (a partial sort: sorting the whole 49k vocabulary
    for every row and step cost more than the rest of sampling); a row whose top `k` hold less
    than `top_p` falls back to the whole vocabulary."""
    import torch

    probs = torch.softmax(logits.float(), -1).cpu()  # (a, V)
    k = min(k, probs.shape[-1])
    top, idx = probs.topk(k, -1)  # (a, k), most probable first
    if top_p < 1.0 and bool((top.sum(-1) >= top_p).all()):
        before = top.cumsum(-1) - top  # mass of the more probable tokens
        top = top.masked_fill(before >= top_p, 0.0)  # the first token always stays
    else:
        top, idx = probs.sort(-1, descending=True)
        if top_p < 1.0:
            top = top.masked_fill(top.cumsum(-1) - top >= top_p, 0.0)
    pick = torch.multinomial(top, 1, generator=generator)  # (a, 1); multinomial renormalizes
    return idx.gather(-1, pick).flatten()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DecodeEngine:
    """Renders SentenceJobs with a causal decoder; one per loaded decoder, not thread-safe (the
    caller serializes calls)."""

    def __init__(self, model, tok, bad_ids: Sequence[int], device: str):
        import torch

        self.torch, self.model, self.tok, self.device = torch, model, tok, device
        vocab = model.get_output_embeddings().weight.shape[0]
        self.bad = torch.tensor(sorted(i for i in bad_ids if i < vocab), dtype=torch.long)
        # Tokens that end a sentence: end of sequence, and every token whose text holds a newline
        # (the decoder writes one sentence per line).
        texts = tok.batch_decode([[i] for i in range(min(len(tok), vocab))])
        stop = torch.zeros(vocab, dtype=torch.bool)
        stop[[i for i, t in enumerate(texts) if "\n" in t]] = True
        if tok.eos_token_id is not None:
            stop[tok.eos_token_id] = True
        self.stop = stop
        self.stop_ids = stop.nonzero().flatten().tolist()
        self._stop_set = set(self.stop_ids)

    # ------------------------------------------------------------------ prompts
    def _injector(self):

        return plan_injector(self.model)

    def _reuse(self, job: SentenceJob) -> tuple[PromptCache, int]:
        """The job's prompt cache, cut to what it can reuse of the job's prompt (the pool's best
        prefix, or what its previous prompt shares with this one, short of the last token, whose
        logits are needed, and of positions that carried the previous plan), and that length."""
        ids = job.prompt
        if job.pool is not None:
            job.cache = job.pool.take(ids, job.plan_start)
        c = job.cache if job.cache is not None else PromptCache()
        L = _common_prefix(c.ids[: min(c.clean, len(ids) - 1)], ids) if c.kv is not None else 0
        if L == 0:
            c.kv = None
        elif c.kv.get_seq_length() > L:
            c.kv.crop(L - c.kv.get_seq_length())  # a negative count: tokens removed from the end
        return c, L

    def _packed(self, prefixes: Sequence[tuple[Any, int]], news: Sequence[Sequence[int]], keep):
        """One forward over several rows packed into one sequence, no padding: their cached
        prefixes (DynamicCache or None, length) side by side, then their new tokens, each row
        attending to its own prefix and its own earlier tokens only (a block-diagonal causal
        mask) at its own positions. `keep`: the packed new-token positions whose logits are
        returned, (len(keep), V). Returns (logits, the packed cache, each row's (prefix offset,
        new-token offset, prefix length, new-token count)), the last two for `_row_cache`."""
        from transformers import DynamicCache

        torch = self.torch
        Ls = [L for _, L in prefixes]
        Ns = [len(n) for n in news]
        SL, SN = sum(Ls), sum(Ns)
        if len(prefixes) == 1 and prefixes[0][0] is not None:
            kv = prefixes[0][0]
        elif SL:
            kv = DynamicCache()
            ref = next(c for c, L in prefixes if L)
            for li in range(len(ref.layers)):
                parts = [c.layers[li] for c, L in prefixes if L]
                kv.update(torch.cat([x.keys for x in parts], 2), torch.cat([x.values for x in parts], 2), li)
        else:
            kv = DynamicCache(config=self.model.config)
        layout, p0, n0 = [], 0, 0
        for L, N in zip(Ls, Ns):
            layout.append((p0, n0))
            p0, n0 = p0 + L, n0 + N
        mask = None
        if len(prefixes) > 1:  # query token i of row b sees row b's prefix and row b's new tokens up to i
            mask = torch.zeros(1, 1, SN, SL + SN, dtype=torch.bool)
            for (p0, n0), L, N in zip(layout, Ls, Ns):
                mask[0, 0, n0 : n0 + N, p0 : p0 + L] = True
                mask[0, 0, n0 : n0 + N, SL + n0 : SL + n0 + N] = torch.ones(N, N, dtype=torch.bool).tril()
            mask = mask.to(self.device)
        inp = torch.tensor([[t for n in news for t in n]], device=self.device)
        pos = torch.tensor([[L + i for L, N in zip(Ls, Ns) for i in range(N)]], device=self.device)
        out = self.model(
            input_ids=inp,
            attention_mask=mask,
            position_ids=pos,
            cache=kv,
            use_cache=True,
            logits_to_keep=torch.tensor(list(keep), device=self.device),
        )
        return out.logits[0], kv, [(p0, n0, L, N) for (p0, n0), L, N in zip(layout, Ls, Ns)]

    def _row_cache(self, kv, layout: list, b: int):
        """Row `b`'s own cache (its prefix, then its new tokens) out of a `_packed` cache."""
        from transformers import DynamicCache

        if len(layout) == 1:
            return kv
        torch = self.torch
        p0, n0, L, N = layout[b]
        SL = sum(x[2] for x in layout)
        own = DynamicCache()
        for li, layer in enumerate(kv.layers):
            keys = torch.cat([layer.keys[:, :, p0 : p0 + L], layer.keys[:, :, SL + n0 : SL + n0 + N]], 2)
            values = torch.cat([layer.values[:, :, p0 : p0 + L], layer.values[:, :, SL + n0 : SL + n0 + N]], 2)
            own.update(keys, values, li)
        return own

    def prefill(self, jobs: Sequence[SentenceJob]) -> list:
        """Bring each job's prompt cache up to its prompt; returns each one's last-position logits
        (1, V). Prompts are prefilled together, packed into one forward (`_packed`: the weights
        are read once), except where a prompt shares more with one before it than with any
        cache kept (then that one is prefilled first and joins the pool) and with CODE_MODE=inject
        (whose plan vector is added per prompt)."""
        inj = self._injector()
        if inj is not None:
            return [self._prefill_group([j])[0] for j in jobs]
        out: list = []
        group: list[SentenceJob] = []
        for j in jobs:
            if group and j.pool is not None:
                limit = len(j.prompt) - 1 if j.plan_start is None else j.plan_start
                inside = max((_common_prefix(g.prompt[:limit], j.prompt) for g in group if g.pool is j.pool), default=0)
                if inside > j.pool.longest(j.prompt, limit):
                    out += self._prefill_group(group)
                    group = []
            group.append(j)
        return out + self._prefill_group(group)

    def _prefill_group(self, jobs: Sequence[SentenceJob]) -> list:
        torch = self.torch
        reused = [self._reuse(j) for j in jobs]
        inj = self._injector()
        job = jobs[0]
        plan = (
            inj.plan([job.planned], [job.plan_start])
            if inj is not None and job.plan_start is not None
            else contextlib.nullcontext()
        )
        keep, at = [], 0
        for j, (_, L) in zip(jobs, reused):
            at += len(j.prompt) - L
            keep.append(at - 1)  # each prompt's last position
        with torch.inference_mode(), plan:
            logits, kv, layout = self._packed(
                [(c.kv, L) for c, L in reused], [j.prompt[L:] for j, (_, L) in zip(jobs, reused)], keep
            )
        firsts = []
        for b, (j, (c, L)) in enumerate(zip(jobs, reused)):
            ids = j.prompt
            c.kv = self._row_cache(kv, layout, b)
            c.ids = list(ids)
            c.clean = j.plan_start if j.plan_start is not None else len(ids)
            c.reused += L
            c.prefilled += len(ids) - L
            j.cache = c
            if j.pool is not None:
                j.pool.reused += L
                j.pool.prefilled += len(ids) - L
                j.pool.put(c)
            firsts.append(logits[b : b + 1].float())
        return firsts

    def token_logprobs(self, ids: Sequence[int], start: int, pool: PrefixPool | None = None) -> list[float]:
        """The decoder's log-probability of each token `ids[start:]` given the tokens before it
        (plain causal scoring, no plan), reading what it can of `ids[:start]` from `pool`, which
        then keeps `ids`' cache."""
        return self.score_rows([(ids, start)], pool)[0]

    def score_rows(
        self, seqs: Sequence[tuple[Sequence[int], int]], pool: PrefixPool | None = None
    ) -> list[list[float]]:
        """`token_logprobs` of several (ids, start) rows in one packed forward (`_packed`; the
        verification of a drafted sentence scores it after two contexts), logits computed only
        where a token is scored. Each row's cache then joins the pool."""
        torch = self.torch
        if any(start < 1 or start > len(ids) for ids, start in seqs):
            raise ValueError("score_rows: each row needs 1 <= start <= len(ids)")
        caches = [pool.take(ids, start - 1) if pool is not None else PromptCache() for ids, start in seqs]
        Ls = [len(c.ids) if c.kv is not None else 0 for c in caches]
        keep, n0 = [], 0
        for (ids, start), L in zip(seqs, Ls):
            keep += range(n0 + start - 1 - L, n0 + len(ids) - L - 1)  # the positions before the scored tokens
            n0 += len(ids) - L
        with torch.inference_mode():
            logits, kv, layout = self._packed(
                [(c.kv, L) for c, L in zip(caches, Ls)], [ids[L:] for (ids, _), L in zip(seqs, Ls)], keep
            )
            logp = torch.log_softmax(logits.float(), -1)  # (len(keep), V)
            rows, at = [], 0
            for ids, start in seqs:
                tgt = torch.tensor(list(ids[start:]), device=logp.device)
                rows.append(logp[at : at + len(tgt)].gather(1, tgt[:, None])[:, 0].tolist())
                at += len(tgt)
        if pool is not None:
            for b, ((ids, _), L) in enumerate(zip(seqs, Ls)):
                pool.reused += L
                pool.prefilled += len(ids) - L
                pool.put(PromptCache(ids=list(ids), clean=len(ids), kv=self._row_cache(kv, layout, b)))
        return rows

    # ------------------------------------------------------------------ sampling
    def _choose(self, job: SentenceJob, logits, generated, gen, procs):
        """Next tokens (a,) for `a` alive rows of one job: sentence-only repetition guards, no
        code tokens, then temperature and nucleus sampling with the job's own generator (or greedy)."""
        torch = self.torch
        p = job.params
        logits = logits.float()
        if procs:
            ids = torch.tensor(generated, dtype=torch.long, device=logits.device).reshape(len(generated), -1)
            for proc in procs:
                logits = proc(ids, logits)
        if len(self.bad):
            logits[:, self.bad.to(logits.device)] = float("-inf")
        if not p.do_sample:
            return logits.argmax(-1)
        return nucleus_sample(logits / p.temp, p.top_p, gen).to(logits.device)

    def batch(self) -> DecodeBatch:
        """An empty persistent batch that jobs join and leave between tokens (the server's)."""
        return DecodeBatch(self)

    def render(self, jobs: Sequence[SentenceJob]) -> None:
        """Fill every job's `out`: prefill each prompt (reusing its cache), then decode all rows
        of all jobs in one batch until each row ends its sentence or reaches its token limit."""
        b = DecodeBatch(self)
        b.add(jobs)
        while b.rows:
            b.step()

    def render_hf(self, jobs: Sequence[SentenceJob]) -> None:
        """The straightforward reference: transformers' `generate` on each whole prompt, the
        candidates as `num_return_sequences`, stopping at the same sentence ends. Causal and seq2seq."""
        torch = self.torch
        seq2seq = bool(getattr(self.model.config, "is_encoder_decoder", False))
        for j in jobs:
            ids = torch.tensor([j.prompt], device=self.device).expand(j.n, -1)  # (n, T): greedy rows too
            start = ids.shape[1] if not seq2seq else 1

            p = j.params
            kw = dict(
                max_new_tokens=p.max_new_tokens,
                do_sample=p.do_sample,
                logits_processor=LogitsProcessorList(
                    [
                        SentenceOnly(x, start)
                        for x in sentence_processors(p, j.earlier_ids, self.tok.eos_token_id, j.written_ids)
                    ]
                ),
                pad_token_id=self.tok.pad_token_id,
                eos_token_id=self.stop_ids,
            )
            if p.do_sample:
                kw.update(top_p=p.top_p, temperature=p.temp)
            if len(self.bad):
                kw["bad_words_ids"] = [[int(i)] for i in self.bad]
            inj = self._injector()
            plan = (
                inj.plan([j.planned], [j.plan_start])
                if inj is not None and j.plan_start is not None
                else contextlib.nullcontext()
            )
            torch.manual_seed(int(j.seed))
            with torch.inference_mode(), plan:
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
            if not seq2seq:
                out = out[:, ids.shape[1] :]
            res = []
            for row in out.tolist():
                row = row[1:] if seq2seq else row  # the decoder start token
                cut = next((i for i, t in enumerate(row) if t in self._stop_set), None)
                body = row if cut is None else row[:cut] + ([row[cut]] if row[cut] != self.tok.eos_token_id else [])
                vetoed = False
                if (
                    j.veto is not None
                ):  # where the engine would have stopped the candidate (a stop token is never checked)
                    seen = -1
                    for n in range(1, (len(row) if cut is None else cut) + 1):
                        vetoed, seen = veto_cut(self.tok, row[:n], j.veto, seen)
                        if vetoed:
                            body, cut = row[:n], None
                            break
                text = self.tok.decode(body, skip_special_tokens=True)
                res.append(
                    {
                        "text": text.split("\n")[0].strip(),
                        "ended": cut is not None,
                        "tokens": len(body),
                        **({"vetoed": True} if vetoed else {}),
                    }
                )
            j.out = res


@dataclass(eq=False)  # compared by identity
class _Live:
    """A job inside a DecodeBatch: its sampling state, one entry per candidate row."""

    job: SentenceJob
    gen: Any  # torch.Generator seeded with the job's seed
    procs: list
    tokens: list[list[int]]
    ended: list[bool]
    alive: int  # rows still decoding
    vetoed: list[bool] = field(default_factory=list)
    checked: list[int] = field(default_factory=list)  # per row: length of the text the veto last saw
    logprob: list[float] = field(default_factory=list)  # per row: the decoder's log-probability of its tokens so far


def veto_cut(tok, tokens: list[int], veto, seen: int = -1) -> tuple[bool, int]:
    """(vetoed, length seen) for a candidate's tokens so far: the veto sees the decoded text up to
    its last whitespace (later tokens only append to it, so a word there is complete), and only
    when that text grew past `seen`."""
    text = tok.decode(tokens, skip_special_tokens=True)

    def last_space(end: int) -> int:
        return max(text.rfind(" ", 0, end), text.rfind("\n", 0, end), text.rfind("\t", 0, end))

    cut = last_space(len(text))
    if getattr(tok, "clean_up_tokenization_spaces", False) and cut > 0:
        cut = last_space(cut)  # decoding may still glue a later " n't" or " ." to the last word
    if cut <= seen:
        return False, seen
    return bool(veto(text[:cut])), cut


_SENTENCE_END = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]]*$")


def _starts_sentence(tok, tokens: list[int], nxt: int) -> bool:
    """Whether token `nxt`, after a candidate's `tokens`, begins a new sentence: the text so far
    ends with terminal punctuation (closing quotes allowed) and `nxt` starts with a space."""
    text = tok.decode(tokens[-4:], skip_special_tokens=True)
    return bool(_SENTENCE_END.search(text)) and tok.decode([nxt]).startswith((" ", "\n"))


class DecodeBatch:
    """A persistent decoder batch with iteration-level scheduling (Orca, Yu et al. 2022): jobs
    join between two tokens, once their prompt is prefilled, and each leaves as soon as all its
    candidates ended, so a short sentence of one request never waits for a long one of another.

    Rows are left-padded to a common length and keep their own positions, so a row's keys and
    values never move when others join or leave; columns that hold only padding are trimmed when
    rows leave. Each job samples with its own generator, so its text does not depend on its
    batchmates. `DecodeEngine.render` is add + step until empty; the server keeps one open.
    """

    def __init__(self, engine: DecodeEngine):
        self.e = engine
        self.kv = None  # DynamicCache: per layer (R, H, T, D)
        self.mask = None  # (R, T) 1 for real tokens, 0 for left padding
        self.pos = None  # (R,) position of each row's next token
        self.logits = None  # (R, V) each row's next-token logits, not sampled yet
        self.owner: list[_Live] = []  # per row
        self.cand: list[int] = []  # per row: the candidate's index within its job

    @property
    def rows(self) -> int:
        return len(self.owner)

    @property
    def jobs(self) -> list[SentenceJob]:
        return list({id(lv): lv.job for lv in self.owner}.values())

    def add(self, jobs: Sequence[SentenceJob]) -> None:
        """Prefill the jobs' prompts (each reusing its own prompt cache) and merge their rows in."""
        from transformers import DynamicCache

        e, torch = self.e, self.e.torch
        F = torch.nn.functional
        jobs = list(jobs)
        if not jobs:
            return
        with torch.inference_mode():
            first = e.prefill(jobs)  # (1, V) each
            T_old = 0 if self.mask is None else self.mask.shape[1]
            T = max([T_old] + [len(j.prompt) for j in jobs])
            if self.kv is not None and T_old == T:
                # The prompts fit the batch's columns: their rows are written into the batch's
                # buffers, right-aligned, and the rows already there are not copied.
                for li, layer in enumerate(self.kv.layers):
                    layer.append_rows([(j.cache.kv.layers[li].keys, j.cache.kv.layers[li].values, j.n) for j in jobs])
            else:  # a longer prompt: every row is padded on the left to the new length, a fresh batch cache
                kv = DynamicCache(config=e.model.config)
                room = 1 + max(j.params.max_new_tokens for j in jobs + [lv.job for lv in self.owner])
                layers = []
                for li in range(len(jobs[0].cache.kv.layers)):
                    ks, vs = [], []
                    if self.kv is not None:
                        old = self.kv.layers[li]
                        ks.append(F.pad(old.keys, (0, 0, T - T_old, 0)))
                        vs.append(F.pad(old.values, (0, 0, T - T_old, 0)))
                    for j in jobs:
                        layer = j.cache.kv.layers[li]
                        pad = T - layer.keys.shape[-2]
                        ks.append(F.pad(layer.keys, (0, 0, pad, 0)).expand(j.n, -1, -1, -1))
                        vs.append(F.pad(layer.values, (0, 0, pad, 0)).expand(j.n, -1, -1, -1))
                    # room for the step's tokens and for half as many rows again to join without a copy
                    R = sum(k.shape[0] for k in ks)
                    layers.append(roomy_layer(torch.cat(ks), torch.cat(vs), room, R + R // 2))
                kv.layers = layers
                self.kv = kv
            masks = [] if self.mask is None else [F.pad(self.mask, (T - T_old, 0))]
            masks += [
                torch.cat(
                    [
                        torch.zeros(j.n, T - len(j.prompt), dtype=torch.long),
                        torch.ones(j.n, len(j.prompt), dtype=torch.long),
                    ],
                    1,
                ).to(e.device)
                for j in jobs
            ]
            pos = [] if self.pos is None else [self.pos]
            pos += [torch.full((j.n,), len(j.prompt), dtype=torch.long, device=e.device) for j in jobs]
            logits = [] if self.logits is None else [self.logits]
            logits += [f.expand(j.n, -1) for f, j in zip(first, jobs)]
            self.mask, self.pos, self.logits = torch.cat(masks), torch.cat(pos), torch.cat(logits)
        for j in jobs:
            lv = _Live(
                j,
                torch.Generator().manual_seed(int(j.seed)),
                sentence_processors(j.params, j.earlier_ids, e.tok.eos_token_id, j.written_ids),
                [[] for _ in range(j.n)],
                [False] * j.n,
                j.n,
                [False] * j.n,
                [-1] * j.n,
                [0.0] * j.n,
            )
            self.owner += [lv] * j.n
            self.cand += list(range(j.n))

    def remove(self, jobs: Sequence[SentenceJob]) -> None:
        """Take jobs out unfinished (a request that was cancelled); their `out` stays None."""
        gone = {id(j) for j in jobs}
        with self.e.torch.inference_mode():  # the buffers are inference tensors, written in place
            self._keep([b for b, lv in enumerate(self.owner) if id(lv.job) not in gone])

    def _keep(self, keep: list[int]) -> list[int]:
        """Keep the rows `keep` (ascending); returns the old index of each row in its new place.
        The rows past the new row count that stay are moved into the places of the rows that
        leave (row order within the batch carries no meaning: each job's rows are sampled in
        candidate order), so only the moved rows' keys and values are copied."""
        torch = self.e.torch
        R = len(keep)
        if self.rows == R:
            return list(range(R))
        if not keep:
            self.kv = self.mask = self.pos = self.logits = None
            self.owner, self.cand = [], []
            return []
        kept = set(keep)
        holes = [b for b in range(R) if b not in kept]
        movers = [b for b in keep if b >= R]
        order = list(range(R))
        for h, m in zip(holes, movers):
            order[h] = m
        dst, src = (torch.tensor(x, dtype=torch.long, device=self.e.device) for x in (holes, movers))
        for layer in self.kv.layers:
            layer.move_rows(dst, src, R)
        idx = torch.tensor(order, device=self.e.device)
        self.mask, self.pos, self.logits = self.mask[idx], self.pos[idx], self.logits[idx]
        self.owner = [self.owner[b] for b in order]
        self.cand = [self.cand[b] for b in order]
        lead = int((self.mask.cumsum(1) == 0).sum(1).min())  # columns of padding in every row left
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.kv.layers:
                layer.trim_front(lead)
        return order

    def step(self) -> list[SentenceJob]:
        """Sample one token for every row; rows that ended their sentence (or reached their
        token limit) leave. Returns the jobs whose rows have all ended, their `out` filled, then
        runs one forward for the rows left."""
        e, torch = self.e, self.e.torch
        if not self.rows:
            return []
        groups: dict[int, tuple[_Live, list[int]]] = {}
        for b, lv in enumerate(self.owner):  # each job's rows with its own settings and generator
            groups.setdefault(id(lv), (lv, []))[1].append(b)
        for _, rows in groups.values():  # in candidate order: a row's draw must not depend on where it sits
            rows.sort(key=self.cand.__getitem__)
        with torch.inference_mode():
            nxt = torch.empty(self.rows, dtype=torch.long, device=e.device)
            for lv, rows in groups.values():
                nxt[rows] = e._choose(
                    lv.job, self.logits[rows], [lv.tokens[self.cand[b]] for b in rows], lv.gen, lv.procs
                )
            # the model's own log-probability of each sampled token (before temperature and the
            # repetition guards): the candidate's fluency, which the rerank may weigh
            lp = torch.log_softmax(self.logits.float(), -1).gather(1, nxt[:, None])[:, 0].tolist()
            keep = []
            for b, t in enumerate(nxt.tolist()):  # one device->host copy a step
                lv, i = self.owner[b], self.cand[b]
                lv.logprob[i] += lp[b]
                if t in e._stop_set:
                    lv.ended[i] = True
                    if t != e.tok.eos_token_id:
                        lv.tokens[i].append(t)  # "word.\n": the text before the newline is kept
                elif lv.job.one_sentence and lv.tokens[i] and _starts_sentence(e.tok, lv.tokens[i], t):
                    lv.ended[i] = True  # the token that would begin the next sentence is not kept
                else:
                    lv.tokens[i].append(t)
                    if lv.job.veto is not None:
                        lv.vetoed[i], lv.checked[i] = veto_cut(e.tok, lv.tokens[i], lv.job.veto, lv.checked[i])
                    if len(lv.tokens[i]) < lv.job.params.max_new_tokens and not lv.vetoed[i]:
                        keep.append(b)
                        continue
                lv.alive -= 1
            done = [lv for lv, _ in groups.values() if lv.alive == 0]
            for lv in done:
                texts = e.tok.batch_decode(lv.tokens, skip_special_tokens=True)
                lv.job.out = [
                    {
                        "text": t.split("\n")[0].strip(),
                        "ended": d,
                        "tokens": len(k),
                        "logprob": round(lp_, 4),
                        **({"vetoed": True} if v else {}),
                    }
                    for t, d, k, v, lp_ in zip(texts, lv.ended, lv.tokens, lv.vetoed, lv.logprob)
                ]
            order = self._keep(keep)
            if self.rows:
                nxt = nxt[torch.tensor(order, device=e.device)] if len(order) < len(nxt) else nxt
                self.mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=self.mask.dtype, device=e.device)], 1)
                inj = e._injector()
                plan = contextlib.nullcontext()
                if inj is not None and any(lv.job.plan_start is not None for lv in self.owner):
                    plan = inj.plan(
                        [lv.job.planned for lv in self.owner],
                        [lv.job.plan_start if lv.job.plan_start is not None else 1 << 60 for lv in self.owner],
                    )
                with plan:
                    out = e.model(
                        input_ids=nxt[:, None],
                        attention_mask=self.mask,
                        position_ids=self.pos[:, None],
                        cache=self.kv,
                        use_cache=True,
                        logits_to_keep=1,
                    )
                self.logits = out.logits[:, -1].float()  # as the prefill's (a bf16 decoder gives bf16)
                self.pos = self.pos + 1
        return [lv.job for lv in done]


class WholeBatch:
    """The DecodeBatch interface over `render_hf` (ENGINE=hf, seq2seq decoders): the jobs added
    are rendered whole at the next step."""

    def __init__(self, engine: DecodeEngine):
        self.e = engine
        self._jobs: list[SentenceJob] = []

    @property
    def rows(self) -> int:
        return sum(j.n for j in self._jobs)

    @property
    def jobs(self) -> list[SentenceJob]:
        return list(self._jobs)

    def add(self, jobs: Sequence[SentenceJob]) -> None:
        self._jobs += list(jobs)

    def remove(self, jobs: Sequence[SentenceJob]) -> None:
        gone = {id(j) for j in jobs}
        self._jobs = [j for j in self._jobs if id(j) not in gone]

    def step(self) -> list[SentenceJob]:
        jobs, self._jobs = self._jobs, []
        self.e.render_hf(jobs)
        return jobs
