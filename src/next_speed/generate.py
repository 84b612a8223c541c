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
import logging
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Sequence

import numpy as np

from .artifacts import StaleInputError, sha256_path, write_json
from .config import knob, to_dict
from .errors import ConfigError, NextSpeedError

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
    rerank: bool = knob(True, env="RERANK", help="re-encode candidates and keep the best code match")
    do_sample: bool = knob(True, env="DO_SAMPLE", help="sample the decoder (else greedy/beam-free decoding)")
    top_p: float = knob(0.9, env="TOP_P", min=0.01, max=1.0, help="decoder nucleus sampling mass")
    temp: float = knob(0.8, env="TEMP", min=0.01, max=5.0, help="decoder sampling temperature")
    max_new_tokens: int = knob(48, env="MAX_NEW_TOKENS", min=1, max=512, help="token limit per sentence")
    plan_temp: float = knob(0.7, env="PLAN_TEMP", min=0.0, max=5.0, help="planner sampling temperature (0 = greedy)")
    plan_top_k: int = knob(20, env="PLAN_TOP_K", min=0, help="planner top-k per level (0 = all)")
    seed: int = knob(0, env="SEED", help="random seed: same seed and inputs give the same text")


@dataclass
class GenerateConfig(GenParams):
    """Step 07 knobs: GenParams plus where the models are and where the log goes."""

    code_mode: str = knob("auto", env="CODE_MODE", choices=("auto", "inject", "special", "text", "none"),
                          help="which decoder: auto = out/decoder as trained; text/none = out/decoder_<mode>; checked against the decoder")
    prompt: str | None = knob(None, env="PROMPT", help="prompt text (default: three built-in prompts)")
    run_id: str | None = knob(None, env="RUN_ID", help="name of the log (default: a timestamp)")
    out_path: str | None = knob(None, env="OUT_PATH", help="log path (default out/generate/<RUN_ID>.json)")
    planner_dir: str = knob("out/sentence_lm", env="PLANNER_DIR", help="trained planner (step 05)")
    decoder_dir: str | None = knob(None, env="DECODER_DIR", help="trained decoder (default by CODE_MODE)")
    rvq_path: str = knob("out/rvq.npz", env="RVQ_PATH", help="RVQ codebooks (step 03)")
    rvq_meta: str = knob("out/rvq_meta.json", env="RVQ_META", help="RVQ metadata")
    emb_model: str | None = knob(None, env="EMB_MODEL", help="encoder for prompts and reranking (default: the one of step 02)")
    device: str = knob("auto", env="DEVICE", help="auto, cpu, cuda, cuda:N or mps")

    def check(self) -> None:
        if self.decoder_dir is None:
            from .train_decoder import default_decoder_dir

            self.decoder_dir = default_decoder_dir(self.code_mode)


PARAM_NAMES = tuple(f.name for f in fields(GenParams))


def params_from(cfg: GenParams) -> GenParams:
    return GenParams(**{n: getattr(cfg, n) for n in PARAM_NAMES})


def update_params(p: GenParams, overrides: dict[str, Any]) -> GenParams:
    """Apply per-call overrides, validated like knobs (unknown names are an error listing valid ones)."""
    from .config import _parse, fields_of, validate

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

    @property
    def text(self) -> str:
        return " ".join(self.sentences)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["text"] = self.text
        return d


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def match_score(planned: Sequence[int], realized: Sequence[int], cosine: float) -> tuple[int, float]:
    """Rerank key: (levels matched from level 0, cosine to the plan's reconstruction)."""
    prefix = 0
    for a, b in zip(planned, realized):
        if a != b:
            break
        prefix += 1
    return prefix, cosine


