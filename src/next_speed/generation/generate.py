"""Step 07: the sentence-step generation loop, shared by the script, the API, the REPL and the server.

Per step: the planner proposes the next code tuple from the context's tuples; the decoder renders
N_CAND candidates for it in one batch; with RERANK on, every candidate is re-embedded and
quantized, and the one whose codes match the plan best wins (most levels matched from level 0,
ties broken by cosine to the plan's reconstruction). The chosen sentence's own codes join the
context. Generation stops after GEN_STEPS sentences, or when every candidate is empty or repeats
an earlier sentence.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from next_speed.core.artifacts import StaleInputError, sha256_path, write_json
from next_speed.core.config import (
    _parse,
    deterministic_knob,
    device_knob,
    fields_of,
    knob,
    resolve,
    seed_knob,
    to_dict,
    validate,
)
from next_speed.core.errors import ConfigError, NextSpeedError
from next_speed.core.runtime import pick_device, resolve_dtype, seed_everything
from next_speed.data.embed import load_encoder
from next_speed.data.sentences import _init_worker, split_text
from next_speed.generation.engine import DecodeEngine, PrefixPool, PromptCache, SentenceJob, WholeBatch
from next_speed.models.decoder_model import (
    _prompt_parts,
    cast_decoder,
    code_token_ids,
    context_room,
    encode_example,
    exemplar_bank,
    load_base_model,
    load_base_tokenizer,
    load_decoder,
)
from next_speed.models.packing import pack_linears
from next_speed.models.planner import PlannerRunner, load_planner
from next_speed.quant.codebook import CodeBrowser
from next_speed.quant.rvq import check_fits_rvq, levels_matched, load_rvq
from next_speed.training.train_decoder import default_decoder_dir

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "Paris is the capital of France.",
    "The Amazon is the largest rainforest on Earth.",
    "Ludwig van Beethoven was a German composer and pianist.",
)


@dataclass
class GenParams:
    """Per-call generation settings (also the `params` of the server and `/set` of the chat)."""

    gen_steps: int = knob(3, env="GEN_STEPS", min=1, max=64, help="sentences to generate")
    n_cand: int = knob(4, env="N_CAND", min=1, max=32, help="decoder candidates per sentence")
    rerank: bool = knob(
        True,
        env="RERANK",
        help="re-encode candidates and keep the best (code match, fit with the text so far, no repetition)",
    )
    do_sample: bool = knob(True, env="DO_SAMPLE", help="sample the decoder (else greedy/beam-free decoding)")
    top_p: float = knob(0.9, env="TOP_P", min=0.01, max=1.0, help="decoder nucleus sampling mass")
    temp: float = knob(0.5, env="TEMP", min=0.01, max=5.0, help="decoder sampling temperature")
    max_new_tokens: int = knob(48, env="MAX_NEW_TOKENS", min=1, max=512, help="token limit per sentence")
    plan_temp: float = knob(0.7, env="PLAN_TEMP", min=0.0, max=5.0, help="planner sampling temperature (0 = greedy)")
    plan_top_k: int = knob(20, env="PLAN_TOP_K", min=0, max=4096, help="planner top-k per level (0 = all)")
    plan_deep: str = knob(
        "mean",
        env="PLAN_DEEP",
        choices=("mean", "levels"),
        help="levels 1..K-1 of the plan: mean = the codes that best render the planner's expected next "
        "sentence after its level-0 choice (MBR under cosine); levels = each level's own argmax or sample",
    )
    repetition_penalty: float = knob(
        1.1,
        env="REPETITION_PENALTY",
        min=1.0,
        max=3.0,
        help="penalty on tokens the sentence already used (1 = off; the prompt is exempt)",
    )
    no_repeat_ngram: int = knob(
        3,
        env="NO_REPEAT_NGRAM",
        min=0,
        max=16,
        help="a sentence never repeats an n-gram of its own of this size (0 = off; the prompt is exempt)",
    )
    repeat_cos: float = knob(
        0.9,
        env="REPEAT_COS",
        min=0.0,
        max=1.01,
        help="a candidate this close (cosine) to an earlier sentence counts as a repeat (LCM's stop rule; >1 = off)",
    )
    repeat_span: int = knob(
        8,
        env="REPEAT_SPAN",
        min=0,
        max=64,
        help="a candidate that copies this many consecutive words of an earlier sentence (the prompt's "
        "included) counts as a repeat (0 = off)",
    )
    no_copy_ngram: int = knob(
        7,
        env="NO_COPY_NGRAM",
        min=0,
        max=64,
        help="a sentence never writes a run of this many tokens that an earlier sentence (the prompt's "
        "included) holds: the decoder is steered off a copy instead of being refused for it (0 = off)",
    )
    rerank_plan: float = knob(
        0.5,
        env="RERANK_PLAN",
        min=0.0,
        max=10.0,
        help="with the weighed rerank (a RERANK_CONTEXT, _FLUENCY or _REPEAT weight set): the weight of "
        "a candidate's cosine to its plan's reconstruction",
    )
    rerank_context: float = knob(
        2.0,
        env="RERANK_CONTEXT",
        min=0.0,
        max=10.0,
        help="rerank weight of a candidate's cosine to the text so far (the mean of its last sentences' "
        "embeddings); RERANK_CONTEXT, _FLUENCY and _REPEAT all 0 = the code match alone (levels "
        "matched from level 0, then cosine)",
    )
    rerank_fluency: float = knob(
        0.0,
        env="RERANK_FLUENCY",
        min=0.0,
        max=10.0,
        help="rerank weight of a candidate's mean token log-probability under the decoder",
    )
    rerank_repeat: float = knob(
        4.0,
        env="RERANK_REPEAT",
        min=0.0,
        max=10.0,
        help="rerank penalty on the share of a candidate's word pairs that the last sentences this call "
        "wrote hold (repetition across sentences)",
    )
    plans: int = knob(
        2,
        env="PLANS",
        min=1,
        max=8,
        help="plans drawn per sentence, each rendered with N_CAND candidates in the same batch; the rerank "
        "chooses among all of them (1 = one plan, its renderings compared)",
    )
    unplanned: int = knob(
        4,
        env="UNPLANNED",
        min=0,
        max=32,
        help="candidates per sentence written without a plan by the packaged base model the decoder was "
        "fine-tuned from, continuing the text; the rerank weighs them like the plan's (a text the "
        "plan does not fit, e.g. another genre, keeps its own voice)",
    )
    retries: int = knob(
        2,
        env="RETRIES",
        min=0,
        max=8,
        help="a step whose candidates the stop rules all refuse is planned and rendered again (new plan draw, "
        "new seeds) up to this many times before the text ends there",
    )
    no_repeat_written: int = knob(
        3,
        env="NO_REPEAT_WRITTEN",
        min=0,
        max=64,
        help="a sentence never repeats a run of this many tokens of the last 4 sentences this call "
        "wrote (the prompt exempt: NO_COPY_NGRAM covers it; with PARALLEL, those written "
        "when the draft was planned); 0 = off",
    )
    parallel: int = knob(
        1,
        env="PARALLEL",
        min=1,
        max=16,
        help="plan-parallel rendering: up to this many planned sentences are rendered side by side (each "
        "planned after the ones before it, fed back as their codes' reconstruction); a draft's prompt holds "
        "the real text and the plan's exemplars for the sentences between, and a new draft joins the batch "
        "whenever a sentence is decided; 1 = one sentence per step",
    )
    parallel_verify: bool = knob(
        True,
        env="PARALLEL_VERIFY",
        help="with PARALLEL > 1, keep a draft only when it fits the real text before it as well as "
        "the text it was drafted after (mean token log-likelihood under the decoder, within "
        "VERIFY_TOL); a rejected draft is written again after the real text (0 = keep every draft "
        "the stop rules accept: fastest)",
    )
    verify_tol: float = knob(
        1.0,
        env="VERIFY_TOL",
        min=0.0,
        max=20.0,
        help="nats per token a draft's log-likelihood under the real text may fall below its "
        "log-likelihood under the drafted context and still be kept (PARALLEL_VERIFY)",
    )
    seed: int = seed_knob("random seed: same seed and inputs give the same text")


@dataclass
class GenerateConfig(GenParams):
    """Step 07 knobs: GenParams plus where the models are and where the log goes."""

    code_mode: str = knob(
        "auto",
        env="CODE_MODE",
        choices=("auto", "inject", "special", "text", "none"),
        help="which decoder: auto = out/decoder as trained; text/none = out/decoder_<mode>; checked against the "
        "decoder",
    )
    prompt: str | None = knob(None, env="PROMPT", help="prompt text (default: three built-in prompts)")
    run_id: str | None = knob(None, env="RUN_ID", help="name of the log (default: a timestamp)")
    out_path: str | None = knob(None, env="OUT_PATH", help="log path (default out/generate/<RUN_ID>.json)")
    planner_dir: str = knob("out/sentence_lm", env="PLANNER_DIR", help="trained planner (step 05)")
    decoder_dir: str | None = knob(None, env="DECODER_DIR", help="trained decoder (default by CODE_MODE)")
    rvq_path: str = knob("out/rvq.npz", env="RVQ_PATH", help="RVQ codebooks (step 03)")
    rvq_meta: str = knob("out/rvq_meta.json", env="RVQ_META", help="RVQ metadata")
    emb_model: str | None = knob(
        None, env="EMB_MODEL", help="encoder for prompts and reranking (default: the one of step 02)"
    )
    device: str = device_knob()
    deterministic: bool = deterministic_knob()
    dtype: str = knob(
        "auto",
        env="DTYPE",
        choices=("auto", "fp32", "bf16"),
        help="decoder weights at generation: auto = bf16 on CUDA GPUs that support it, fp32 elsewhere; bf16 on "
        "a CPU with AMX is "
        "faster, but a request's text may then depend on what it is batched with",
    )
    engine: str = knob(
        "kv",
        env="ENGINE",
        choices=("kv", "hf"),
        help="kv: prompt cache kept across sentences, one prefill shared by the candidates, ended rows dropped; "
        "hf: transformers' generate on the whole prompt (the reference; seq2seq decoders always)",
    )
    pack_weights: bool = knob(
        True,
        env="PACK_WEIGHTS",
        help="on a CPU with fp32 weights, reorder the decoder's matrices once into oneDNN's layout: faster "
        "decoding steps of a few rows, the decoder's weights held twice in memory",
    )

    def check(self) -> None:
        if self.prompt is not None:
            check_prompt(self.prompt, "PROMPT")
        elif "prompt" in getattr(self, "_explicit", ()):
            raise ConfigError("PROMPT: is empty: give at least one sentence (unset it for the built-in prompts)")
        if self.decoder_dir is None:
            self.decoder_dir = default_decoder_dir(self.code_mode)


PARAM_NAMES = tuple(f.name for f in fields(GenParams))
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def check_prompt(prompt: Any, name: str = "prompt") -> str:
    """A prompt is text with at least one visible character and no control characters (tabs and
    newlines allowed); anything else is a ConfigError naming `name`."""
    if not isinstance(prompt, str):
        raise ConfigError(f"{name}: expected text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ConfigError(f"{name}: is empty: give at least one sentence")
    bad = _CONTROL.search(prompt)
    if bad:
        raise ConfigError(f"{name}: control character {bad.group()!r} at position {bad.start()} is not allowed")
    return prompt


def check_plan(plan: Any, K: int, V: int, name: str = "plan") -> list | None:
    """Validate plan control and return it as a list of per-sentence entries, one per generated
    sentence from the first (sentences past the list's end are planned freely). An entry is
    `None` (the planner chooses), a list of 1..K codes (the first levels pinned, the rest planned;
    K codes pin the whole tuple), a string (an example sentence: it is embedded and quantized and
    its codes become the plan), or an object `{"codes": [...]}` or `{"example": "...", "levels": L}`
    (only the example's first L levels pinned). Errors are ConfigErrors naming the entry."""
    if plan is None:
        return None
    if not isinstance(plan, (list, tuple)):
        raise ConfigError(f"{name}: expected a list of per-sentence entries, got {type(plan).__name__}")
    if len(plan) > 64:
        raise ConfigError(f"{name}: {len(plan)} entries is more than the 64 sentences a call can generate")
    out: list = []
    for i, e in enumerate(plan):
        where = f"{name}[{i}]"
        if isinstance(e, dict):
            unknown = sorted(set(e) - {"codes", "example", "levels"})
            if unknown:
                raise ConfigError(
                    f"{where}: unknown key {unknown[0]!r}; an entry has 'codes', or 'example' and optionally 'levels'"
                )
            if ("codes" in e) == ("example" in e):
                raise ConfigError(f"{where}: give exactly one of 'codes' or 'example'")
            if "codes" in e:
                if "levels" in e:
                    raise ConfigError(f"{where}: 'levels' goes with 'example'; pin fewer levels by giving fewer codes")
                if not isinstance(e["codes"], (list, tuple)):
                    raise ConfigError(
                        f"{where}.codes: expected a list of 1 to K={K} codes, got {type(e['codes']).__name__}"
                    )
                e = e["codes"]
            else:
                levels = e.get("levels", K)
                if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= K:
                    raise ConfigError(f"{where}.levels: expected a whole number from 1 to K={K}, got {levels!r}")
                out.append({"example": check_prompt(e["example"], f"{where}.example"), "levels": levels})
                continue
        if e is None:
            out.append(None)
        elif isinstance(e, str):
            out.append({"example": check_prompt(e, where), "levels": K})
        elif isinstance(e, (list, tuple)):
            if not 1 <= len(e) <= K:
                raise ConfigError(f"{where}: expected 1 to K={K} codes (the first levels), got {len(e)}")
            for j, c in enumerate(e):
                if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= int(c) < V:
                    raise ConfigError(
                        f"{where}[{j}]: code {c!r} is not a code of level {j}: expected a whole number from 0 "
                        f"to {V - 1}"
                    )
            out.append([int(c) for c in e])
        else:
            raise ConfigError(
                f"{where}: expected null, a list of codes, an example sentence or an object, got {type(e).__name__}"
            )
    return out


def check_stop(stop: Any, name: str = "stop") -> list[str]:
    """Stop strings: a string or a list of at most 4 non-empty strings (OpenAI's limit)."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or len(stops) > 4 or not all(isinstance(x, str) and x for x in stops):
        raise ConfigError(f"{name}: expected a non-empty string or a list of at most 4 non-empty strings")
    return list(stops)


def params_from(cfg: GenParams) -> GenParams:
    return GenParams(**{n: getattr(cfg, n) for n in PARAM_NAMES})


def update_params(p: GenParams, overrides: dict[str, Any]) -> GenParams:
    """Apply per-call overrides, validated like knobs (unknown names are an error listing valid ones)."""

    unknown = sorted(set(overrides) - set(PARAM_NAMES))
    if unknown:
        raise ConfigError(f"unknown parameter {unknown[0]!r}; valid parameters: {', '.join(PARAM_NAMES)}")
    types = {f.name: (tp, opt) for f, tp, opt in fields_of(GenParams)}
    new = replace(p, **{k: _parse(v, *types[k], k) for k, v in overrides.items()})
    return validate(new, field_names=True)


@dataclass
class Step:
    planned: list[int]
    candidates: list[dict]
    chosen: int | None
    sentence: str | None
    realized: list[int] | None
    timings: dict[str, float]
    exemplars: list[str] = field(default_factory=list)
    pinned: int = 0  # levels of `planned` fixed by plan control (0: all chosen by the planner)
    tokens: int = 0  # decoder tokens of the chosen sentence
    lookahead: int = (
        0  # PARALLEL: sentences between the real text and this one when it was drafted (0: after the real text)
    )
    verify: dict | None = None  # PARALLEL_VERIFY: the draft's log-likelihoods under the real and the drafted context


@dataclass
class GenerationResult:
    prompt: str
    sentences: list[str]
    planned: list[list[int]]
    realized: list[list[int]]
    steps: list[Step] = field(default_factory=list)
    stop_reason: str = "steps"
    timings: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    # PARALLEL > 1: lookahead sentences drafted, kept, refused by the stop rules, rejected by verification
    drafts: dict[str, int] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return " ".join(self.sentences)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["text"] = self.text
        return d


def recorded_settings(rvq_meta: dict) -> dict:
    """What steps 01-03 recorded and generation must repeat: the sentence splitter's language
    (01), the encoder's max length (02) and the RVQ beam (03), read through the metadata chain
    rvq_meta -> emb_meta -> sentences meta. A link that is missing is logged, not guessed silently."""

    out = {"beam": int(rvq_meta.get("config", {}).get("beam", 1)), "maxlen": None, "lang": "en"}
    emb_meta_path = rvq_meta.get("config", {}).get("emb_meta")
    try:
        emb_meta = json.loads(Path(emb_meta_path).read_text())
        out["maxlen"] = emb_meta["config"].get("maxlen")
        sent_meta = json.loads(Path(emb_meta["config"]["sent_meta"]).read_text())
        out["lang"] = sent_meta["config"].get("lang") or "en"
    except (OSError, TypeError, KeyError, ValueError) as e:
        log.warning(
            "could not read what steps 01-02 recorded via %s (%s): splitting prompts as 'en' with the "
            "encoder's own max length",
            emb_meta_path,
            e,
        )
    return out


def normalize_text(s: str) -> str:
    return " ".join(s.lower().split())


def word_spans(text: str, n: int) -> set[tuple[str, ...]]:
    """The text's runs of `n` consecutive words (lowercased, punctuation dropped), for the copy guard."""
    w = re.findall(r"\w+", text.lower())
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)} if n > 0 else set()


