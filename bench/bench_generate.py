"""Benchmark the generation loop against plain token-level sampling from the same decoder.

  uv run python bench/bench_generate.py [--sentences 3] [--repeats 2]

Needs trained artifacts (the main job). For N_CAND 1 and 4: per-sentence latency split into
planner, decoder and rerank, and tokens/s of the whole loop (tokens of the chosen sentences per
second of wall time). In the same run, plain `model.generate` sampling of the same number of
new tokens from the same decoder, given the same prompt text, without codes or reranking.
Writes bench/results/bench_generate.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PROMPTS = ["Paris is the capital of France.", "The Amazon is the largest rainforest on Earth."]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import torch

    from next_speed.config import resolve
    from next_speed.generate import GenerateConfig, SentenceGenerator

    gen = SentenceGenerator(resolve(GenerateConfig, {"device": "cpu"}))
    res: dict = {"load_s": round(gen.load_seconds, 2), "threads": torch.get_num_threads(), "loop": {}}
    gen.run(PROMPTS[0], 1, n_cand=1)  # warm-up
    for n in (1, 4):
        lat = {"planner": 0.0, "decoder": 0.0, "rerank": 0.0}
        n_sent = n_tok = 0
        wall = 0.0
        for r in range(args.repeats):
            for p in PROMPTS:
                t0 = time.perf_counter()
                out = gen.run(p, args.sentences, n_cand=n, seed=r)
                wall += time.perf_counter() - t0
                for st in out.steps:
                    if st.sentence is not None:
                        for k in lat:
                            lat[k] += st.timings[k]
                n_sent += len(out.sentences)
                n_tok += sum(len(gen.tok(s, add_special_tokens=False)["input_ids"]) for s in out.sentences)
        res["loop"][f"n_cand={n}"] = {"sentences": n_sent, "tokens": n_tok, "wall_s": round(wall, 2),
                                      "tokens_per_s": round(n_tok / wall, 2),
                                      "per_sentence_ms": {k: round(1000 * v / max(n_sent, 1), 1) for k, v in lat.items()}}
    # plain token-level sampling: same decoder, same prompt text, same number of new tokens
    n_tok = res["loop"]["n_cand=1"]["tokens"]
    per_prompt = max(1, n_tok // (args.repeats * len(PROMPTS)))
    wall = 0.0
    made = 0
    for r in range(args.repeats):
        for p in PROMPTS:
            ids = gen.tok(p + "\n", return_tensors="pt")
            torch.manual_seed(r)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = gen.model.generate(**ids, max_new_tokens=per_prompt, min_new_tokens=per_prompt, do_sample=True,
                                         top_p=0.9, temperature=0.8, pad_token_id=gen.tok.pad_token_id)
            wall += time.perf_counter() - t0
            made += out.shape[1] - ids["input_ids"].shape[1]
    res["plain_sampling"] = {"tokens": made, "wall_s": round(wall, 2), "tokens_per_s": round(made / wall, 2)}
    print(json.dumps(res, indent=2))
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/bench_generate.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