class SentenceGenerator:
    """Planner + decoder + encoder + RVQ, loaded once; `generate()` for text, `run()` for details.

    Thread-safe: calls are serialized by a lock, so concurrent server requests never share a
    half-updated model state or RNG.
    """

    def __init__(self, cfg: GenerateConfig | None = None, **overrides: Any):
        from .config import resolve

        if cfg is None:
            cfg = resolve(GenerateConfig, {k: v for k, v in overrides.items()})
        elif overrides:
            cfg = replace(cfg, **overrides)
        self.cfg = cfg
        self.params = params_from(cfg)
        self._lock = threading.Lock()
        self._load()

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        import torch

        from .decoder_model import code_token_ids, load_decoder
        from .embed import load_encoder
        from .rvq import load_rvq
        from .runtime import pick_device
        from .train_planner import PlannerRunner, load_planner

        cfg = self.cfg
        self.device = pick_device(cfg.device)
        t0 = time.perf_counter()
        self.rvq, rvq_meta = load_rvq(cfg.rvq_path, cfg.rvq_meta)
        rvq_hash = sha256_path(cfg.rvq_path)
        planner, pinfo = load_planner(cfg.planner_dir, self.device)
        if (pinfo["K"], pinfo["V"]) != (self.rvq.K, self.rvq.V):
            raise StaleInputError(f"the planner in {cfg.planner_dir} has K={pinfo['K']} V={pinfo['V']} but {cfg.rvq_path} has "
                                  f"K={self.rvq.K} V={self.rvq.V}: rerun steps 04-05")
        if pinfo.get("rvq_sha256") and pinfo["rvq_sha256"] != rvq_hash:
            raise StaleInputError(f"the planner in {cfg.planner_dir} was trained on codes of another {cfg.rvq_path}: rerun steps 04-05")
        self.planner = PlannerRunner(planner, pinfo["context_sents"])
        self.context_sents = pinfo["context_sents"]
        self.model, self.tok, self.cond, dmeta = load_decoder(cfg.decoder_dir, self.device)
        if cfg.code_mode != "auto" and self.cond.code_mode != cfg.code_mode:
            raise StaleInputError(f"CODE_MODE={cfg.code_mode} but the decoder in {cfg.decoder_dir} was trained with "
                                  f"CODE_MODE={self.cond.code_mode}: set CODE_MODE={self.cond.code_mode} or rerun step 06")
        if (self.cond.K, self.cond.V) != (self.rvq.K, self.rvq.V):
            raise StaleInputError(f"the decoder in {cfg.decoder_dir} has K={self.cond.K} V={self.cond.V} but {cfg.rvq_path} has "
                                  f"K={self.rvq.K} V={self.rvq.V}: rerun step 06 with these K and V")
        if dmeta.get("rvq_sha256") and dmeta["rvq_sha256"] != rvq_hash:
            raise StaleInputError(f"the decoder in {cfg.decoder_dir} was trained on codes of another {cfg.rvq_path}: rerun steps 04 and 06")
        self.encoder = load_encoder(cfg.emb_model or rvq_meta.get("encoder") or "all-MiniLM-L6-v2", device=self.device)
        dim = self.encoder.get_embedding_dimension() if hasattr(self.encoder, "get_embedding_dimension") else self.encoder.get_sentence_embedding_dimension()
        if dim != self.rvq.D:
            raise StaleInputError(f"the encoder gives {dim}-d vectors but {cfg.rvq_path} quantizes {self.rvq.D}-d ones: "
                                  f"set EMB_MODEL to the encoder of step 02")
        self._bad_ids = [[i] for i in code_token_ids(self.tok, self.cond)]
        from .sentences import _init_worker

        _init_worker("en")  # the prompt splitter, built once (not per call)
        self.load_seconds = time.perf_counter() - t0
        self.torch = torch
        log.info("generator loaded in %.1fs on %s (K=%d, V=%d, %s codes)", self.load_seconds, self.device, self.rvq.K,
                 self.rvq.V, self.cond.code_mode)

    # ------------------------------------------------------------------ pieces
    def split(self, text: str) -> list[str]:
        from .sentences import split_text

        return split_text(text)

    def embed(self, sentences: Sequence[str]) -> np.ndarray:
        return np.asarray(self.encoder.encode(list(sentences), normalize_embeddings=True, convert_to_numpy=True,
                                              show_progress_bar=False), dtype=np.float32)

    def exemplars_for(self, codes: Sequence[int], exclude: set[str] | None = None) -> list[str]:
        """The decoder's exemplars for a plan (empty for a decoder trained without EXEMPLARS)."""
        from .decoder_model import exemplar_bank

        bank = exemplar_bank(self.model)
        if bank is None or not self.cond.exemplars:
            return []
        return bank.lookup([list(codes)], self.cond.exemplars, exclude_texts=[exclude or set()])[0]

    def render(self, context_text: str, codes: Sequence[int], p: GenParams, seed: int,
               exemplars: Sequence[str] | None = None) -> list[str]:
        """Decode `p.n_cand` candidate sentences for one planned tuple, in one batch."""
        from .decoder_model import encode_example

        torch = self.torch
        if exemplars is None:
            exemplars = self.exemplars_for(codes)
        ex = encode_example(self.tok, self.cond, context_text, codes, None, exemplars)
        ids = torch.tensor([ex["input_ids"]], device=self.device)
        n = p.n_cand
        gen_kwargs = dict(max_new_tokens=p.max_new_tokens, do_sample=p.do_sample,
                          pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
        if p.do_sample:
            gen_kwargs.update(top_p=p.top_p, temperature=p.temp)
        if self._bad_ids:
            gen_kwargs["bad_words_ids"] = self._bad_ids
        import contextlib

        from .decoder_model import plan_injector

        inj = plan_injector(self.model)
        plan = inj.plan([ex["codes"]], [ex["plan_start"]]) if inj is not None else contextlib.nullcontext()
        with torch.no_grad(), plan:
            if self.cond.family == "causal" and ids.shape[1] > 1:
                # The shared prompt is read once and its KV cache copied to the candidates
                # (num_return_sequences would read it once per candidate).
                from transformers import DynamicCache

                cache = DynamicCache(config=self.model.config)
                self.model(input_ids=ids[:, :-1], cache=cache, use_cache=True)
                if n > 1:
                    cache.batch_repeat_interleave(n)
                torch.manual_seed(seed)
                batch = ids.expand(n, -1)
                out = self.model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), cache=cache, **gen_kwargs)
            else:
                torch.manual_seed(seed)
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_return_sequences=n,
                                          **gen_kwargs)
        if self.cond.family == "causal":
            out = out[:, ids.shape[1] :]
        texts = self.tok.batch_decode(out, skip_special_tokens=True)
        return [t.split("\n")[0].strip() for t in texts]

    def score(self, planned: Sequence[int], candidates: Sequence[str], return_embeddings: bool = False):
        """Re-encode candidates: their tuples, matched prefix and cosine to the plan's reconstruction
        (and their unit embeddings, (N, D), with `return_embeddings`)."""
        target = self.rvq.decode(np.asarray([planned]))[0]
        target = target / (np.linalg.norm(target) + 1e-12)
        x = self.embed(candidates)
        codes = self.rvq.encode(x)
        out = []
        for c, e, t in zip(candidates, x, codes):
            prefix, cos = match_score(planned, t.tolist(), float(e @ target))
            out.append({"text": c, "codes": t.tolist(), "prefix": prefix, "cosine": round(cos, 4)})
        return (out, x) if return_embeddings else out

    # ------------------------------------------------------------------ the loop
    def run(self, prompt: str, max_sentences: int | None = None, **overrides: Any) -> GenerationResult:
        """Generate up to `max_sentences` sentences after `prompt`, with per-call parameter overrides."""
        p = update_params(self.params, {**({"gen_steps": max_sentences} if max_sentences is not None else {}), **overrides})
        if not isinstance(prompt, str) or not prompt.strip():
            raise NextSpeedError("the prompt is empty: give at least one sentence")
        with self._lock:
            return self._run(prompt, p)

    def _run(self, prompt: str, p: GenParams) -> GenerationResult:
        torch = self.torch
        t_start = time.perf_counter()
        sents = self.split(prompt)
        if not sents:
            raise NextSpeedError("the prompt has no sentences")
        t0 = time.perf_counter()
        ctx_codes = self.rvq.encode(self.embed(sents)).tolist()
        t_prompt = time.perf_counter() - t0
        history = list(sents)
        seen = {_norm(s) for s in sents}
        gen = torch.Generator().manual_seed(p.seed)
        res = GenerationResult(prompt=prompt, sentences=[], planned=[], realized=[], params=asdict(p))
        tot = {"prompt": t_prompt, "planner": 0.0, "decoder": 0.0, "rerank": 0.0}
        for step in range(p.gen_steps):
            t0 = time.perf_counter()
            planned = self.planner.next_tuple(ctx_codes, greedy=p.plan_temp <= 0, temperature=p.plan_temp,
                                              top_k=p.plan_top_k, generator=gen, at_doc_start=True)
            t1 = time.perf_counter()
            context_text = " ".join(history[-self.context_sents :]) if self.context_sents else ""
            exemplars = self.exemplars_for(planned, exclude={h for h in history})
            cands = self.render(context_text, planned, p, seed=p.seed * 1000 + step, exemplars=exemplars)
            t2 = time.perf_counter()
            scored = self.score(planned, cands) if p.rerank else None
            t3 = time.perf_counter()
            ok = [i for i, c in enumerate(cands) if c and _norm(c) not in seen]
            if not ok:
                chosen = None
            elif p.rerank:
                chosen = max(ok, key=lambda i: (scored[i]["prefix"], scored[i]["cosine"], -i))
            else:
                chosen = 0 if 0 in ok else None
            timings = {"planner": t1 - t0, "decoder": t2 - t1, "rerank": t3 - t2}
            if chosen is None:
                reason = "empty" if all(not c for c in cands) else "repeat"  # every non-empty one repeats
                res.steps.append(Step(planned, scored or [{"text": c} for c in cands], None, None, None, timings, exemplars))
                res.stop_reason = reason
                break
            sentence = cands[chosen]
            realized = scored[chosen]["codes"] if scored else self.rvq.encode(self.embed([sentence]))[0].tolist()
            timings["rerank"] = time.perf_counter() - t2
            for k in timings:
                tot[k] += timings[k]
            res.steps.append(Step(planned, scored or [{"text": c} for c in cands], chosen, sentence, realized, timings, exemplars))
            res.sentences.append(sentence)
            res.planned.append(planned)
            res.realized.append(realized)
            history.append(sentence)
            seen.add(_norm(sentence))
            ctx_codes.append(realized)
        tot["total"] = time.perf_counter() - t_start
        res.timings = {k: round(v, 4) for k, v in tot.items()}
        return res

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
    log_obj = {"run_id": run_id, "settings": to_dict(cfg), "load_seconds": round(gen.load_seconds, 2),
               "runs": [r.to_dict() for r in results]}
    write_json(out_path, log_obj)
    log_obj["out_path"] = out_path
    return log_obj


def print_generation(log_obj: dict) -> None:
    for r in log_obj["runs"]:
        print(f"> {r['prompt']}")
        print(r["text"] if r["text"] else "(nothing generated)")
        t = r["timings"]
        print(f"  [{len(r['sentences'])} sentences, stop: {r['stop_reason']}; planner {t['planner']:.2f}s, "
              f"decoder {t['decoder']:.2f}s, rerank {t['rerank']:.2f}s, total {t['total']:.2f}s]")
    print(f"log: {log_obj['out_path']}")