def copy_ids(tok, sentences: Sequence[str]) -> list[int]:
    """The earlier sentences' token ids for NO_COPY_NGRAM, one after the other with an
    end-of-sequence id between them (a candidate never holds one, so no run crosses two
    sentences, and the ban never bans it: see `engine.sentence_processors`). Each sentence
    twice: as a sentence's first tokens ("The") and as text after a space (" The"), the two ways
    a candidate can spell the same words."""
    sep = [tok.eos_token_id if tok.eos_token_id is not None else 0]
    out: list[int] = []
    for s in sentences:
        for text in (s, " " + s):
            out += tok(text, add_special_tokens=False)["input_ids"] + sep
    return out


def match_score(planned: Sequence[int], realized: Sequence[int], cosine: float) -> tuple[int, float]:
    """Rerank key: (levels matched from level 0, cosine to the plan's reconstruction)."""
    return levels_matched(planned, realized), cosine


# A retried step samples its plan at least this hot (a greedy planner would repeat the refused plan)
# and seeds its decoder rows this far from the first attempt's (steps of one call are < 64 apart).
RETRY_PLAN_TEMP = 1.0
RETRY_SEED_STRIDE = 64
# The repetition controls across sentences (RERANK_REPEAT, NO_REPEAT_WRITTEN) look back this many
# written sentences: a long text may come back to a phrase, three sentences in a row should not.
RECENT_WRITTEN = 4
# With PLANS > 1, plan k's candidates are seeded this far from plan 0's (whose seeds are those of PLANS=1).
PLAN_SEED_STRIDE = 1 << 40
# With PARALLEL > 1, a draft planned j sentences past the real text is seeded this far from a step's rows.
LOOKAHEAD_SEED_STRIDE = 1 << 32
# and a generation's prefix pool keeps at most this many prompt caches (a draft's own is read again
# when it is verified, a few sentences later)
POOL_MAX = 12


