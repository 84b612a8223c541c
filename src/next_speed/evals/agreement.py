"""code_agreement_eval.py: does the chosen sentence carry the codes the planner asked for?

At validation positions (a sentence with at least one sentence before it in its document), the
planner plans the next tuple from the true previous sentences' codes and the decoder renders
max(N_CANDS) candidates for it, with generation's copy ban. Each setting picks with generation's
own selection rule (`generate.select_candidate`, after its stop rules) among the first N
candidates (i.i.d. samples, so the first N of the batch are a fair draw of N): rerank on, the
best match; rerank off, the first candidate the stop rules accept. `all_refused` counts the
positions where they refused all N (generation would plan again; the first candidate is scored).
Beside them, `codes` picks by code match alone (most levels matched from level 0, then cosine to
the plan; no stop rules), the bound of what reranking could agree. Reported per setting:
agreement per level, exact tuple match, mean matched prefix, and the round-trip measure of the
Large Concept Models paper (LCM team 2024, sec. 2.4):
the cosine between the chosen sentence's embedding and (a) the plan's RVQ reconstruction, (b) the
embedding of the true next sentence.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace

import numpy as np

from next_speed.core.artifacts import read_jsonl, write_json
from next_speed.core.config import knob
from next_speed.core.console import progress
from next_speed.core.errors import ConfigError, NextSpeedError
from next_speed.generation.generate import (
    GenerateConfig,
    SentenceGenerator,
    copy_ids,
    normalize_text,
    params_from,
    select_candidate,
    word_spans,
)
from next_speed.quant.rvq import levels_matched_rows

log = logging.getLogger(__name__)


@dataclass
class AgreementConfig(GenerateConfig):
    """Knobs of code_agreement_eval.py (plus the generation knobs)."""

    eval_positions: int = knob(200, env="EVAL_POSITIONS", min=1, help="validation positions scored")
    eval_steps: int = knob(
        3, env="EVAL_STEPS", min=1, help="at most this many positions per document (spreads them over documents)"
    )
    eval_docs: int | None = knob(
        None, env="EVAL_DOCS", min=1, help="at most this many validation documents (default: as many as needed)"
    )
    n_cands: str = knob("1,2,4", env="N_CANDS", help="candidate counts compared (comma-separated)")
    out_dec_val: str = knob("data/decoder_val.jsonl", env="OUT_DEC_VAL", help="validation rows (step 04)")
    out_json: str = knob("out/code_agreement.json", env="OUT_JSON", help="where to write the report JSON")

    def check(self) -> None:
        super().check()
        try:
            ns = sorted({int(x) for x in self.n_cands.split(",") if x.strip()})
        except ValueError:
            raise ConfigError(f"N_CANDS={self.n_cands!r} is not valid: use numbers like 1,2,4,8") from None
        if not ns or ns[0] < 1:
            raise ConfigError(f"N_CANDS={self.n_cands!r} is not valid: use numbers >= 1")
        if ns[-1] > 32:
            raise ConfigError(f"N_CANDS={self.n_cands!r} is not valid: at most 32 candidates")
        self.n_cands = ",".join(map(str, ns))


def _positions(cfg: AgreementConfig) -> list[tuple[list[dict], int]]:
    """(document rows, index of the scored sentence) pairs: documents in a seeded order, up to
    EVAL_STEPS positions each, until EVAL_POSITIONS."""
    docs: dict[int, list[dict]] = {}
    for r in read_jsonl(cfg.out_dec_val, required=("doc", "pos", "codes", "target", "context")):
        docs.setdefault(r["doc"], []).append(r)
    usable = [sorted(v, key=lambda r: r["pos"]) for v in docs.values() if len(v) >= 2]
    if not usable:
        raise NextSpeedError(f"{cfg.out_dec_val} has no validation document with two or more sentences")
    random.Random(cfg.seed).shuffle(usable)
    if cfg.eval_docs:
        usable = usable[: cfg.eval_docs]
    out = []
    for rows in usable:
        for i in range(1, min(len(rows), cfg.eval_steps + 1)):
            out.append((rows, i))
            if len(out) >= cfg.eval_positions:
                return out
    if len(out) < cfg.eval_positions:
        log.warning(
            "code agreement: only %d validation positions available (EVAL_POSITIONS=%d); raise EVAL_STEPS or VAL_FRAC",
            len(out),
            cfg.eval_positions,
        )
    return out


def _render_position(gen: SentenceGenerator, cfg: AgreementConfig, p, rows: list[dict], i: int, j: int, g):
    """Plan the sentence after rows[:i] (true previous codes) and render and judge its candidates
    as generation does. Returns (plan, judged candidates, their cosines to the true next
    sentence, cos(plan, next), cos(true codes' reconstruction, next))."""
    ctx_codes = [r["codes"] for r in rows[:i]]
    prev = [r["target"] for r in rows[:i]]
    prev_emb = gen.embed(prev)
    # a planner that reads embeddings gets the previous sentences' vectors, as generation does (i >= 1)
    planned = gen.planner.next_tuple(ctx_codes, greedy=p.plan_temp <= 0, temperature=p.plan_temp, top_k=p.plan_top_k,
                                     generator=g, at_doc_start=rows[0]["pos"] == 0, deep=p.plan_deep,
                                     embeddings=prev_emb if gen.planner.reads_embeddings else None)  # fmt: skip
    # the exemplars generation would pick after these sentences (same exclusions and guard)
    exemplars = gen.exemplars_for(planned, exclude=set(prev), avoid=prev_emb if prev else None, avoid_cos=p.repeat_cos)
    # rendered and judged as generation does: the same copy ban, stop rules and selection rule
    spans = set().union(*(word_spans(s, p.repeat_span) for s in prev))
    earlier = copy_ids(gen.tok, prev) if p.no_copy_ngram > 0 else None
    # the context text is the true previous sentences, as in training
    job = gen.make_job(rows[i]["context"], planned, p, seed=cfg.seed * 100_000 + j, exemplars=exemplars,
                       copy_spans=spans, earlier_ids=earlier)  # fmt: skip
    with gen._lock:
        gen.render_jobs([job])
    scored, x = gen.judge(planned, job.out, prev_emb, {normalize_text(s) for s in prev}, spans, p)
    nxt = gen.embed([rows[i]["target"]])[0]
    plan_vec = gen.rvq.decode(np.asarray([planned]))[0]
    rec = gen.rvq.decode(np.asarray([rows[i]["codes"]]))[0]
    cos = [float(v @ nxt / (np.linalg.norm(v) + 1e-12)) for v in (plan_vec, rec)]
    return planned, scored, x @ nxt, cos[0], cos[1]


def _setting_row(mode: str, n: int, items: list, refused: int) -> dict:
    pl = np.asarray([a for a, *_ in items])
    re_ = np.asarray([b for _, b, *_ in items])
    hit = pl == re_
    return {
        "rerank": mode,
        "n_cand": n,
        "per_level": hit.mean(0).round(4).tolist(),
        "exact": float(hit.all(1).mean()),
        "prefix": float(levels_matched_rows(hit).mean()),
        "cos_plan": round(float(np.mean([c for *_, c, _ in items])), 4),
        "cos_next": round(float(np.mean([c for *_, c in items])), 4),
        "n": len(items),
        "all_refused": refused,
    }


def code_agreement(cfg: AgreementConfig, generator: SentenceGenerator | None = None) -> dict:
    """Score planned against realized codes over validation positions; write OUT_JSON."""
    import torch

    gen = generator or SentenceGenerator(cfg)
    ns = [int(x) for x in cfg.n_cands.split(",")]
    p = params_from(cfg)
    p.n_cand = max(ns)
    positions = _positions(cfg)
    settings = [(mode, n) for mode in ("off", "on", "codes") for n in ns]
    picks: dict[tuple[str, int], list[tuple[list[int], list[int], float, float]]] = {s: [] for s in settings}
    refused = {s: 0 for s in settings}
    p_off = replace(p, rerank=False)
    g = torch.Generator().manual_seed(cfg.seed)
    plan_vs_next, recon_vs_next = [], []
    for j, (rows, i) in enumerate(progress(positions, desc="code agreement", unit="position")):
        planned, scored, cos_next, c_plan, c_rec = _render_position(gen, cfg, p, rows, i, j, g)
        plan_vs_next.append(c_plan)
        recon_vs_next.append(c_rec)
        for n in ns:
            for mode, q in (("off", p_off), ("on", p)):
                # generation's own rule over the first n candidates; when the stop rules refuse all
                # of them (generation would plan again), the first candidate is scored and counted
                pick = select_candidate(scored[:n], q)
                refused[(mode, n)] += pick is None
                b = 0 if pick is None else pick
                picks[(mode, n)].append((planned, scored[b]["codes"], scored[b]["cosine"], float(cos_next[b])))
            # beside it, the pure code-match pick (most levels matched from level 0, then cosine to
            # the plan; no stop rules): how far generation's rule trades code agreement for the text
            b = max(range(min(n, len(scored))), key=lambda c: (scored[c]["prefix"], scored[c]["cosine"]))
            picks[("codes", n)].append((planned, scored[b]["codes"], scored[b]["cosine"], float(cos_next[b])))
    rows_out = [_setting_row(mode, n, items, refused[(mode, n)]) for (mode, n), items in picks.items()]
    by = {(r["rerank"], r["n_cand"]): r for r in rows_out}
    n4 = 4 if 4 in ns else max(ns)
    summary = {
        "positions": len(positions),
        "l0_norerank": by[("off", ns[0])]["per_level"][0],
        f"l0_rerank_n{n4}": by[("on", n4)]["per_level"][0],
        "cos_plan_norerank": by[("off", ns[0])]["cos_plan"],
        f"cos_plan_rerank_n{n4}": by[("on", n4)]["cos_plan"],
        "cos_next_norerank": by[("off", ns[0])]["cos_next"],
        f"cos_next_rerank_n{n4}": by[("on", n4)]["cos_next"],
        f"l0_codes_rule_n{n4}": by[("codes", n4)]["per_level"][0],
        f"cos_next_codes_rule_n{n4}": by[("codes", n4)]["cos_next"],
        "cos_plan_vs_next": round(float(np.mean(plan_vs_next)), 4),
        "cos_recon_vs_next": round(float(np.mean(recon_vs_next)), 4),
    }
    report = {
        "K": gen.rvq.K,
        "V": gen.rvq.V,
        "docs": len({id(r) for r, _ in positions}),
        "positions": len(positions),
        "code_mode": gen.cond.code_mode,
        "decoder": gen.cfg.decoder_dir,
        "dtype": gen.dtype,
        "results": rows_out,
        "summary": summary,
    }
    write_json(cfg.out_json, report)
    return report


def format_agreement(rep: dict) -> str:
    K = rep["K"]
    lines = [
        f"code agreement, planned vs chosen sentence's codes ({rep['positions']} positions in {rep['docs']} "
        "validation docs)",
        f"{'rerank':<7}{'N':>3}"
        + "".join(f" {'L' + str(k):>6}" for k in range(K))
        + f" {'prefix':>7} {'exact':>6} {'cos plan':>9} {'cos next':>9}",
    ]
    for r in rep["results"]:
        lines.append(
            f"{r['rerank']:<7}{r['n_cand']:>3}"
            + "".join(f" {a:>6.3f}" for a in r["per_level"])
            + f" {r['prefix']:>7.3f} {r['exact']:>6.3f} {r['cos_plan']:>9.3f} {r['cos_next']:>9.3f}"
        )
    lines.append("rerank off/on: generation's own rule (select_candidate); codes: the pick with most levels matched")
    s = rep.get("summary", {})
    if "cos_plan_vs_next" in s:
        lines.append(
            f"references: the plan's reconstruction vs the true next sentence {s['cos_plan_vs_next']:.3f}; "
            f"the true next sentence's own RVQ reconstruction {s['cos_recon_vs_next']:.3f}"
        )
    return "\n".join(lines)
