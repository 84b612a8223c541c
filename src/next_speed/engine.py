"""The decoding engine: sentence steps of one or many generations rendered in one decoder batch.

A sentence step is a prompt (context, exemplars, plan) and N candidates sampled from it. The
engine
1. keeps each generation's prompt KV cache from one sentence to the next and prefills only the
   tokens after the longest common prefix with the previous prompt (automatic prefix caching as
   in vLLM, Kwon et al. 2023, kept per generation);
2. reads the prompt once and copies its keys/values to the candidates (not once per candidate);
3. stacks the steps of several generations, left-padded, into one batch (continuous batching at
   the granularity of a sentence step; Orca, Yu et al. 2022);
4. drops a row from the batch as soon as it ends its sentence (end of sequence or a newline), so
   ended candidates stop costing, and the step ends when the last row has ended.

Each job samples with its own seeded generator and its own settings, so a job's text does not
depend on what it was batched with. Causal decoders only; `render_hf` is the straightforward
reference (transformers' `generate` on the whole prompt) and serves seq2seq decoders.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

log = logging.getLogger(__name__)


@dataclass
class PromptCache:
    """One generation's last prompt and its keys/values (batch 1), reused by its next sentence."""

    ids: list[int] = field(default_factory=list)
    kv: Any = None  # transformers DynamicCache
    clean: int = 0  # leading positions whose keys/values do not depend on the plan (CODE_MODE=inject)
    reused: int = 0  # prompt tokens read from the cache, over the generation's life
    prefilled: int = 0  # prompt tokens run through the model


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
    out: list[dict] | None = None