def refusal(c: dict, seen: set[str], p: GenParams) -> str | None:
    """Why the stop rules refuse a judged candidate ("empty" or "repeat"), None when they accept it:
    empty text; the same text as an earlier sentence; a paraphrase of one (cosine >= REPEAT_COS,
    LCM's stop rule); a copy of REPEAT_SPAN words of one."""
    if not c["text"]:
        return "empty"
    if normalize_text(c["text"]) in seen or c["repeat_cos"] >= p.repeat_cos or c["copies"]:
        return "repeat"
    return None


def select_candidate(scored: Sequence[dict], p: GenParams, truncated_ok: bool = True) -> int | None:
    """The one candidate selection rule, used by generation and by code_agreement_eval: among
    the candidates the stop rules accept (`refused` None), with RERANK the one that ended its
    sentence before the token limit, then matches the most plan levels from level 0, then is
    closest to the plan's reconstruction (or, with RERANK_CONTEXT or RERANK_FLUENCY, the best
    `candidate_score`); without RERANK the first accepted. `truncated_ok=False` (a step that may
    still be retried) refuses candidates that hit the token limit too. None: all refused."""
    ok = [i for i, c in enumerate(scored) if not c.get("refused") and (truncated_ok or c["ended"])]
    if not ok:
        return None
    if not p.rerank:
        return ok[0]
    if p.rerank_context or p.rerank_fluency or p.rerank_repeat:
        return max(ok, key=lambda i: (scored[i]["ended"], candidate_score(scored[i], p), -i))
    return max(ok, key=lambda i: (scored[i]["ended"], scored[i]["prefix"], scored[i]["cosine"], -i))


def candidate_score(c: dict, p: GenParams) -> float:
    """The weighed rerank score: RERANK_PLAN times the cosine to the plan's reconstruction, plus
    RERANK_CONTEXT times the
    cosine to the text so far, plus RERANK_FLUENCY times the mean token log-probability (the end
    of the sentence counted as a token), minus RERANK_REPEAT times the share of its word pairs
    that the sentences written before it in this call hold."""
    fluency = c.get("logprob", 0.0) / (c.get("tokens", 0) + 1)
    return (
        p.rerank_plan * c["cosine"]
        + p.rerank_context * c.get("context_cos", 0.0)
        + p.rerank_fluency * fluency
        - p.rerank_repeat * c.get("pair_overlap", 0.0)
    )


@dataclass
class _Text:
    """One generation's text so far and what its guards derive from it."""

    history: list[str]  # the prompt's sentences, then the generated ones
    hist_emb: np.ndarray  # (len(history), D) their unit embeddings
    ctx_codes: list  # their code tuples
    seen: set  # their normalized texts (the repeat rule)
    spans: set  # their runs of REPEAT_SPAN words (the copy guard)
    earlier: list  # their token ids (NO_COPY_NGRAM)
    recent: list = field(default_factory=list)  # the last RECENT_WRITTEN sentences this call wrote,
    pairs: set = field(default_factory=set)  # their word pairs (RERANK_REPEAT)
    written: list = field(default_factory=list)  # and their tokens (NO_REPEAT_WRITTEN)
    ctx_start: int = 0  # the first sentence of the decoder's context (SentenceGenerator.context_for)

    def add(self, sentence: str, emb: np.ndarray, codes: list[int], p: GenParams, tok) -> None:
        self.history.append(sentence)
        self.seen.add(normalize_text(sentence))
        self.recent = (self.recent + [sentence])[-RECENT_WRITTEN:]
        self.pairs = set().union(*(word_spans(t, 2) for t in self.recent))
        self.spans |= word_spans(sentence, p.repeat_span)
        if p.no_copy_ngram > 0:
            self.earlier += copy_ids(tok, [sentence])
        if p.no_repeat_written > 0:
            self.written = copy_ids(tok, self.recent)
        self.hist_emb = np.concatenate([self.hist_emb, emb[None]])
        self.ctx_codes.append(codes)


@dataclass
class _Window:
    """One sentence step: the plans, their jobs, and once rendered, the choice."""

    plans: list
    exemplars: list
    jobs: list
    unplanned: bool
    timings: dict
    t_rendered: float  # when planning ended and rendering began
    pinned: int = 0  # levels of the plan fixed by plan control
    chosen: int | None = None
    planned: list = field(default_factory=list)
    ex_chosen: list = field(default_factory=list)
    scored: list = field(default_factory=list)
    x: np.ndarray | None = None
    cands: list = field(default_factory=list)
    rendered: list = field(default_factory=list)


@dataclass(eq=False)
class _Entry:
    """PARALLEL > 1: one planned sentence in the pipeline, from its planning to its decision."""

    pos: int  # its index among the generated sentences
    plan: list  # its codes (a step's: its first plan's)
    exemplars: list  # its plan's exemplars (the first is its stand-in in later drafts' prompts)
    jobs: list  # the SentenceJobs rendering it
    window: _Window | None = None  # a sentence step after the real text; None for a draft
    attempt: int = 0  # a step's retry
    lookahead: int = 0  # a draft: sentences between the real text and it when it was planned
    start: int = 0  # a draft: the history index where the real text it is verified after begins
    pinned: int = 0  # levels of its plan fixed by plan control


class Some(list):
    """SentenceJobs yielded by a pipelined generation (PARALLEL > 1): unlike a plain list (a
    sentence step, resumed once all its jobs are rendered), it is resumed as soon as any job in
    flight has ended, and may be empty (nothing new: wait for the jobs in flight)."""


