"""code_agreement_eval.py: does the chosen sentence carry the codes the planner asked for?

For validation documents, at each position after the first, the planner plans the next tuple
from the true previous sentences' codes and the decoder renders max(N_CANDS) candidates for it.
Rerank on with N candidates keeps the best match among the first N (i.i.d. samples, so the
first N of the batch are a fair draw of N); rerank off keeps the first candidate, whatever N.
Reported per setting: agreement per level, exact tuple match and mean matched prefix.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np

from .artifacts import read_jsonl, write_json
from .config import knob
from .errors import ConfigError, NextSpeedError
from .generate import GenerateConfig, SentenceGenerator, params_from

log = logging.getLogger(__name__)


@dataclass
class AgreementConfig(GenerateConfig):
    """Knobs of code_agreement_eval.py (plus the generation knobs)."""

    eval_docs: int = knob(8, env="EVAL_DOCS", min=1, help="validation documents")
    eval_steps: int = knob(2, env="EVAL_STEPS", min=1, help="positions scored per document")
    n_cands: str = knob("1,2,4,8", env="N_CANDS", help="candidate counts compared (comma-separated)")
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
        self.n_cands = ",".join(map(str, ns))


def code_agreement(cfg: AgreementConfig, generator: SentenceGenerator | None = None) -> dict:
    gen = generator or SentenceGenerator(cfg)
    ns = [int(x) for x in cfg.n_cands.split(",")]
    p = params_from(cfg)
    p.n_cand = max(ns)
    docs: dict[int, list[dict]] = {}
    for r in read_jsonl(cfg.out_dec_val, required=("doc", "pos", "codes", "target")):
        docs.setdefault(r["doc"], []).append(r)
    usable = [sorted(v, key=lambda r: r["pos"]) for v in docs.values() if len(v) >= 2]
    if not usable:
        raise NextSpeedError(f"{cfg.out_dec_val} has no validation document with two or more sentences")
    random.Random(cfg.seed).shuffle(usable)
    import torch

    settings = [("off", n) for n in ns] + [("on", n) for n in ns]
    picks: dict[tuple[str, int], list[tuple[list[int], list[int]]]] = {s: [] for s in settings}
    g = torch.Generator().manual_seed(cfg.seed)
    for d, rows in enumerate(usable[: cfg.eval_docs]):
        for i in range(1, min(len(rows), cfg.eval_steps + 1)):
            ctx_codes = [r["codes"] for r in rows[:i]]
            ctx_text = " ".join(r["target"] for r in rows[max(0, i - gen.context_sents) : i])
            planned = gen.planner.next_tuple(ctx_codes, greedy=p.plan_temp <= 0, temperature=p.plan_temp,
                                             top_k=p.plan_top_k, generator=g, at_doc_start=rows[0]["pos"] == 0)
            cands = gen.render(ctx_text, planned, p, seed=cfg.seed * 1000 + d * 100 + i)
            scored = gen.score(planned, [c or " " for c in cands])
            for n in ns:
                picks[("off", n)].append((planned, scored[0]["codes"]))
                best = max(range(n), key=lambda j: (scored[j]["prefix"], scored[j]["cosine"], -j))
                picks[("on", n)].append((planned, scored[best]["codes"]))
    rows_out = []
    for (mode, n), pairs in picks.items():
        pl = np.asarray([a for a, _ in pairs])
        re_ = np.asarray([b for _, b in pairs])
        hit = pl == re_
        rows_out.append({"rerank": mode, "n_cand": n, "per_level": hit.mean(0).round(4).tolist(),
                         "exact": float(hit.all(1).mean()), "prefix": float(np.cumprod(hit, 1).sum(1).mean()), "n": len(pairs)})
    report = {"K": gen.rvq.K, "V": gen.rvq.V, "docs": min(len(usable), cfg.eval_docs), "positions": len(picks[settings[0]]),
              "code_mode": gen.cond.code_mode, "results": rows_out}
    write_json(cfg.out_json, report)
    return report


def format_agreement(rep: dict) -> str:
    K = rep["K"]
    lines = [f"code agreement, planned vs chosen sentence's codes ({rep['positions']} positions in {rep['docs']} validation docs)",
             f"{'rerank':<7}{'N':>3}" + "".join(f" {'L' + str(k):>6}" for k in range(K)) + f" {'prefix':>7} {'exact':>6}"]
    for r in rep["results"]:
        lines.append(f"{r['rerank']:<7}{r['n_cand']:>3}" + "".join(f" {a:>6.3f}" for a in r["per_level"]) + f" {r['prefix']:>7.3f} {r['exact']:>6.3f}")
    return "\n".join(lines)