def sentence_processors(p: Any) -> list:
    """HF's repetition penalty and no-repeat-n-gram processors, applied to the sentence being
    written only (the processors get the sentence's own tokens): the prompt (context, exemplars)
    is meant to be echoed, a loop within the sentence is not ("Canada, Canada, Canada, ...")."""
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    procs = []
    if p.repetition_penalty > 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.no_repeat_ngram > 0:
        procs.append(NoRepeatNGramLogitsProcessor(p.no_repeat_ngram))
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
        from .decoder_model import plan_injector

        return plan_injector(self.model)

    def _prefill(self, job: SentenceJob):
        """Bring the job's prompt cache up to its prompt; returns the last position's logits (1, V)."""
        from transformers import DynamicCache

        torch = self.torch
        c = job.cache if job.cache is not None else PromptCache()
        ids = job.prompt
        # Reuse what the previous prompt shares with this one, short of the last token (its
        # logits are needed) and of positions that carried the previous plan.
        L = _common_prefix(c.ids[: min(c.clean, len(ids) - 1)], ids) if c.kv is not None else 0
        if L == 0:
            c.kv = DynamicCache(config=self.model.config)
        elif c.kv.get_seq_length() > L:
            c.kv.crop(L - c.kv.get_seq_length())  # a negative count: tokens removed from the end
        inj = self._injector()
        plan = inj.plan([job.planned], [job.plan_start]) if inj is not None and job.plan_start is not None else contextlib.nullcontext()
        with plan:
            out = self.model(input_ids=torch.tensor([ids[L:]], device=self.device), cache=c.kv, use_cache=True,
                             position_ids=torch.arange(L, len(ids), device=self.device)[None], logits_to_keep=1)
        c.ids = list(ids)
        c.clean = job.plan_start if job.plan_start is not None else len(ids)
        c.reused += L
        c.prefilled += len(ids) - L
        job.cache = c
        return out.logits[:, -1].float()

    def _stack(self, jobs: Sequence[SentenceJob]):
        """One cache for all rows: each job's prompt keys/values, left-padded to the longest
        prompt and repeated for its candidates. Returns (cache, attention mask (R, T))."""
        from transformers import DynamicCache

        torch = self.torch
        F = torch.nn.functional
        T = max(len(j.prompt) for j in jobs)
        cache = DynamicCache(config=self.model.config)
        n_layers = len(jobs[0].cache.kv.layers)
        for li in range(n_layers):
            ks, vs = [], []
            for j in jobs:
                layer = j.cache.kv.layers[li]
                pad = T - layer.keys.shape[-2]
                ks.append(F.pad(layer.keys, (0, 0, pad, 0)).expand(j.n, -1, -1, -1))
                vs.append(F.pad(layer.values, (0, 0, pad, 0)).expand(j.n, -1, -1, -1))
            cache.update(torch.cat(ks), torch.cat(vs), li)
        mask = torch.cat([torch.cat([torch.zeros(j.n, T - len(j.prompt), dtype=torch.long),
                                     torch.ones(j.n, len(j.prompt), dtype=torch.long)], 1) for j in jobs])
        return cache, mask.to(self.device)

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

    def render(self, jobs: Sequence[SentenceJob]) -> None:
        """Fill every job's `out`: prefill each prompt (reusing its cache), then decode all rows
        of all jobs in one batch until each row ends its sentence or reaches its token limit."""
        torch = self.torch
        jobs = list(jobs)
        if not jobs:
            return
        with torch.inference_mode():
            first = [self._prefill(j) for j in jobs]
            cache, mask = self._stack(jobs)
            row_job = [ji for ji, j in enumerate(jobs) for _ in range(j.n)]
            logits = torch.cat([f.expand(j.n, -1) for f, j in zip(first, jobs)])
            pos = torch.tensor([len(jobs[ji].prompt) for ji in row_job], device=self.device)
            gens = [torch.Generator().manual_seed(int(j.seed)) for j in jobs]
            procs = [sentence_processors(j.params) for j in jobs]
            tokens: list[list[int]] = [[] for _ in row_job]
            ended = [False] * len(row_job)
            alive = list(range(len(row_job)))  # original row index of each batch row
            inj = self._injector()
            plan = contextlib.nullcontext()
            if inj is not None and jobs[0].plan_start is not None:
                plan = inj.plan([jobs[ji].planned for ji in row_job], [jobs[ji].plan_start for ji in row_job])
            with plan:
                while True:
                    nxt = torch.empty(len(alive), dtype=torch.long, device=self.device)
                    for ji, j in enumerate(jobs):  # each job's rows with its own settings and generator
                        rows = [b for b, r in enumerate(alive) if row_job[r] == ji]
                        if rows:
                            nxt[rows] = self._choose(j, logits[rows], [tokens[alive[b]] for b in rows], gens[ji], procs[ji])
                    keep = []
                    for b, (r, t) in enumerate(zip(alive, nxt.tolist())):  # one device->host copy a step
                        if t in self._stop_set:
                            ended[r] = True
                            if t != self.tok.eos_token_id:
                                tokens[r].append(t)  # "word.\n": the text before the newline is kept
                        else:
                            tokens[r].append(t)
                            if len(tokens[r]) < jobs[row_job[r]].params.max_new_tokens:
                                keep.append(b)
                    if not keep:
                        break
                    if len(keep) < len(alive):  # ended rows leave the batch
                        idx = torch.tensor(keep, device=self.device)
                        cache.batch_select_indices(idx)
                        mask, pos, nxt = mask[idx], pos[idx], nxt[idx]
                        if inj is not None and jobs[0].plan_start is not None:
                            inj.keep_rows(idx)
                        alive = [alive[b] for b in keep]
                    mask = torch.cat([mask, torch.ones(len(alive), 1, dtype=mask.dtype, device=self.device)], 1)
                    out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None], cache=cache,
                                     use_cache=True, logits_to_keep=1)
                    logits = out.logits[:, -1]
                    pos = pos + 1
        o = 0
        for j in jobs:
            rows = range(o, o + j.n)
            o += j.n
            texts = self.tok.batch_decode([tokens[r] for r in rows], skip_special_tokens=True)
            j.out = [{"text": t.split("\n")[0].strip(), "ended": ended[r], "tokens": len(tokens[r])} for t, r in zip(texts, rows)]

    def render_hf(self, jobs: Sequence[SentenceJob]) -> None:
        """The straightforward reference: transformers' `generate` on each whole prompt, the
        candidates as `num_return_sequences`, stopping at the same sentence ends. Causal and seq2seq."""
        from transformers import LogitsProcessor, LogitsProcessorList

        torch = self.torch
        seq2seq = bool(getattr(self.model.config, "is_encoder_decoder", False))
        for j in jobs:
            ids = torch.tensor([j.prompt], device=self.device).expand(j.n, -1)  # (n, T): greedy rows too
            start = ids.shape[1] if not seq2seq else 1

            class SentenceOnly(LogitsProcessor):
                def __init__(self, inner):
                    self.inner = inner

                def __call__(self, input_ids, scores):
                    return self.inner(input_ids[:, start:], scores)

            p = j.params
            kw = dict(max_new_tokens=p.max_new_tokens, do_sample=p.do_sample,
                      logits_processor=LogitsProcessorList([SentenceOnly(x) for x in sentence_processors(p)]),
                      pad_token_id=self.tok.pad_token_id, eos_token_id=self.stop_ids)
            if p.do_sample:
                kw.update(top_p=p.top_p, temperature=p.temp)
            if len(self.bad):
                kw["bad_words_ids"] = [[int(i)] for i in self.bad]
            inj = self._injector()
            plan = inj.plan([j.planned], [j.plan_start]) if inj is not None and j.plan_start is not None else contextlib.nullcontext()
            torch.manual_seed(int(j.seed))
            with torch.inference_mode(), plan:
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
            if not seq2seq:
                out = out[:, ids.shape[1]:]
            res = []
            for row in out.tolist():
                row = row[1:] if seq2seq else row  # the decoder start token
                cut = next((i for i, t in enumerate(row) if t in self._stop_set), None)
                body = row if cut is None else row[:cut] + ([row[cut]] if row[cut] != self.tok.eos_token_id else [])
                text = self.tok.decode(body, skip_special_tokens=True)
                res.append({"text": text.split("\n")[0].strip(), "ended": cut is not None, "tokens": len(body)})
            j.out = res
