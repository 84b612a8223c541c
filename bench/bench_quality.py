"""Whole-text quality, the standing benchmark: the loop's text against plain sampling, same prompts.

  uv run python bench/bench_quality.py [--quick] [--out PATH]          # on the main job's artifacts

Two prompt sets, each prompt a document's first 2 sentences and its reference the 3 a person
wrote next; every system writes 3 sentences per prompt, once per seed:
- `main`: the validation documents of step 04 with at least 5 sentences (never trained on),
  topped up with wiki articles the run never read when they are too few;
- `other`: State of the Union addresses (nothing here trains on them), one window at a random
  place in each of as many addresses.
Systems: `loop` (generation defaults), `loop_n1` (one candidate, no rerank), `oracle` (the loop
with the reference sentences' own codes pinned: the decoder's ceiling), `base_nucleus` and
`base_contrastive` (the packaged base LM without fine-tuning: nucleus sampling with the loop's
TEMP, TOP_P and REPETITION_PENALTY; contrastive search, alpha 0.6, k 4), `decoder_plain` (the loop
with the CODE_MODE=none decoder trained with the main decoder's budget and data, one candidate,
no rerank: the same fine-tuning without any plan; trained first into out/decoder_none when
missing or not comparable, about as long as step 06).
Measures (next_speed.evals.quality): coherence cos(prompt, text) and ref_sim cos(text, reference) with
the project's encoder, MAUVE against the references on the base LM's features (with its sample
sizes), SimCTG's rep-2/3/4 and diversity, sentences delivered of those asked, and kept-text
tokens/s (tokens of the kept text over the system's wall time, `--concurrency` generations in
flight for every system: the loop through the server's scheduler, the baselines as batches).
Generation settings come from the environment as for 07 (e.g. N_CAND=8), so a variant of the
loop is measured by setting its knobs. Writes JSON with a flat `summary`
(`<set>_<system>_coherence`, `_ref_sim`, `_mauve`, `_rep2`, `_diversity`, `_sentences`, `_tok_s`,
and `<set>_plan_gap`) to bench/results/bench_quality.json, and every text to
out/bench_quality_texts.jsonl.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SYSTEMS = ("loop", "loop_n1", "oracle", "base_nucleus", "base_contrastive", "decoder_plain")
SETS = ("main", "other")
KEYS = ("coherence", "ref_sim", "mauve", "rep2", "diversity", "sentences", "tok_s")


def run_loop(gen, items, seeds, n_sents, concurrency, overrides, pins=None):
    """Texts of the loop for every (item, seed), `concurrency` requests in flight through the
    server's scheduler (their sentence steps share decoder batches). Returns (outs, seconds)."""
    from next_speed.evals.quality import TextOut
    from next_speed.serving.scheduler import BatchScheduler

    jobs = [(i, s) for i in range(len(items)) for s in seeds]
    sched = BatchScheduler(
        gen, max_queue=2 * concurrency, max_batch_rows=concurrency * max(1, overrides.get("n_cand", 4))
    )
    outs: dict = {}
    t0 = time.perf_counter()
    try:
        flying: dict = {}
        todo = list(jobs)
        while todo or flying:
            while todo and len(flying) < concurrency:
                i, s = todo.pop(0)
                kw = dict(overrides, seed=s)
                if pins is not None:
                    kw["plan"] = pins[i]
                flying[sched.submit(items[i].prompt, n_sents, **kw)] = (i, s)
            done, _ = cf.wait(list(flying), return_when=cf.FIRST_COMPLETED)
            for f in done:
                i, s = flying.pop(f)
                res = f.result()
                outs[i, s] = TextOut(
                    res.text,
                    sum(st.tokens for st in res.steps if st.chosen is not None),
                    extra={
                        "stop_reason": res.stop_reason,
                        "sentences": len(res.sentences),
                        "retries": sum(1 for st in res.steps if st.chosen is None),
                        "unplanned": sum(
                            1 for st in res.steps if st.chosen is not None and st.candidates[st.chosen].get("unplanned")
                        ),
                    },
                )
    finally:
        sched.close()
    return [outs[j] for j in jobs], time.perf_counter() - t0


def run_base(model, tok, items, seeds, n_sents, concurrency, split, kind, p):
    """Texts of the base LM for every (item, seed), `concurrency` prompts per batch."""
    from next_speed.evals.quality import TextOut, contrastive_search, first_sentences, nucleus_sample_texts

    jobs = [(i, s) for i in range(len(items)) for s in seeds]
    texts = []
    t0 = time.perf_counter()
    for b in range(0, len(jobs), concurrency):
        chunk = jobs[b : b + concurrency]
        prompts = [items[i].prompt for i, _ in chunk]
        if kind == "base_nucleus":
            raw = nucleus_sample_texts(
                model,
                tok,
                prompts,
                n_sents,
                seed=chunk[0][1] * 100_003 + b,
                temp=p.temp,
                top_p=p.top_p,
                repetition_penalty=p.repetition_penalty,
                max_new_tokens=p.max_new_tokens * n_sents,
            )
        else:  # deterministic: the seed changes nothing, so one search serves every seed of a prompt
            raw = contrastive_search(model, tok, prompts, n_sents, max_new_tokens=p.max_new_tokens * n_sents)
        texts += [first_sentences(" " + t, n_sents, split) for t in raw]
    secs = time.perf_counter() - t0
    return [TextOut(t, len(tok(t, add_special_tokens=False)["input_ids"]) if t else 0) for t in texts], secs


