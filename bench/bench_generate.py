"""Benchmark the generation loop against plain token-level sampling from the same decoder.

  uv run python bench/bench_generate.py [--sentences 3] [--repeats 3] [--dtypes auto,unpacked,bf16] [--out
  bench/results/bench_generate.json]

Needs trained artifacts (the main job). In one run, side by side:
- the loop with the engine (ENGINE=kv: prompt cache kept across sentences, one prefill shared by
  the candidates, ended rows dropped) at N_CAND 1, 4 and 8, rerank on;
- the same loop with ENGINE=hf (transformers' generate on the whole prompt, every sentence: the
  baseline) at N_CAND 1 and 4;
- plain `model.generate` sampling from the same decoder, given the same prompt text, with the
  loop's TEMP and TOP_P, of as many new tokens as the loop wrote per prompt, without codes or
  reranking (measured before every loop and after the last; their mean is the reference).
Tokens/s of a loop = tokens of the chosen sentences / wall time of `run()`; a step whose candidates
the stop rules all refused (a repeat) counts as time and no tokens, so this figure moves with what
the samples say. `rendered_tokens_per_s` also counts, for such a step, the tokens of its first
candidate: the engine's speed apart from the stop rules. Two figures say what N candidates cost:
`forward_ms_by_batch`, the model's decode forward alone at 1, 4, 8 and 32 rows (with the engine's
batch cache; `forward_ms_by_batch_dynamic_cache` with transformers' DynamicCache), and each loop's
`longest_over_chosen`, the tokens of a step's longest candidate over the chosen one's (a step
lasts until its longest candidate ends and is credited the chosen one).
Everything is measured for each DTYPE of `--dtypes` in turn (the decoder's weights at generation:
the default, then fp32 with `PACK_WEIGHTS=0` (`unpacked`: the matrices not reordered for oneDNN,
the baseline of that knob), then bf16; plain sampling writes the same number of tokens for all, from
the same decoder as the loop, packed or not); the first is the summary's plain keys, the others
prefixed (`unpacked_ratio_n4`, `bf16_ratio_n4`). `batch_logit_diff`: how far a row's
logits move when it is batched with others (why bf16 is not the CPU default).
Writes a JSON with a flat `summary`: ratio_n1, ratio_n4, ratio_n8 (loop over plain, chosen
sentences), rendered_ratio_n1/n4/n8, plain_tokens_per_s, and the baseline's hf_ratio_n1, hf_ratio_n4.
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
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--dtypes",
        default="auto,unpacked,bf16",
        help="DTYPE values measured one after the other (the first is the summary's); unpacked = fp32 with "
        "PACK_WEIGHTS=0",
    )
    ap.add_argument("--out", default="bench/results/bench_generate.json")
    args = ap.parse_args()
    import torch

    from next_speed.core.artifacts import write_json
    from next_speed.core.config import resolve
    from next_speed.core.runtime import cpu_has_native_bf16, pick_device, resolve_dtype
    from next_speed.generation.generate import GenerateConfig, SentenceGenerator

    device = pick_device(os.environ.get("DEVICE", "cpu"))
    # (name, DTYPE, PACK_WEIGHTS): "unpacked" is fp32 without the oneDNN-packed matrices (the baseline
    # of PACK_WEIGHTS); packing applies to fp32 on a CPU only
    variants = []
    for d in (d.strip() for d in args.dtypes.split(",") if d.strip()):
        dtype = resolve_dtype("fp32" if d == "unpacked" else d, device)
        pack = d != "unpacked"
        name = dtype if pack or device != "cpu" else "fp32-unpacked"
        if name not in [v[0] for v in variants]:
            variants.append((name, dtype, pack))
    res: dict = {
        "threads": torch.get_num_threads(),
        "device": device,
        "cpu_native_bf16": cpu_has_native_bf16(),
        "sentences_per_prompt": args.sentences,
        "repeats": args.repeats,
        "prompts": PROMPTS,
        "dtypes": {},
    }
    summary: dict = {"dtype": variants[0][0]}
    per_prompt = None  # plain sampling writes the same number of tokens for every DTYPE
    for i, (name, dtype, pack) in enumerate(variants):
        gen = SentenceGenerator(resolve(GenerateConfig, {"device": device, "dtype": dtype, "pack_weights": pack}))
        sec, summ, per_prompt = measure(gen, args, full=i == 0, per_prompt=per_prompt)
        sec["packed_linears"] = gen.packed_linears
        res["dtypes"][name] = sec
        prefix = "unpacked" if name == "fp32-unpacked" else name
        summary.update(summ if i == 0 else {f"{prefix}_{k}": v for k, v in summ.items()})
        del gen, sec
    res["summary"] = summary
    print(json.dumps(summary, indent=2))
    write_json(args.out, res)


def _id_range(gen) -> tuple[int, int]:
    """Ordinary token ids to feed the model at random: 100..20000 of a real vocabulary, all of a tiny one."""
    v = int(gen.model.config.vocab_size)
    return (100, 20000) if v > 20000 else (0, v)


def batch_logit_diff(gen, prompt_len: int = 120, pad: int = 40) -> dict:
    """How much a row's next-token logits move with its batch: the same row alone, then in a
    batch of 4, then in a batch of 4 left-padded by `pad` columns (max absolute difference). In
    fp32 the differences are rounding noise; in bf16 they are large enough to change tokens."""
    import torch
    import torch.nn.functional as F
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(*_id_range(gen), (1, prompt_len), generator=g).to(gen.device)
    nxt = torch.randint(*_id_range(gen), (4, 1), generator=g).to(gen.device)
    out = {}
    with torch.inference_mode():
        kv = DynamicCache(config=gen.model.config)
        gen.model(input_ids=ids, cache=kv, use_cache=True, logits_to_keep=1)
        base = [(layer.keys, layer.values) for layer in kv.layers]

        def row0(batch: int, left: int):
            c = DynamicCache(config=gen.model.config)
            for li, (k, v) in enumerate(base):
                c.update(
                    F.pad(k, (0, 0, left, 0)).expand(batch, -1, -1, -1).contiguous(),
                    F.pad(v, (0, 0, left, 0)).expand(batch, -1, -1, -1).contiguous(),
                    li,
                )
            mask = torch.cat(
                [torch.zeros(batch, left, dtype=torch.long), torch.ones(batch, prompt_len + 1, dtype=torch.long)], 1
            )
            o = gen.model(
                input_ids=nxt[:batch],
                cache=c,
                attention_mask=mask.to(gen.device),
                use_cache=True,
                position_ids=torch.full((batch, 1), prompt_len, device=gen.device),
                logits_to_keep=1,
            )
            return o.logits[0, -1].float()

        alone = row0(1, 0)
        out["batch4"] = round(float((row0(4, 0) - alone).abs().max()), 6)
        out[f"batch4_pad{pad}"] = round(float((row0(4, pad) - alone).abs().max()), 6)
    return out


def forward_ms(gen, batch: int, kv_len: int = 150, calls: int = 12, roomy: bool = True) -> float:
    """Median ms of one decode forward (one new token per row, the engine's attention mask) at
    `batch` rows over a `kv_len` cache: what a token costs the model alone, without sampling or
    bookkeeping. `roomy`: the engine's batch cache (tokens written in place); else transformers'
    DynamicCache (the cache copied by `torch.cat` at every token)."""
    import torch
    from transformers import DynamicCache

    from next_speed.generation.engine import roomy_layer

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(*_id_range(gen), (1, kv_len), generator=g, device=gen.device)
    times = []
    with torch.inference_mode():
        kv = DynamicCache(config=gen.model.config)
        gen.model(input_ids=ids, cache=kv, use_cache=True, logits_to_keep=1)
        rows = [
            (layer.keys.expand(batch, -1, -1, -1).contiguous(), layer.values.expand(batch, -1, -1, -1).contiguous())
            for layer in kv.layers
        ]
        if roomy:
            kv.layers = [roomy_layer(k, v, calls + 1) for k, v in rows]
        else:
            for layer, (k, v) in zip(kv.layers, rows):
                layer.keys, layer.values = k, v
        mask = torch.ones(batch, kv_len, dtype=torch.long, device=gen.device)
        nxt = torch.randint(*_id_range(gen), (batch, 1), generator=g, device=gen.device)
        for i in range(calls):
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long, device=gen.device)], 1)
            t0 = time.perf_counter()
            gen.model(
                input_ids=nxt,
                attention_mask=mask,
                cache=kv,
                use_cache=True,
                position_ids=torch.full((batch, 1), kv_len + i, device=gen.device),
                logits_to_keep=1,
            )
            if gen.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return round(1000 * sorted(times)[len(times) // 2], 2)


def measure(gen, args, full: bool, per_prompt: int | None = None) -> tuple[dict, dict, int]:
    """The loops and plain sampling with one loaded generator (one DTYPE); `full` adds the hf
    baseline loops. Plain sampling writes `per_prompt` tokens a prompt (default: what the first
    loop of 1 candidate wrote). Returns the section, its summary and `per_prompt`."""
    from next_speed.evals.quality import plain_decoder_sampling

    res: dict = {"dtype": gen.dtype, "load_s": round(gen.load_seconds, 2), "loop": {}}
    gen.run(PROMPTS[0], 1, n_cand=1)  # warm-up

    def plain(tokens_per_prompt: int) -> dict:
        wall = 0.0
        made = 0
        for r in range(args.repeats):
            for p in PROMPTS:
                n, secs = plain_decoder_sampling(gen, p, tokens_per_prompt, r)
                wall += secs
                made += n
        return {"tokens": made, "wall_s": round(wall, 2), "tokens_per_s": round(made / wall, 2)}

    def loop(engine: str, n: int) -> dict:
        gen.use_kv = engine == "kv"
        lat = {"planner": 0.0, "decoder": 0.0, "rerank": 0.0}
        n_sent = n_tok = n_steps = reused = prefilled = refused = longest = chosen_tok = 0
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
                    if st.sentence is not None:
                        lens = [len(gen.tok(c["text"], add_special_tokens=False)["input_ids"]) for c in st.candidates]
                        longest += max(lens)
                        chosen_tok += lens[st.chosen]
                reused += out.timings.get("prompt_tokens_reused", 0)
                prefilled += out.timings.get("prompt_tokens_prefilled", 0)
                n_sent += len(out.sentences)
                n_tok += sum(len(gen.tok(s, add_special_tokens=False)["input_ids"]) for s in out.sentences)
        row = {
            "engine": engine,
            "n_cand": n,
            "sentences": n_sent,
            "steps": n_steps,
            "tokens": n_tok,
            "wall_s": round(wall, 2),
            "tokens_per_s": round(n_tok / wall, 2),
            "rendered_tokens_per_s": round((n_tok + refused) / wall, 2),
            "per_step_ms": {k: round(1000 * v / max(n_steps, 1), 1) for k, v in lat.items()},
            "longest_over_chosen": round(longest / max(chosen_tok, 1), 3),
        }
        if engine == "kv":
            row.update(prompt_tokens_reused=reused, prompt_tokens_prefilled=prefilled)
        print(json.dumps(row), flush=True)
        return row

    # the reference first, with the token count a loop of 1 candidate writes (a quick probe run)
    if per_prompt is None:
        probe = loop("kv", 1)
        per_prompt = max(8, probe["tokens"] // (args.repeats * len(PROMPTS)))
    # plain sampling runs before every loop and once after the last: this machine's speed drifts
    # by tenths within minutes, and the mean of runs spread over the whole bench follows it
    plains = []
    for engine, n in (("kv", 1), ("kv", 4), ("kv", 8)) + ((("hf", 1), ("hf", 4)) if full else ()):
        plains.append(plain(per_prompt))
        res["loop"][f"{engine}_n{n}"] = loop(engine, n)
    plains.append(plain(per_prompt))
    ref = sum(p["tokens_per_s"] for p in plains) / len(plains)
    res["plain_sampling"] = {"tokens_per_prompt": per_prompt, "runs": plains, "tokens_per_s": round(ref, 2)}
    L = res["loop"]
    # interleaved and repeated (median of 3), so that drifts of the machine's speed hit both caches alike
    reps = {b: [(forward_ms(gen, b), forward_ms(gen, b, roomy=False)) for _ in range(3)] for b in (1, 4, 8, 32)}
    res["forward_ms_by_batch"] = {b: sorted(r for r, _ in v)[1] for b, v in reps.items()}
    res["forward_ms_by_batch_dynamic_cache"] = {b: sorted(d for _, d in v)[1] for b, v in reps.items()}
    res["batch_logit_diff"] = batch_logit_diff(gen)
    summary = {
        "ratio_n1": round(L["kv_n1"]["tokens_per_s"] / ref, 3),
        "ratio_n4": round(L["kv_n4"]["tokens_per_s"] / ref, 3),
        "ratio_n8": round(L["kv_n8"]["tokens_per_s"] / ref, 3),
        **{f"rendered_ratio_n{n}": round(L[f"kv_n{n}"]["rendered_tokens_per_s"] / ref, 3) for n in (1, 4, 8)},
        "plain_tokens_per_s": round(ref, 2),
    }
    if full:
        summary.update(
            hf_ratio_n1=round(L["hf_n1"]["tokens_per_s"] / ref, 3),
            hf_ratio_n4=round(L["hf_n4"]["tokens_per_s"] / ref, 3),
        )
    return res, summary, per_prompt


if __name__ == "__main__":
    main()