@dataclass
class _Run:
    """One generation in progress: its text, result, timings, token budget and prompt caches."""

    p: GenParams
    text: _Text
    res: GenerationResult
    tot: dict
    t_start: float
    gen: Any  # the planner's torch.Generator
    budget: int | None
    stop: tuple
    on_step: Any
    pool: Any
    caches: list
    base_cache: Any
    tok: Any

    def left(self) -> int | None:
        return self.budget

    def record(self, st: Step) -> None:
        self.res.steps.append(st)
        if self.on_step is not None:
            self.on_step(st)

    def commit(self, st: Step, emb: np.ndarray) -> bool:
        """Add a decided sentence to the result and the text; True when a stop string ended the text."""
        cut = min((i for i in (st.sentence.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:  # a stop string: the text ends before it
            st.sentence = st.sentence[:cut].rstrip()
        if self.budget is not None:
            self.budget -= st.tokens
        self.record(st)
        res = self.res
        if cut < 0 or st.sentence:
            res.sentences.append(st.sentence)
            res.planned.append(st.planned)
            res.realized.append(st.realized)
        if cut >= 0:
            res.stop_reason = "stop"
            return True
        self.text.add(st.sentence, emb, st.realized, self.p, self.tok)
        return False

    def finish(self) -> GenerationResult:
        res, tot = self.res, self.tot
        tot["total"] = time.perf_counter() - self.t_start
        res.timings = {k: round(v, 4) for k, v in tot.items()}
        if self.pool is not None:
            res.timings.update(prompt_tokens_reused=self.pool.reused, prompt_tokens_prefilled=self.pool.prefilled)
        elif self.caches[0] is not None:
            res.timings.update(
                prompt_tokens_reused=sum(c.reused for c in self.caches),
                prompt_tokens_prefilled=sum(c.prefilled for c in self.caches),
            )
        return res


class SentenceGenerator:
    """Planner + decoder + encoder + RVQ, loaded once; `generate()` for text, `run()` for details.

    Thread-safe: calls are serialized by a lock, so concurrent server requests never share a
    half-updated model state or RNG.
    """

    def __init__(self, cfg: GenerateConfig | None = None, **overrides: Any):

        if cfg is None:
            cfg = resolve(GenerateConfig, {k: v for k, v in overrides.items()})
        elif overrides:
            cfg = replace(cfg, **overrides)
        self.cfg = cfg
        self.params = params_from(cfg)
        self._lock = threading.Lock()
        self._browser_lock = threading.Lock()
        self._load()

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        import torch

        cfg = self.cfg
        seed_everything(cfg.seed, cfg.deterministic)  # per-call sampling is seeded again by `seed`
        self.device = pick_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)  # before loading anything: a bad choice fails at once
        t0 = time.perf_counter()
        self.rvq, rvq_meta = load_rvq(cfg.rvq_path, cfg.rvq_meta)
        rvq_hash = sha256_path(cfg.rvq_path)
        self._load_planner(rvq_hash)
        self._load_decoder(rvq_hash)
        rec = recorded_settings(rvq_meta)
        self.beam = rec["beam"]
        self._load_encoder(rvq_meta, rec["maxlen"])
        self.engine = DecodeEngine(self.model, self.tok, code_token_ids(self.tok, self.cond), self.device)
        self.use_kv = cfg.engine == "kv" and self.cond.family == "causal"
        if cfg.engine == "kv" and not self.use_kv:
            log.info("ENGINE=kv serves causal decoders; this %s decoder renders with transformers' generate "
                     "(ENGINE=hf)",
                     self.cond.family)  # fmt: skip

        _init_worker(rec["lang"])  # the prompt splitter of step 01, built once (not per call)
        self.load_seconds = time.perf_counter() - t0
        self.torch = torch
        packed = f", {self.packed_linears} matrices packed for oneDNN" if self.packed_linears else ""
        log.info("generator loaded in %.1fs on %s (K=%d, V=%d, %s codes, %s decoder%s)", self.load_seconds,
                 self.device, self.rvq.K, self.rvq.V, self.cond.code_mode, self.dtype, packed)  # fmt: skip

    def _load_planner(self, rvq_hash: str) -> None:

        cfg = self.cfg
        planner, pinfo = load_planner(cfg.planner_dir, self.device)
        check_fits_rvq(f"the planner in {cfg.planner_dir}", pinfo["K"], pinfo["V"], pinfo.get("rvq_sha256"), self.rvq,
                       cfg.rvq_path, rvq_hash, "rerun steps 04-05")  # fmt: skip
        self.planner = PlannerRunner(planner, pinfo["context_sents"], codebooks=self.rvq.codebooks)
        self.context_sents = pinfo["context_sents"]

    def _load_decoder(self, rvq_hash: str) -> None:
        import torch

        cfg = self.cfg
        self.model, self.tok, self.cond, dmeta = load_decoder(cfg.decoder_dir, self.device)
        self.decoder_meta = dmeta
        self._base_engine = None  # UNPLANNED: the packaged base model, loaded on first use
        if self.dtype == "bf16":
            cast_decoder(
                self.model, torch.bfloat16
            )  # the plan adapter (CODE_MODE=inject) stays fp32; its vector is cast
        self.packed_linears = 0
        if cfg.pack_weights and self.device == "cpu" and self.dtype == "fp32":
            self.packed_linears = pack_linears(self.model)  # 0, with a warning, where this torch cannot
        if cfg.code_mode != "auto" and self.cond.code_mode != cfg.code_mode:
            raise StaleInputError(
                f"CODE_MODE={cfg.code_mode} but the decoder in {cfg.decoder_dir} was trained with "
                f"CODE_MODE={self.cond.code_mode}: set CODE_MODE={self.cond.code_mode} or rerun step 06"
            )
        check_fits_rvq(f"the decoder in {cfg.decoder_dir}", self.cond.K, self.cond.V, dmeta.get("rvq_sha256"),
                       self.rvq, cfg.rvq_path, rvq_hash, "rerun steps 04 and 06 with these K and V")  # fmt: skip

    def _load_encoder(self, rvq_meta: dict, maxlen) -> None:

        cfg = self.cfg
        model = cfg.emb_model or rvq_meta.get("encoder") or "all-MiniLM-L6-v2"
        self.encoder = load_encoder(model, device=self.device, maxlen=maxlen)
        enc = self.encoder
        get_dim = getattr(enc, "get_embedding_dimension", None) or enc.get_sentence_embedding_dimension
        if get_dim() != self.rvq.D:
            raise StaleInputError(
                f"the encoder gives {get_dim()}-d vectors but {cfg.rvq_path} quantizes {self.rvq.D}-d ones: "
                f"set EMB_MODEL to the encoder of step 02"
            )

    # ------------------------------------------------------------------ pieces
    def split(self, text: str) -> list[str]:

        return split_text(text)

    def embed(self, sentences: Sequence[str]) -> np.ndarray:
        return np.asarray(
            self.encoder.encode(
                list(sentences), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            ),
            dtype=np.float32,
        )

    def exemplars_for(
        self, codes: Sequence[int], exclude: set[str] | None = None, avoid=None, avoid_cos: float = 1.01
    ) -> list[str]:
        """The decoder's exemplars for a plan (empty for a decoder trained without EXEMPLARS):
        never a text of `exclude`; one within `avoid_cos` cosine of a vector of `avoid` (M, D) only
        when the search found nothing else."""

        bank = exemplar_bank(self.model)
        if bank is None or not self.cond.exemplars:
            return []
        return bank.lookup(
            [list(codes)],
            self.cond.exemplars,
            exclude_texts=[exclude or set()],
            avoid=None if avoid is None else [avoid],
            avoid_cos=avoid_cos,
        )[0]

    def context_for(
        self, history: Sequence[str], start: int, codes: Sequence[int], exemplars: Sequence[str]
    ) -> tuple[str, int]:
        """The context sentences, `history[start:]`, and the new `start`. The start moves forward
        only when the context no longer fits (more than CONTEXT_SENTS sentences, or more tokens
        than the prompt has room for), and then by enough to free half the room: the prompt keeps
        its beginning for several sentences, so the engine reuses its KV cache instead of reading
        it again (llama.cpp's context shift, which drops half the context when it is full)."""
        if not self.context_sents or not history:
            return "", len(history)

        room = context_room(self.tok, self.cond, codes, exemplars)

        def fits(s: int, frac: float) -> bool:
            return (
                len(history) - s <= self.context_sents * frac
                and len(self.tok(" ".join(history[s:]) + "\n", add_special_tokens=False)["input_ids"]) <= room * frac
            )

        if not fits(start, 1.0):
            start = min(start + 1, len(history) - 1)  # the last sentence stays (cut from the left if too long)
            while start < len(history) - 1 and not fits(start, 0.5):
                start += 1
        return " ".join(history[start:]), start

    def make_job(
        self,
        context_text: str,
        codes: Sequence[int],
        p: GenParams,
        seed: int,
        exemplars: Sequence[str] | None = None,
        cache=None,
        copy_spans: set | None = None,
        earlier_ids: Sequence[int] | None = None,
        written_ids: Sequence[int] | None = None,
    ):
        """One sentence step for the engine: the prompt of `codes` after `context_text`, with the
        plan's exemplars (looked up when not given), `p.n_cand` candidates. With `copy_spans` (the
        earlier sentences' runs of REPEAT_SPAN words) a candidate stops as soon as it copies one:
        the copy guard would refuse it anyway, so only the tokens it would still have cost change.
        With `earlier_ids` (`copy_ids` of the earlier sentences) no candidate writes a run of
        NO_COPY_NGRAM tokens found there; with `written_ids` (those of the sentences this call
        wrote last) no run of NO_REPEAT_WRITTEN tokens of theirs."""

        if exemplars is None:
            exemplars = self.exemplars_for(codes)
        ex = encode_example(self.tok, self.cond, context_text, codes, None, exemplars)
        veto = None
        if copy_spans and p.repeat_span > 0:
            spans, n = frozenset(copy_spans), p.repeat_span
            veto = lambda text: not spans.isdisjoint(word_spans(text, n))  # noqa: E731
        return SentenceJob(
            prompt=ex["input_ids"],
            n=p.n_cand,
            params=p,
            seed=seed,
            planned=[int(c) for c in codes],
            plan_start=ex.get("plan_start"),
            cache=cache,
            context=context_text,
            exemplars=list(exemplars),
            veto=veto,
            earlier_ids=list(earlier_ids) if earlier_ids and p.no_copy_ngram > 0 else None,
            written_ids=list(written_ids) if written_ids and p.no_repeat_written > 0 else None,
        )

    def decode_batch(self):
        """An empty persistent batch for this generator's engine (the server's scheduler keeps
        one open: jobs join and leave between tokens; with ENGINE=hf each step renders whole)."""

        return self.engine.batch() if self.use_kv else WholeBatch(self.engine)

    def render_jobs(self, jobs) -> None:
        """Render sentence steps (of one or several generations) in one decoder batch (and the
        base model's unplanned candidates in one batch of its own)."""
        base = [j for j in jobs if j.engine == "base"]
        jobs = [j for j in jobs if j.engine != "base"]
        if base:
            self.base_engine().render(base)
        if self.use_kv:
            self.engine.render(jobs)
        else:
            self.engine.render_hf(jobs)

    def base_engine(self):
        """The engine of the packaged base model the decoder was fine-tuned from (UNPLANNED),
        loaded once on first use, its weights packed like the decoder's."""
        if self._base_engine is None:
            name = self.decoder_meta.get("train", {}).get("model")
            if not name:
                raise NextSpeedError(f"UNPLANNED: the decoder in {self.cfg.decoder_dir} does not record its base model")
            tok, family, _ = load_base_tokenizer(name)
            if family != "causal":
                raise ConfigError(f"UNPLANNED: the base model {name} is not a causal LM; set UNPLANNED=0")
            model = load_base_model(name, family).to(self.device).eval()
            if self.dtype == "bf16":
                model = model.to(self.torch.bfloat16)
            elif self.packed_linears:
                pack_linears(model)
            self._base_engine = DecodeEngine(model, tok, [], self.device)
        return self._base_engine

    def unplanned_job(
        self, history: Sequence[str], p: GenParams, seed: int, cache, spans: set, earlier_ids, written_ids
    ):
        """A step's UNPLANNED candidates: the base model continues the text so far (its last
        sentences, at most MAX_IN tokens) by one sentence."""

        tok = self.base_engine().tok
        text = " ".join(history[-(self.context_sents or len(history)) :])
        ids = tok(text, add_special_tokens=False)["input_ids"][-self.cond.max_in :]
        veto = None
        if spans and p.repeat_span > 0:
            spans_, n = frozenset(spans), p.repeat_span
            veto = lambda t: not spans_.isdisjoint(word_spans(t, n))  # noqa: E731
        return SentenceJob(
            prompt=ids,
            n=p.unplanned,
            params=p,
            seed=seed,
            cache=cache,
            context=text,
            veto=veto,
            earlier_ids=list(earlier_ids) if earlier_ids and p.no_copy_ngram > 0 else None,
            written_ids=list(written_ids) if written_ids and p.no_repeat_written > 0 else None,
            one_sentence=True,
            engine="base",
        )

    def render(
        self, context_text: str, codes: Sequence[int], p: GenParams, seed: int, exemplars: Sequence[str] | None = None
    ) -> list[str]:
        """Decode `p.n_cand` candidate sentences for one planned tuple, in one batch."""
        return [c["text"] for c in self.render_candidates(context_text, codes, p, seed, exemplars)]

    def render_candidates(
        self, context_text: str, codes: Sequence[int], p: GenParams, seed: int, exemplars: Sequence[str] | None = None
    ) -> list[dict]:
        """As `render`, with whether each candidate ended its sentence (`ended` False: it hit
        MAX_NEW_TOKENS first, so it is truncated) and its token count."""
        job = self.make_job(context_text, codes, p, seed, exemplars)
        with self._lock:
            self.render_jobs([job])
        return job.out

    def score(
        self,
        planned: Sequence[int],
        candidates: Sequence[str],
        return_embeddings: bool = False,
        embeddings: np.ndarray | None = None,
    ):
        """Re-encode candidates: their tuples, matched prefix and cosine to the plan's reconstruction
        (and their unit embeddings, (N, D), with `return_embeddings`; pass `embeddings` when known)."""
        target = self.rvq.decode(np.asarray([planned]))[0]
        target = target / (np.linalg.norm(target) + 1e-12)
        x = self.embed(candidates) if embeddings is None else embeddings
        codes = self.rvq.encode(x, beam=self.beam)
        out = []
        for c, e, t in zip(candidates, x, codes):
            prefix, cos = match_score(planned, t.tolist(), float(e @ target))
            out.append({"text": c, "codes": t.tolist(), "prefix": prefix, "cosine": round(cos, 4)})
        return (out, x) if return_embeddings else out

    def sample_plans(
        self, ctx_codes: list, hist_emb: np.ndarray, pin: Sequence[int], p: GenParams, temp: float, gen
    ) -> list[list[int]]:
        """PLANS distinct plans for the next sentence (pinned levels kept): the first drawn at
        `temp`, the others sampled (at temperature 1 when `temp` is greedy); a draw equal to an
        earlier one is dropped (it would render the same prompt again)."""
        plans: list[list[int]] = []
        for k in range(p.plans):
            t = temp if k == 0 or temp > 0 else RETRY_PLAN_TEMP
            pl = self.draw_plan(ctx_codes, hist_emb, pin, p, t, gen)
            if pl not in plans:
                plans.append(pl)
        return plans

    def draw_plan(self, codes: list, emb: np.ndarray, pin: Sequence[int], p: GenParams, temp: float, gen) -> list[int]:
        """One planner draw of the next tuple after `codes` (and their unit embeddings `emb`), at
        `temp` (greedy at 0), PLAN_TOP_K and PLAN_DEEP, the levels of `pin` kept."""
        return self.planner.next_tuple(
            codes,
            greedy=temp <= 0,
            temperature=temp,
            top_k=p.plan_top_k,
            generator=gen,
            at_doc_start=True,
            fixed=pin,
            embeddings=emb,
            deep=p.plan_deep,
        )

    def judge(
        self,
        planned: Sequence[int],
        rendered: Sequence[dict],
        hist_emb: np.ndarray,
        seen: set[str],
        spans: set,
        p: GenParams,
        pairs: set | None = None,
        embeddings: np.ndarray | None = None,
    ) -> tuple[list[dict], np.ndarray]:
        """One step's candidates (`SentenceJob.out`) judged against the plan and the text so far:
        `score`'s codes, prefix and cosine, plus `ended`, `tokens`, `logprob`, `repeat_cos` (nearest
        earlier sentence, `hist_emb` (M, D) unit rows), `context_cos` (cosine to the mean of the last
        CONTEXT_SENTS of them), `pair_overlap` (share of its word pairs in `pairs`, those of the
        sentences written so far), `copies` (a run of REPEAT_SPAN words of `spans`, or vetoed
        while written) and `refused` (`refusal`'s reason, given the earlier sentences' normalized
        texts `seen`). Returns them and the candidates' unit embeddings (N, D)."""
        cands = [c["text"] for c in rendered]
        x = self.embed(cands) if embeddings is None else embeddings
        scored = self.score(planned, cands, embeddings=x)
        near = (x @ hist_emb.T).max(1) if len(hist_emb) else np.full(len(cands), -1.0)
        ctx = hist_emb[-(self.context_sents or len(hist_emb)) :].mean(0) if len(hist_emb) else np.zeros(x.shape[1])
        ctx_cos = x @ ctx / max(float(np.linalg.norm(ctx)), 1e-12)
        for sc, r, cos, cc in zip(scored, rendered, near, ctx_cos):
            sc.update(
                ended=r["ended"],
                repeat_cos=round(float(cos), 4),
                context_cos=round(float(cc), 4),
                tokens=r.get("tokens", 0),
                logprob=r.get("logprob", 0.0),
                copies=bool(word_spans(sc["text"], p.repeat_span) & spans) or bool(r.get("vetoed")),
            )
            own = word_spans(sc["text"], 2)
            sc["pair_overlap"] = round(len(own & pairs) / len(own), 4) if pairs and own else 0.0
            sc["refused"] = refusal(sc, seen, p)
        return scored, x

    def codes_of(self, text: str, levels: int | None = None) -> list[int]:
        """The code tuple of a sentence (embedded and quantized as in step 03), or its first `levels`."""
        codes = self.rvq.encode(self.embed([text]), beam=self.beam)[0].tolist()
        return codes[: levels or self.rvq.K]

    def browser(self):
        """The code browser over the training sentences (built on first use, under its own lock:
        generation goes on meanwhile; see codebook.py)."""
        if getattr(self, "_browser", None) is None:
            with self._browser_lock:
                if getattr(self, "_browser", None) is None:
                    self._browser = CodeBrowser.from_rvq_meta(self.cfg.rvq_meta, self.rvq)
        return self._browser

    # ------------------------------------------------------------------ the loop
    def prepare(
        self,
        prompt: str,
        max_sentences: int | None = None,
        *,
        plan: Any = None,
        max_tokens: int | None = None,
        stop: Any = None,
        **overrides: Any,
    ) -> dict:
        """Validate one call's arguments (ConfigError naming the bad one) into `steps()` keywords."""
        p = update_params(
            self.params, {**({"gen_steps": max_sentences} if max_sentences is not None else {}), **overrides}
        )
        check_prompt(prompt)
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise ConfigError(f"max_tokens: expected a whole number of at least 1, got {max_tokens!r}")
        plan = check_plan(plan, self.rvq.K, self.rvq.V)
        if p.parallel > 1 and p.parallel_verify and self.cond.family != "causal":
            raise ConfigError(
                f"PARALLEL_VERIFY: verification scores drafts with a causal decoder; this {self.cond.family} "
                "decoder drafts with PARALLEL_VERIFY=0 only"
            )
        if plan and len(plan) > p.gen_steps:
            raise ConfigError(
                f"plan: {len(plan)} entries for at most {p.gen_steps} sentences (max_sentences): "
                "drop the extra entries or generate more sentences"
            )
        return {"prompt": prompt, "p": p, "plan": plan, "max_tokens": max_tokens, "stop": check_stop(stop)}

    def run(
        self,
        prompt: str,
        max_sentences: int | None = None,
        *,
        plan: Any = None,
        max_tokens: int | None = None,
        stop: Any = None,
        **overrides: Any,
    ) -> GenerationResult:
        """Generate up to `max_sentences` sentences after `prompt`, with per-call parameter overrides.

        `plan` pins the codes of the next sentences (see `check_plan`): e.g. `plan=[[12, 40], None,
        "An example sentence."]` pins levels 0-1 of the first sentence, leaves the second to the
        planner and gives the third the codes of the example. `max_tokens` caps the decoder tokens
        of all sentences together (stop reason "length"); `stop` strings end the text where they
        first occur (stop reason "stop")."""
        kw = self.prepare(prompt, max_sentences, plan=plan, max_tokens=max_tokens, stop=stop, **overrides)
        with self._lock:
            return self.drive(self.steps(**kw))

    def stream(self, prompt: str, max_sentences: int | None = None, **kwargs: Any):
        """As `run`, yielding each sentence step (`Step`) as soon as it is decided; the generator's
        return value is the GenerationResult. Other calls may run between two steps."""
        kw = self.prepare(prompt, max_sentences, **kwargs)
        done: list[Step] = []
        steps = self.steps(**kw, on_step=done.append)
        try:
            with self._lock:
                batch, jobs = self.decode_batch(), next(steps)
            while True:
                with self._lock:
                    self.render_some(batch, jobs)
                    jobs = steps.send(None)
                yield from done
                done.clear()
        except StopIteration as stop:
            yield from done
            return stop.value

    def drive(self, steps) -> GenerationResult:
        """Run a `steps()` generation to its end (the caller holds the lock)."""
        batch = self.decode_batch()
        try:
            jobs = next(steps)
            while True:
                self.render_some(batch, jobs)
                jobs = steps.send(None)
        except StopIteration as stop:
            return stop.value

    def render_some(self, batch, jobs: Sequence) -> None:
        """Render what a `steps()` generation yielded: a sentence step (a plain list) whole; a
        pipeline's `Some` into `batch`, an open decoder batch, decoded until one of its jobs ends
        (the base model's unplanned candidates are rendered at once, in a batch of their own)."""
        if not isinstance(jobs, Some):
            self.render_jobs(jobs)
            return
        base = [j for j in jobs if j.engine == "base"]
        if base:
            self.base_engine().render(base)
        batch.add([j for j in jobs if j.engine != "base"])
        while batch.rows and not batch.step():
            pass

    def steps(
        self,
        prompt: str,
        p: GenParams,
        plan: list | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
        on_step=None,
    ):
        """The generation loop as a Python generator: it yields the SentenceJobs to render (a
        sentence step's: one per plan and the base model's unplanned candidates) for someone to
        render (`drive`, or the server's scheduler, which renders the jobs of concurrent requests
        in one batch) and returns the GenerationResult. A plain list is resumed once all its jobs
        are rendered; with PARALLEL > 1 the yields are `Some` (see `pipeline`), resumed as soon as
        any job in flight has ended. The prompt's KV cache travels from one step to the next.
        `plan`, `max_tokens` and `stop` are as checked by `prepare`; `on_step(step)` is called
        with each Step once decided."""
        run = self._start(prompt, p, max_tokens, stop, on_step)
        if p.parallel > 1:
            yield from self.pipeline(run, plan)
            return run.finish()
        res = run.res
        while (step := len(res.sentences)) < p.gen_steps:
            if run.budget is not None and run.budget <= 0:
                res.stop_reason = "length"
                break
            pin = self._pin(plan, step)
            # A step whose candidates the stop rules all refuse is planned and rendered again (a new
            # plan draw and new decoder seeds), up to RETRIES times, before the text ends there.
            for attempt in range(p.retries + 1):
                w = self._window(run, plan, step, attempt, pin)
                yield w.jobs
                if self._settle_window(run, w, attempt) != "retry":
                    break
            if w.chosen is None or run.res.stop_reason == "stop":
                break
        else:
            if run.budget is not None and run.budget <= 0:
                res.stop_reason = "length"
        return run.finish()

    def _settle_window(self, run: _Run, w: _Window, attempt: int, pipelined: bool = False) -> str:
        """Choose a rendered step's sentence and commit it: "kept", "retry" (every candidate
        refused and a retry left), "end" (refused with no retry left, or a stop string)."""
        self._choose(run, w, attempt, count_decoder=not pipelined)
        if w.chosen is None:
            run.record(Step(w.planned, w.scored, None, None, None, w.timings, w.ex_chosen, w.pinned))
            if attempt < run.p.retries:
                return "retry"
            run.res.stop_reason = "empty" if all(not c for c in w.cands) else "repeat"  # every non-empty one repeats
            return "end"
        c = w.chosen
        st = Step(w.planned, w.scored, c, w.cands[c], w.scored[c]["codes"], w.timings, w.ex_chosen, w.pinned,
                  w.rendered[c]["tokens"])  # fmt: skip
        return "end" if run.commit(st, w.x[c]) else "kept"

    def _start(self, prompt: str, p: GenParams, max_tokens: int | None, stop: Sequence[str], on_step) -> _Run:
        """A generation's state before its first sentence: the prompt's sentences and their guards."""

        t_start = time.perf_counter()
        sents = self.split(prompt)
        if not sents:
            raise NextSpeedError("the prompt has no sentences")
        hist_emb = self.embed(sents)
        text = _Text(
            history=list(sents),
            hist_emb=hist_emb,
            ctx_codes=self.rvq.encode(hist_emb, beam=self.beam).tolist(),
            seen={normalize_text(s) for s in sents},
            spans=set().union(*(word_spans(s, p.repeat_span) for s in sents)),  # copy guard: earlier word runs
            earlier=copy_ids(self.tok, sents) if p.no_copy_ngram > 0 else [],  # and their tokens, for NO_COPY_NGRAM
        )
        res = GenerationResult(prompt=prompt, sentences=[], planned=[], realized=[], params=asdict(p))
        tot = {"prompt": time.perf_counter() - t_start, "planner": 0.0, "decoder": 0.0, "rerank": 0.0}
        lookahead = p.parallel > 1
        if lookahead:
            tot["verify"] = 0.0
            res.drafts = {"drafted": 0, "accepted": 0, "refused": 0, "rejected": 0}
        # PARALLEL=1: one prompt cache per plan slot, kept across steps; PARALLEL > 1: a pool that
        # every prompt (steps, drafts, verification rows) starts from
        # (bounded: a cache of a 160-token prompt holds about 7 MB of keys and values)
        pool = PrefixPool(min(2 * p.parallel + p.plans + 4, POOL_MAX)) if lookahead and self.use_kv else None
        caches = [PromptCache() if self.use_kv and pool is None else None for _ in range(p.plans)]
        return _Run(p=p, text=text, res=res, tot=tot, t_start=t_start, gen=self.torch.Generator().manual_seed(p.seed),
                    budget=max_tokens, stop=tuple(stop), on_step=on_step, pool=pool, caches=caches,
                    base_cache=PromptCache(), tok=self.tok)  # fmt: skip

    def _window(self, run: _Run, plan: list | None, step: int, attempt: int, pin: list[int]) -> _Window:
        """Plan the next sentence after the real text and make the jobs that render it."""
        p, text = run.p, run.text
        # Without rerank nothing chooses among candidates: one plan, one candidate (the spec's ablation).
        pc = p if p.rerank else replace(p, plans=1, unplanned=0)
        t0 = time.perf_counter()
        temp = p.plan_temp if attempt == 0 else max(p.plan_temp, RETRY_PLAN_TEMP)
        plans = self.sample_plans(text.ctx_codes, text.hist_emb, pin, pc, temp, run.gen)
        t1 = time.perf_counter()
        exemplars = [
            self.exemplars_for(pl, exclude=set(text.history), avoid=text.hist_emb, avoid_cos=p.repeat_cos)
            for pl in plans
        ]
        context_text, text.ctx_start = self.context_for(text.history, text.ctx_start, plans[0], exemplars[0])
        ps = self._render_params(run)
        seed = p.seed * 1000 + step + RETRY_SEED_STRIDE * attempt
        guards = {"copy_spans": text.spans, "earlier_ids": text.earlier, "written_ids": text.written}
        jobs = [
            self.make_job(
                context_text, pl, ps, seed=seed + PLAN_SEED_STRIDE * k, exemplars=ex, cache=run.caches[k], **guards
            )  # fmt: skip
            for k, (pl, ex) in enumerate(zip(plans, exemplars))
        ]
        for job in jobs:
            job.pool = run.pool
        if pc.unplanned:
            base_seed = seed + PLAN_SEED_STRIDE * 8
            jobs.append(self.unplanned_job(text.history, ps, base_seed, run.base_cache, *guards.values()))
        return _Window(plans=plans, exemplars=exemplars, jobs=jobs, unplanned=bool(pc.unplanned),
                       timings={"planner": t1 - t0}, t_rendered=t1, pinned=len(pin))  # fmt: skip

    def _render_params(self, run: _Run) -> GenParams:
        """The decoder's settings for a sentence: one candidate without rerank, no more new
        tokens than the MAX_TOKENS budget has left."""
        p = run.p if run.p.rerank else replace(run.p, n_cand=1)
        if run.budget is not None and run.budget < p.max_new_tokens:
            p = replace(p, max_new_tokens=max(run.budget, 1))
        return p

    def _choose(self, run: _Run, w: _Window, attempt: int, count_decoder: bool = True) -> None:
        """After the window's jobs are rendered: judge every candidate by the stop rules and the
        rerank, and pick the sentence (`w.chosen` stays None when every candidate is refused)."""
        p, text = run.p, run.text
        for k, job in enumerate(w.jobs[: len(w.plans)]):
            run.caches[k] = job.cache
        if w.unplanned:
            run.base_cache = w.jobs[-1].cache
        t2 = time.perf_counter()
        scored, x, cands, owner = [], [], [], []
        for k, job in enumerate(w.jobs):
            plan_k = w.plans[min(k, len(w.plans) - 1)]
            sc, xk = self.judge(plan_k, job.out, text.hist_emb, text.seen, text.spans, p, text.pairs)
            if job.engine == "base":  # compared with the first plan; marked as written without one
                sc = [dict(c, unplanned=True) for c in sc]
            scored += [dict(c, plan=k) for c in sc] if len(w.jobs) > 1 else sc
            x.append(xk)
            cands += [c["text"] for c in job.out]
            owner += [(k, i) for i in range(len(job.out))]
        # a cut-off sentence is kept only when no retry is left (or the token budget cut it)
        last = attempt == p.retries or (run.budget is not None and run.budget < p.max_new_tokens)
        w.chosen = select_candidate(scored, p, truncated_ok=last)
        k_chosen = min(owner[w.chosen][0], len(w.plans) - 1) if w.chosen is not None else 0
        w.planned, w.ex_chosen = w.plans[k_chosen], w.exemplars[k_chosen]
        if w.chosen is not None and scored[w.chosen].get("unplanned"):
            w.ex_chosen = []
        w.scored, w.x, w.cands = scored, np.concatenate(x), cands
        w.rendered = [r for job in w.jobs for r in job.out]
        w.timings.update(decoder=t2 - w.t_rendered, rerank=time.perf_counter() - t2)
        for k, v in w.timings.items():
            if count_decoder or k != "decoder":  # a pipeline times its decoder as a whole
                run.tot[k] += v

    def _pin(self, plan: list | None, i: int) -> list[int]:
        """Plan control's pinned codes for generated sentence `i` (an example's codes; [] when free)."""
        pin = plan[i] if plan and i < len(plan) else None
        if isinstance(pin, dict):  # steer by example: its codes (first levels) are the plan
            pin = self.codes_of(pin["example"], pin["levels"])
        return pin or []

    # ------------------------------------------------------------------ plan-parallel rendering
    def pipeline(self, run: _Run, plan: list | None):
        """PARALLEL > 1: the sentences planned ahead are rendered side by side, as a pipeline.

        Up to PARALLEL sentences after the real text are in flight at once: the first after the
        real text as a sentence step (its plans and unplanned candidates), the ones after it as
        drafts (`draft`), each written after stand-ins for the planned sentences before it. A
        sentence is decided in order, as soon as it has ended and everything before it is
        written: a step by the rerank, a draft by the rerank and then `verify_draft` against the
        real text now before it. A draft refused or rejected is written again as a step after the
        real text; the drafts after it stay in flight and meet their own verification. Whenever
        sentences are decided, new drafts are planned and join the batch, so the decoder's rows
        stay busy instead of waiting for the longest sentence beside them (continuous batching, Orca,
        Yu et al. 2022, applied to the sentences of one plan; speculative decoding's accept or
        redo, Leviathan et al. 2023, at the sentence level).

        Yields `Some` lists of new jobs; it is resumed once any job in flight has ended."""
        p, res = run.p, run.res
        ahead: list[_Entry] = []  # the planned sentences after the real text, in order
        new: list = []
        while True:
            if not ahead:
                step = len(res.sentences)
                if step >= p.gen_steps:
                    break
                if run.budget is not None and run.budget <= 0:
                    res.stop_reason = "length"
                    break
                ahead.append(self._head(run, plan, step, 0))
                new += ahead[0].jobs
            while len(ahead) < p.parallel and len(res.sentences) + len(ahead) < p.gen_steps:
                if run.budget is not None and run.budget <= sum(e.jobs[0].params.max_new_tokens for e in ahead):
                    break  # MAX_TOKENS: what is in flight may use up the budget
                ahead.append(self._draft(run, plan, ahead))
                new += ahead[-1].jobs
            t0 = time.perf_counter()
            yield Some(new)
            run.tot["decoder"] += time.perf_counter() - t0
            new = []
            while ahead and all(j.out is not None for j in ahead[0].jobs):
                e = ahead.pop(0)
                outcome = (
                    self._settle_window(run, e.window, e.attempt, True) if e.window else self._settle_draft(run, e)
                )
                if outcome == "end":
                    return
                if outcome != "kept":  # written again after the real text: a retry, or a draft refused or rejected
                    attempt = e.attempt + 1 if outcome == "retry" else 0
                    ahead.insert(0, self._head(run, plan, e.pos, attempt))
                    new += ahead[0].jobs
                    break
            if len(res.sentences) >= p.gen_steps:
                break
        if run.budget is not None and run.budget <= 0:
            res.stop_reason = "length"  # as the sequential loop reports a budget used up by its last sentence

    def _head(self, run: _Run, plan: list | None, step: int, attempt: int) -> _Entry:
        """The pipeline's sentence right after the real text: a sentence step (`_window`)."""
        w = self._window(run, plan, step, attempt, self._pin(plan, step))
        return _Entry(pos=step, plan=w.plans[0], exemplars=w.exemplars[0], jobs=w.jobs, window=w, attempt=attempt)

    def _draft(self, run: _Run, plan: list | None, ahead: list[_Entry]) -> _Entry:
        """A sentence drafted `len(ahead)` sentences past the real text: its plan drawn after
        the plans of those in between (`plan_ahead`), its prompt the real text, a stand-in for
        each sentence in between (the first exemplar of its plan: the training sentence the plan
        is nearest), then its own exemplars and codes."""
        p, text = run.p, run.text
        j = len(ahead)
        pos = len(run.res.sentences) + j
        pin = self._pin(plan, pos)
        t0 = time.perf_counter()
        pl = self.plan_ahead(text, [e.plan for e in ahead], pin, p, run.gen)
        run.tot["planner"] += time.perf_counter() - t0
        stand_ins = [e.exemplars[0] for e in ahead if e.exemplars]
        ex = self.exemplars_for(
            pl, exclude=set(text.history) | set(stand_ins), avoid=text.hist_emb, avoid_cos=p.repeat_cos
        )
        ctx, start = self.context_for(text.history + stand_ins, text.ctx_start, pl, ex)
        if start < len(text.history):
            # the stand-ins pushed the context's start forward: the steps and drafts after this one
            # start there too, so their prompts share the real text's cache (PrefixPool)
            text.ctx_start = max(text.ctx_start, start)
        job = self.make_job(
            ctx,
            pl,
            self._render_params(run),
            seed=p.seed * 1000 + pos + LOOKAHEAD_SEED_STRIDE * j,
            exemplars=ex,
            copy_spans=text.spans,
            earlier_ids=text.earlier,
            written_ids=text.written,
        )
        job.pool = run.pool
        # where the real text the draft is verified after begins: the same sentence as its
        # context's first when every sentence in between has a stand-in (the written sentences
        # then take the stand-ins' places), else the first real sentence of its context
        real_start = start if len(stand_ins) == j else min(start, len(text.history) - 1)
        return _Entry(pos=pos, plan=pl, exemplars=ex, jobs=[job], lookahead=j, start=real_start, pinned=len(pin))

    def plan_ahead(
        self, text: _Text, between: Sequence[Sequence[int]], pin: Sequence[int], p: GenParams, gen
    ) -> list[int]:
        """The plan of the sentence after the planned ones `between` (their codes, in order),
        drawn in code space: each planned sentence joins the planner's context as its codes and,
        for a planner that reads embeddings, its codes' unit RVQ reconstruction (the vector the
        plan has for it; step 05's RECON_INPUT trains the planner to read it)."""
        codes, emb = list(text.ctx_codes), text.hist_emb
        if between:
            rec = self.rvq.decode(np.asarray(between))
            rec = rec / np.maximum(np.linalg.norm(rec, axis=1, keepdims=True), 1e-12)
            codes += [list(c) for c in between]
            emb = np.concatenate([emb, rec.astype(emb.dtype)])
        return self.draw_plan(codes, emb, pin, p, p.plan_temp, gen)

    def _settle_draft(self, run: _Run, e: _Entry) -> str:
        """Judge a rendered draft now that the real text before it is written: the stop rules
        and the rerank choose among its candidates, `verify_draft` checks the choice
        (PARALLEL_VERIFY), and a kept one is committed. "kept", "redo" (refused, rejected, or
        over the MAX_TOKENS budget: written again after the real text) or "end" (a stop string)."""
        p, text, res, tot = run.p, run.text, run.res, run.tot
        out = e.jobs[0].out
        t1 = time.perf_counter()
        scored, x = self.judge(e.plan, out, text.hist_emb, text.seen, text.spans, p, text.pairs)
        self.refuse_token_repeats(scored, text, p)
        chosen = select_candidate(scored, p, truncated_ok=False)
        t2 = time.perf_counter()
        tot["rerank"] += t2 - t1
        if chosen is not None and run.budget is not None and out[chosen]["tokens"] > run.budget:
            return "redo"  # MAX_TOKENS: the step after the real text writes it, cut to the budget
        res.drafts["drafted"] += 1
        if chosen is None:
            res.drafts["refused"] += 1
            return "redo"
        draft = {"plan": e.plan, "start": e.start, "context": e.jobs[0].context}
        verify = self.verify_draft(text, draft, out[chosen]["text"], run.pool, p) if p.parallel_verify else None
        tot["verify"] += time.perf_counter() - t2
        if verify is not None:
            log.debug("draft %d ahead: ll_real %.3f ll_draft %.3f -> %s", e.lookahead, verify["ll_real"],
                      verify["ll_draft"], "kept" if verify["accepted"] else "rejected")  # fmt: skip
            if not verify["accepted"]:
                res.drafts["rejected"] += 1
                return "redo"
        res.drafts["accepted"] += 1
        timings = {"planner": 0.0, "decoder": 0.0, "rerank": t2 - t1, "verify": time.perf_counter() - t2}
        st = Step(e.plan, scored, chosen, out[chosen]["text"], scored[chosen]["codes"], timings, e.exemplars,
                  e.pinned, out[chosen]["tokens"], lookahead=e.lookahead, verify=verify)  # fmt: skip
        return "end" if run.commit(st, x[chosen]) else "kept"

    def refuse_token_repeats(self, scored: list[dict], text: _Text, p: GenParams) -> None:
        """A draft was decoded before the sentences now before it were written, so NO_COPY_NGRAM
        could not steer it off copying them: a candidate that holds a run of that many tokens of
        an earlier sentence is refused instead. (NO_REPEAT_WRITTEN's short runs only steer: a
        draft avoids those of the sentences written when it was planned; refusing drafts for a
        3-token run shared with the sentence before them refused a third of them, and the
        rerank's RERANK_REPEAT still weighs repeated word pairs.)"""
        bans = [(n, ids) for n, ids in ((p.no_copy_ngram, text.earlier),) if n > 0 and ids]
        if not bans:
            return
        runs = [(n, {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)}) for n, ids in bans]
        for c in scored:
            if c.get("refused") or not c["text"]:
                continue
            own = self.tok(c["text"], add_special_tokens=False)["input_ids"]
            if any(tuple(own[i : i + n]) in seen for n, seen in runs for i in range(len(own) - n + 1)):
                c["refused"] = "repeat"

    def verify_draft(self, text: _Text, d: dict, draft: str, pool, p: GenParams) -> dict:
        """Whether a draft still fits once the sentences before it are real: its mean token
        log-likelihood under the decoder after the real text (`ll_real`) against after the text it
        was drafted after, stand-ins included (`ll_draft`); kept when ll_real >= ll_draft -
        VERIFY_TOL (speculative decoding's check, at the sentence level: Leviathan et al. 2023).
        Both read the text alone (no plan): the plan is the same in both and cancels out."""

        bos = _prompt_parts(self.tok, self.cond, d["plan"], None)[0]
        tail = self.tok(" " + draft, add_special_tokens=False)["input_ids"]
        rows = []
        for ctx in (" ".join(text.history[d["start"] :]), d["context"]):
            head = bos + self.tok(ctx, add_special_tokens=False)["input_ids"]
            if not head:
                head = [self.tok.eos_token_id]
            rows.append((head + tail, len(head)))
        real, drafted = (sum(lp) / max(len(lp), 1) for lp in self.engine.score_rows(rows, pool))  # one forward
        return {"ll_real": round(real, 4), "ll_draft": round(drafted, 4), "accepted": real >= drafted - p.verify_tol}

    def generate(self, prompt: str, max_sentences: int | None = None, **overrides: Any) -> str:
        """The generated continuation of `prompt` as text."""
        return self.run(prompt, max_sentences, **overrides).text


def run_generate(cfg: GenerateConfig, generator: SentenceGenerator | None = None) -> dict:
    """Run step 07: generate for PROMPT (or the built-in prompts) and write the JSON log."""
    gen = generator or SentenceGenerator(cfg)
    prompts = [cfg.prompt] if cfg.prompt else list(DEFAULT_PROMPTS)
    run_id = cfg.run_id or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = cfg.out_path or f"out/generate/{run_id}.json"
    results = [gen.run(pr) for pr in prompts]
    log_obj = {
        "run_id": run_id,
        "settings": to_dict(cfg),
        "device": gen.device,
        "dtype": gen.dtype,
        "load_seconds": round(gen.load_seconds, 2),
        "runs": [r.to_dict() for r in results],
    }
    write_json(out_path, log_obj)
    log_obj["out_path"] = out_path
    return log_obj
