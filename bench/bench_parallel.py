"""Plan-parallel rendering against plain sampling from the same decoder, and what it costs the text.

  uv run python bench/bench_parallel.py [--prompts 20] [--sentences 8] [--out PATH]   # on the main job's artifacts

One run, the same prompts and seeds for every setting: the quality benchmark's default-corpus
prompts (a held-out document's first 2 sentences; bench_quality's `main` set), each continued by
`--sentences` sentences, one generation at a time, for PARALLEL 1, 2 and 4 x N_CAND 1 and 4 x
PARALLEL_VERIFY on and off (PARALLEL=1 has nothing to verify). The grid runs with PLANS=1 and
UNPLANNED=0, the planned sentences alone (the base model's unplanned candidates are rendered in a
batch of their own and would time another model), every other knob at its default or as set in
the environment. Plain sampling: `generate` of the same decoder from the same prompt text, the
loop's TEMP and TOP_P, as many new tokens as PARALLEL=1 wrote for that prompt.

Per setting: kept-text tokens/s (tokens of the kept sentences over the wall time of `run()`),
its speedup over plain sampling, the drafts' acceptance rate (kept / drafted lookahead
sentences) and what refused or rejected them, and the whole-text quality measures of
bench_quality (next_speed.evals.quality: coherence with the prompt, ref_sim with the person's next 3
sentences, SimCTG rep-2 and diversity) on the whole text; `ref_sim_3` on its first 3 sentences,
the length bench_quality writes.

JSON with a flat `summary`: speedup_p{P}_n{N} (verification on) and speedup_p{P}_n{N}_noverify,
accept_rate_p{P}[_n{N}][_noverify], quality_gap_p{P}[_n{N}][_noverify] = (ref_sim at PARALLEL=P -
ref_sim at PARALLEL=1) / ref_sim at PARALLEL=1 (negative = further from the person's text; each
setting's `quality_gap_se` is its paired standard error over the texts);
the unsuffixed keys (speedup_p4_n1, speedup_p4_n4, speedup_p2_n1, accept_rate_p4,
quality_gap_p4) are N_CAND=4 for quality and acceptance, the N_CAND of their name for speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def run_setting(gen, items, seeds, n_sents, kw) -> dict:
    """Every (prompt, seed) generated one at a time with settings `kw`."""
    texts, tokens, walls = [], [], []
    drafts = {"drafted": 0, "accepted": 0, "refused": 0, "rejected": 0}
    stops: dict[str, int] = {}
    for it in items:
        for s in seeds:
            t0 = time.perf_counter()
            res = gen.run(it.prompt, n_sents, seed=s, **kw)
            walls.append(time.perf_counter() - t0)
            texts.append(res.text)
            tokens.append(sum(st.tokens for st in res.steps if st.chosen is not None))
            for k in drafts:
                drafts[k] += res.drafts.get(k, 0)
            stops[res.stop_reason] = stops.get(res.stop_reason, 0) + 1
    return {"texts": texts, "tokens": tokens, "walls": walls, "drafts": drafts, "stop_reasons": stops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=20, help="default-corpus prompts (bench_quality's main set)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, each prompt generated once per seed")
    ap.add_argument("--sentences", type=int, default=8, help="sentences per text")
    ap.add_argument("--parallel", default="1,2,4")
    ap.add_argument("--n-cand", default="1,4")
    ap.add_argument("--out", default="bench/results/bench_parallel.json")
    ap.add_argument(
        "--texts", default="out/bench_parallel_texts.jsonl", help="every text, per setting, prompt and seed"
    )
    args = ap.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        pars = sorted({int(s) for s in args.parallel.split(",") if s.strip()} | {1})
        ncands = [int(s) for s in args.n_cand.split(",") if s.strip()]
    except ValueError:
        sys.exit("--seeds, --parallel and --n-cand take comma-separated whole numbers")
    if args.prompts < 1 or args.sentences < 1 or not seeds or not ncands:
        sys.exit("--prompts and --sentences must be at least 1, --seeds and --n-cand not empty")
    from next_speed.core.errors import NextSpeedError
    from next_speed.generation.generate import GenParams, update_params

    try:  # the grid's values are generation knobs: checked before anything loads (a bad one names its knob)
        for n in ncands:
            for P in pars:
                update_params(GenParams(), {"gen_steps": args.sentences, "n_cand": n, "parallel": P})
    except NextSpeedError as e:
        sys.exit(f"bench_parallel: {e}")

    import numpy as np
    from bench_quality import machine, prompt_sets

    from next_speed.core.artifacts import versions, write_json, write_jsonl
    from next_speed.core.config import resolve
    from next_speed.evals.quality import cosines, embed_texts, first_sentences, plain_decoder_sampling, text_measures
    from next_speed.generation.generate import GenerateConfig, SentenceGenerator

    try:
        gen = SentenceGenerator(resolve(GenerateConfig, {}))
        items = prompt_sets(gen, args.prompts, 0, base=Path.cwd(), sets=("main",))["main"]
    except NextSpeedError as e:
        sys.exit(f"bench_parallel: {e}")
    if not items:
        sys.exit("bench_parallel: the main job's validation documents hold no prompt (2 sentences + 3 of reference)")
    reps = [i for i in range(len(items)) for _ in seeds]
    prompts_emb = embed_texts(gen.embed, [it.prompt for it in items])[reps]
    refs_emb = embed_texts(gen.embed, [it.reference for it in items])[reps]
    fixed = {"plans": 1, "unplanned": 0}
    report: dict = {
        "command": "uv run python " + " ".join(sys.argv),
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "device": gen.device,
        "dtype": gen.dtype,
        "packed_linears": gen.packed_linears,
        "versions": versions(),
        "prompts": len(items),
        "seeds": seeds,
        "sentences": args.sentences,
        "fixed": fixed,
        "params": {k: v for k, v in vars(gen.params).items() if k not in ("n_cand", "parallel", "parallel_verify")},
        "settings": {},
        "summary": {},
    }
    gen.run(items[0].prompt, 2, **fixed)  # warm-up: first-call allocations are nobody's cost
    plain_done = False
    per_text: dict[str, np.ndarray] = {}  # ref_sim of every text, for the paired gaps' standard errors
    texts_out: list[dict] = []
    for n in ncands:
        for P in pars:
            for verify in [True] if P == 1 else [True, False]:
                name = f"p{P}_n{n}" + ("" if verify else "_noverify")
                kw = dict(fixed, n_cand=n, parallel=P, parallel_verify=verify)
                r = run_setting(gen, items, seeds, args.sentences, kw)
                texts = r.pop("texts")
                texts_emb = embed_texts(gen.embed, texts)
                m = text_measures(texts, prompts_emb, refs_emb, texts_emb, args.sentences, gen.split)
                per_text[name] = cosines(texts_emb, refs_emb)
                texts_out += [
                    {"setting": name, "doc": items[i].doc, "seed": s, "text": t}
                    for (i, s), t in zip([(i, s) for i in range(len(items)) for s in seeds], texts)
                ]
                write_jsonl(args.texts, texts_out)
                first3 = [first_sentences(t, 3, gen.split) for t in texts]
                m["ref_sim_3"] = text_measures(
                    first3, prompts_emb, refs_emb, embed_texts(gen.embed, first3), 3, gen.split
                )["ref_sim"]
                tok, wall = sum(r["tokens"]), sum(r["walls"])
                row = {
                    "kw": kw,
                    "tokens": tok,
                    "wall_s": round(wall, 2),
                    "tok_s": round(tok / wall, 2),
                    **m,
                    "drafts": r["drafts"],
                    "stop_reasons": r["stop_reasons"],
                    "accept_rate": round(r["drafts"]["accepted"] / r["drafts"]["drafted"], 4)
                    if r["drafts"]["drafted"]
                    else None,
                    "example": texts[0],
                }
                if P == 1 and not plain_done:  # plain sampling writes as many tokens per prompt as PARALLEL=1 did
                    pt = pw = 0.0
                    for (i, s), k in zip([(i, s) for i in range(len(items)) for s in seeds], r["tokens"]):
                        a, b = plain_decoder_sampling(gen, items[i].prompt, max(k, 1), s)
                        pt, pw = pt + a, pw + b
                    report["plain"] = {"tokens": int(pt), "wall_s": round(pw, 2), "tok_s": round(pt / pw, 2)}
                    plain_done = True
                row["speedup"] = round(row["tok_s"] / report["plain"]["tok_s"], 3)
                report["settings"][name] = row
                print(
                    f"{name:>16}: {row['tok_s']:6.1f} tok/s ({row['speedup']:.2f}x plain)  accept "
                    f"{row['accept_rate']}  "
                    f"ref_sim {m['ref_sim']:.3f} (3 sent. {m['ref_sim_3']:.3f})  coherence {m['coherence']:.3f} "
                    f" rep-2 {m['rep2']:.3f}",
                    flush=True,
                )
                write_json(args.out, report)  # after every setting: a run cut short keeps what it measured
    summ = report["summary"]
    S = report["settings"]
    summ["plain_tok_s"] = report["plain"]["tok_s"]
    for name, row in S.items():
        summ[f"speedup_{name}"] = row["speedup"]
        P, n = row["kw"]["parallel"], row["kw"]["n_cand"]
        base = S[f"p1_n{n}"]
        if P > 1:
            tail = name.split("_", 1)[1]  # n{N}[_noverify]
            summ[f"accept_rate_p{P}_{tail}"] = row["accept_rate"]
            summ[f"quality_gap_p{P}_{tail}"] = round((row["ref_sim"] - base["ref_sim"]) / base["ref_sim"], 4)
            diff = per_text[name] - per_text[f"p1_n{n}"]  # paired: same prompts and seeds
            row["quality_gap_se"] = (
                round(float(diff.std(ddof=1) / np.sqrt(len(diff)) / base["ref_sim"]), 4) if len(diff) > 1 else None
            )
    n_q = 4 if 4 in ncands else ncands[-1]
    for P in pars[1:]:
        for v in ("", "_noverify"):
            if f"accept_rate_p{P}_n{n_q}{v}" in summ:
                summ[f"accept_rate_p{P}{v}"] = summ[f"accept_rate_p{P}_n{n_q}{v}"]
                summ[f"quality_gap_p{P}{v}"] = summ[f"quality_gap_p{P}_n{n_q}{v}"]
    write_json(args.out, report)
    print(json.dumps(summ, indent=1))


if __name__ == "__main__":
    main()