def machine() -> str:
    """The CPU's model name and core count (what the figures were measured on)."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        name = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    return f"{name}, {os.cpu_count()} cores"


def prompt_sets(gen, n, seed, base: Path = ROOT, sets=SETS):
    """The main and other prompt sets (see the module docstring), from the main job's data under `base`."""
    from next_speed.core.artifacts import read_jsonl
    from next_speed.data.corpus import sotu_docs, wiki_docs
    from next_speed.evals.quality import main_prompt_set, other_prompt_set

    dec_val = base / "data/decoder_val.jsonl"
    sent_path = base / "data/sentences.jsonl"
    if not dec_val.is_file() or not sent_path.is_file():
        sys.exit(f"{dec_val} is missing: run the main job first (bash run.sh)")
    meta = json.loads((base / "data/sentences.meta.json").read_text())
    read = {r["doc_id"] for r in read_jsonl(sent_path)}

    def unread():  # the default corpus's articles that steps 01-06 never read (past MAX_DOCS)
        if meta.get("source") != "wiki":
            return
        for d in wiki_docs():
            if d["id"] not in read:
                yield d["id"], gen.split(d["text"])

    out = {"main": main_prompt_set(str(dec_val), n, seed, top_up=unread())}
    if "other" in sets:
        out["other"] = other_prompt_set([(d["id"], d["text"]) for d in sotu_docs()], n, gen.split, seed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 prompts per set, one seed (while iterating)")
    ap.add_argument("--prompts", type=int, default=60, help="prompts per set")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds, each prompt written once per seed")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated subset of " + ",".join(SETS))
    ap.add_argument(
        "--concurrency", type=int, default=8, help="generations in flight (loop) or prompts per batch (base)"
    )
    ap.add_argument("--out", default="bench/results/bench_quality.json")
    ap.add_argument("--texts", default="out/bench_quality_texts.jsonl", help="every generated text, one JSON a line")
    args = ap.parse_args()
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1")
    systems = [s for s in args.systems.split(",") if s]
    sets = [s for s in args.sets.split(",") if s]
    for name, got, valid in (("--systems", systems, SYSTEMS), ("--sets", sets, SETS)):
        bad = [x for x in got if x not in valid]
        if bad or not got:
            ap.error(f"{name}: {bad[0] if bad else 'nothing'} is not one of {', '.join(valid)}")
    if args.quick:
        args.prompts, seeds = 16, seeds[:1]
    if args.prompts < 8 or args.concurrency < 1:
        ap.error("--prompts must be at least 8 (MAUVE) and --concurrency at least 1")

    import numpy as np
    import torch

    from next_speed.core.artifacts import versions, write_json, write_jsonl
    from next_speed.core.config import resolve, to_dict
    from next_speed.core.console import setup_logging
    from next_speed.core.errors import NextSpeedError
    from next_speed.evals.quality import embed_texts, lm_features, mauve_score, plan_gap, text_measures
    from next_speed.generation.generate import GenerateConfig, SentenceGenerator
    from next_speed.models.decoder_model import load_base_model, load_base_tokenizer, load_decoder
    from next_speed.pipeline import PRESETS
    from next_speed.training.train_decoder import ensure_none_decoder

    setup_logging()
    logging.getLogger("next_speed.serving.scheduler").setLevel(logging.WARNING)
    n_sents = 3
    try:  # missing or stale artifacts, a bad knob: one line naming it, no traceback
        cfg = resolve(GenerateConfig, base=PRESETS["cpu"]["generate"])
        gen = SentenceGenerator(cfg)
        p = gen.params
        items = prompt_sets(gen, args.prompts, 0)
        items = {k: v for k, v in items.items() if k in sets}
        _, _, _, dmeta = load_decoder(gen.cfg.decoder_dir, "cpu")
        base_name = dmeta["train"]["model"]  # the base LM the decoder was fine-tuned from
        plain_gen = None
        if "decoder_plain" in systems:
            why = ensure_none_decoder(dmeta, "out/decoder_none")
            if why:
                sys.exit(f"bench_quality: no comparable CODE_MODE=none decoder: {why}")
            plain_gen = SentenceGenerator(replace(cfg, decoder_dir="out/decoder_none", code_mode="none"))
        base_tok, _, _ = load_base_tokenizer(base_name)
        base_model = load_base_model(base_name, "causal").eval()  # the base systems, and every system's MAUVE features
    except NextSpeedError as e:
        sys.exit(f"bench_quality: {e}")

    results, texts_out, summary = {}, [], {}

    def write_report() -> None:
        report = {
            "date": dt.date.today().isoformat(),
            "machine": machine(),
            "cpu_threads": torch.get_num_threads(),
            "settings": to_dict(cfg),
            "base_model": base_name,
            "quick": args.quick,
            "concurrency": args.concurrency,
            "versions": versions(),
            "sets": results,
            "summary": summary,
        }
        write_json(args.out, report)  # after every set: a run cut short keeps what it measured

    for set_name, its in items.items():
        print(f"{set_name}: {len(its)} prompts x {len(seeds)} seeds", flush=True)
        refs = [it.reference for it in its]
        prompts_emb = embed_texts(gen.embed, [it.prompt for it in its])
        refs_emb = embed_texts(gen.embed, refs)
        ref_feats = lm_features(base_model, base_tok, refs)
        per = {}
        for sysname in systems:
            t0 = time.perf_counter()
            if sysname == "loop":
                outs, secs = run_loop(gen, its, seeds, n_sents, args.concurrency, {})
            elif sysname == "loop_n1":
                outs, secs = run_loop(gen, its, seeds, n_sents, args.concurrency, {"n_cand": 1, "rerank": False})
            elif sysname == "oracle":
                pins = [[gen.codes_of(s) for s in it.reference_sents] for it in its]
                outs, secs = run_loop(gen, its, seeds, n_sents, args.concurrency, {}, pins=pins)
            elif sysname == "decoder_plain":
                outs, secs = run_loop(plain_gen, its, seeds, n_sents, args.concurrency, {"n_cand": 1, "rerank": False})
            else:
                outs, secs = run_base(
                    base_model, base_tok, its, seeds, n_sents, args.concurrency, gen.split, sysname, p
                )
            texts = [o.text for o in outs]
            rep = np.repeat(np.arange(len(its)), len(seeds))
            m = text_measures(texts, prompts_emb[rep], refs_emb[rep], embed_texts(gen.embed, texts), n_sents, gen.split)
            m.update(mauve_score(ref_feats, lm_features(base_model, base_tok, texts)) | {"seconds": round(secs, 1)})
            m["tok_s"] = round(sum(o.tokens for o in outs) / max(secs, 1e-9), 2)
            if outs and "retries" in outs[0].extra:
                m["retried_steps"] = sum(o.extra["retries"] for o in outs)
                # sentences the base model wrote without a plan (UNPLANNED), of all kept
                m["unplanned_share"] = round(
                    sum(o.extra["unplanned"] for o in outs) / max(1, sum(o.extra["sentences"] for o in outs)), 4
                )
                m["stop_reasons"] = {
                    r: sum(1 for o in outs if o.extra["stop_reason"] == r)
                    for r in {o.extra["stop_reason"] for o in outs}
                }
            per[sysname] = m
            for k in KEYS:
                summary[f"{set_name}_{sysname}_{k}"] = m[k]
            summary[f"{set_name}_{sysname}_mauve_n"] = m["q"]
            for (i, s), o in zip([(i, s) for i in range(len(its)) for s in seeds], outs):
                texts_out.append(
                    {
                        "set": set_name,
                        "system": sysname,
                        "doc": its[i].doc,
                        "seed": s,
                        "prompt": its[i].prompt,
                        "reference": its[i].reference,
                        "text": o.text,
                    }
                )
            write_jsonl(args.texts, texts_out)  # as it goes: a long run's texts can be read before it ends
            print(
                f"  {sysname:<17} coherence {m['coherence']:.3f}  ref_sim {m['ref_sim']:.3f}  mauve {m['mauve']:.3f}  "
                f"rep2 {m['rep2']:.3f}  div {m['diversity']:.3f}  sentences {m['sentences']:.3f}  "
                f"{m['tok_s']:.1f} tok/s  ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
        if {"oracle", "loop", "base_nucleus"} <= set(per):
            summary[f"{set_name}_plan_gap"] = plan_gap(
                per["oracle"]["ref_sim"], per["loop"]["ref_sim"], per["base_nucleus"]["ref_sim"]
            )
            print(f"  plan gap {summary[f'{set_name}_plan_gap']:.3f}", flush=True)
        results[set_name] = {
            "prompts": len(its),
            "seeds": seeds,
            "systems": per,
            "examples": [
                {
                    "prompt": its[i].prompt,
                    "reference": its[i].reference,
                    **{
                        s: t["text"]
                        for s in systems
                        for t in texts_out
                        if t["set"] == set_name
                        and t["system"] == s
                        and t["doc"] == its[i].doc
                        and t["seed"] == seeds[0]
                    },
                }
                for i in range(min(3, len(its)))
            ],
        }
        write_report()
    print(f"wrote {args.out} and {args.texts}")


if __name__ == "__main__":
    main()
