"""Benchmark the generation loop against plain token-level sampling from the same decoder.

  uv run python bench/bench_generate.py [--sentences 3] [--repeats 2] [--out bench/results/bench_generate.json]

Needs trained artifacts (the main job). In one run, side by side:
- the loop with the engine (ENGINE=kv: prompt cache kept across sentences, one prefill shared by
  the candidates, ended rows dropped) at N_CAND 1, 4 and 8, rerank on;
- the same loop with ENGINE=hf (transformers' generate on the whole prompt, every sentence: the
  baseline) at N_CAND 1 and 4;
- plain `model.generate` sampling from the same decoder, given the same prompt text, with the
  loop's TEMP and TOP_P, of as many new tokens as the loop wrote per prompt, without codes or
  reranking (measured before and after
  the loops; their mean is the reference).
Tokens/s of a loop = tokens of the chosen sentences / wall time of `run()`; a step whose candidates
the stop rules all refused (a repeat) counts as time and no tokens, so this figure moves with what
the samples say. `rendered_tokens_per_s` also counts, for such a step, the tokens of its first
candidate: the engine's speed apart from the stop rules. Writes a JSON with a flat `summary`:
ratio_n1, ratio_n4, ratio_n8 (loop over plain, chosen sentences), rendered_ratio_n1/n4/n8, and the
baseline's hf_ratio_n1, hf_ratio_n4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PROMPTS = ["Paris is the capital of France.", "The Amazon is the largest rainforest on Earth."]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench/results/bench_generate.json")
    args = ap.parse_args()
    import torch

    from next_speed.artifacts import write_json
    from next_speed.config import resolve
    from next_speed.generate import GenerateConfig, SentenceGenerator

    gen = SentenceGenerator(resolve(GenerateConfig, {"device": os.environ.get("DEVICE", "cpu")}))
    res: dict = {"load_s": round(gen.load_seconds, 2), "threads": torch.get_num_threads(), "device": gen.device,
                 "sentences_per_prompt": args.sentences, "repeats": args.repeats, "prompts": PROMPTS, "loop": {}}
    gen.run(PROMPTS[0], 1, n_cand=1)  # warm-up

    def plain(tokens_per_prompt: int) -> dict:
        wall = 0.0
        made = 0
        for r in range(args.repeats):
            for p in PROMPTS:
                ids = gen.tok(p + "\n", return_tensors="pt").to(gen.device)
                torch.manual_seed(r)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = gen.model.generate(**ids, max_new_tokens=tokens_per_prompt, min_new_tokens=tokens_per_prompt,
                                             do_sample=True, top_p=gen.params.top_p, temperature=gen.params.temp,
                                             pad_token_id=gen.tok.pad_token_id)
                wall += time.perf_counter() - t0
                made += out.shape[1] - ids["input_ids"].shape[1]
        return {"tokens": made, "wall_s": round(wall, 2), "tokens_per_s": round(made / wall, 2)}

    def loop(engine: str, n: int) -> dict:
        gen.use_kv = engine == "kv"
        lat = {"planner": 0.0, "decoder": 0.0, "rerank": 0.0}
        n_sent = n_tok = n_steps = reused = prefilled = refused = 0
        wall = 0.0
        for r in range(args.repeats):
            for p in PROMPTS:
                t0 = time.perf_counter()
                out = gen.run(p, args.sentences, n_cand=n, rerank=True, seed=r)
                wall += time.perf_counter() - t0
                for st in out.steps:
                    n_steps += 1
                    if st.sentence is None and st.candidates:
                        refused += len(gen.tok(st.candidates[0]["text"], add_special_tokens=False)["input_ids"])
                    for k in lat:
                        lat[k] += st.timings[k]
                reused += out.timings.get("prompt_tokens_reused", 0)
                prefilled += out.timings.get("prompt_tokens_prefilled", 0)
                n_sent += len(out.sentences)
                n_tok += sum(len(gen.tok(s, add_special_tokens=False)["input_ids"]) for s in out.sentences)
        row = {"engine": engine, "n_cand": n, "sentences": n_sent, "steps": n_steps, "tokens": n_tok, "wall_s": round(wall, 2),
               "tokens_per_s": round(n_tok / wall, 2), "rendered_tokens_per_s": round((n_tok + refused) / wall, 2), "per_step_ms": {k: round(1000 * v / max(n_steps, 1), 1) for k, v in lat.items()}}
        if engine == "kv":
            row.update(prompt_tokens_reused=reused, prompt_tokens_prefilled=prefilled)
        print(json.dumps(row), flush=True)
        return row

    # the reference first, with the token count a loop of 1 candidate writes (a quick probe run)
    probe = loop("kv", 1)
    per_prompt = max(8, probe["tokens"] // (args.repeats * len(PROMPTS)))
    before = plain(per_prompt)
    for engine, n in (("kv", 1), ("kv", 4), ("kv", 8), ("hf", 1), ("hf", 4)):
        res["loop"][f"{engine}_n{n}"] = loop(engine, n)
    after = plain(per_prompt)
    ref = (before["tokens_per_s"] + after["tokens_per_s"]) / 2
    res["plain_sampling"] = {"tokens_per_prompt": per_prompt, "before": before, "after": after, "tokens_per_s": round(ref, 2)}
    L = res["loop"]
    res["summary"] = {"ratio_n1": round(L["kv_n1"]["tokens_per_s"] / ref, 3), "ratio_n4": round(L["kv_n4"]["tokens_per_s"] / ref, 3),
                      "ratio_n8": round(L["kv_n8"]["tokens_per_s"] / ref, 3),
                      **{f"rendered_ratio_n{n}": round(L[f"kv_n{n}"]["rendered_tokens_per_s"] / ref, 3) for n in (1, 4, 8)},
                      "hf_ratio_n1": round(L["hf_n1"]["tokens_per_s"] / ref, 3), "hf_ratio_n4": round(L["hf_n4"]["tokens_per_s"] / ref, 3),
                      "plain_tokens_per_s": round(ref, 2)}
    print(json.dumps(res["summary"], indent=2))
    write_json(args.out, res)


if __name__ == "__main__":
    main()
