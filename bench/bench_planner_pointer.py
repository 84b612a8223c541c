"""The planner with and without its pointer over the context's codes (`POINTER`), side by side:
step 05 with the CPU preset's planner settings, then `sent_lm_eval.py`, for each seed, in one run.

  uv run python bench/bench_planner_pointer.py                       # the main job's wiki data (run.sh first)
  uv run python bench/bench_planner_pointer.py --dir /tmp/sotu_all --prepare sotu --name sotu_all

`--prepare sotu` first runs steps 01-04 in `--dir` on every State of the Union address
(`CORPUS=sotu`, K=6, V=256, `CONTEXT_SENTS=8`, `VAL_FRAC=0.2`) unless they are there already;
embedding its ~70k sentences takes about 8 minutes on 2 CPU cores (`--max-docs 100`: the first
100 addresses, a smaller protocol: docs/results.md). `--eval-only`
re-evaluates the planners a previous run left in `<dir>/out/bench_pointer/` instead of training
them again. Writes bench/results/bench_planner_pointer_<name>.json: every run's summary, per-level
accuracy and where the next level-0 code was (`level0_in_context`), and the means over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from next_speed.pipeline import PRESETS  # noqa: E402

# the CPU preset's planner settings, as environment variables of step 05 (knob names are the fields')
PRESET = {k.upper(): str(v) for k, v in PRESETS["cpu"]["planner"].items()}
PREP = [
    ("01_make_sentences.py", {"CORPUS": "sotu"}),
    ("02_embed_sentences.py", {"BS": "64"}),
    ("03_fit_rvq.py", {"K": "6", "V": "256", "NITER": "20"}),
    ("04_build_training_sets.py", {"CONTEXT_SENTS": "8", "VAL_FRAC": "0.2"}),
]
KEYS = ("l0_top1", "l0_top5", "cos_next", "contrastive_acc")


def stage(script: str, cwd: Path, env: dict) -> None:
    """Run one of the spec's scripts in `cwd` with extra environment variables."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / script)], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True
    )
    if proc.returncode:
        last = ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]
        sys.exit(f"{script} failed in {cwd}: {last}")


def main() -> None:
    """Train (or with --eval-only re-evaluate) POINTER=0 and 1 per seed, then write the results."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=str(ROOT), help="a folder holding steps 01-04's outputs (data/, out/rvq.npz)")
    ap.add_argument("--prepare", choices=("sotu",), help="run steps 01-04 there first on this corpus, if missing")
    ap.add_argument("--max-docs", type=int, default=0, help="with --prepare: the first N documents only (MAX_DOCS)")
    ap.add_argument("--name", default="wiki", help="results file suffix")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--eval-only", action="store_true", help="re-evaluate the planners of a previous run")
    args = ap.parse_args()
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
    work = Path(args.dir).resolve()
    if args.prepare and not (work / "data/sent_lm_val.jsonl").is_file():
        work.mkdir(parents=True, exist_ok=True)
        for script, env in PREP:
            print(f"prepare: {script}", flush=True)
            stage(
                script,
                work,
                {**env, **({"MAX_DOCS": str(args.max_docs)} if args.max_docs and script.startswith("01") else {})},
            )
    if not (work / "data/sent_lm_val.jsonl").is_file():
        sys.exit(f"{work}/data/sent_lm_val.jsonl is missing: run the main job (bash run.sh) or pass --prepare")
    runs = []
    for seed in seeds:
        for pointer in (0, 1):
            out = f"out/bench_pointer/p{pointer}_s{seed}"
            if not args.eval_only:
                stage(
                    "05_train_sentence_lm.py",
                    work,
                    {**PRESET, "SEED": str(seed), "POINTER": str(pointer), "OUT_DIR": out},
                )
            elif not (work / out / "config.json").is_file():
                sys.exit(f"--eval-only: no planner in {work / out}: run without --eval-only first")
            stage("sent_lm_eval.py", work, {"OUT_DIR": out, "OUT_JSON": f"{out}/eval.json"})
            rep = json.loads((work / out / "eval.json").read_text())
            info = json.loads((work / out / "config.json").read_text())
            if info["model"].get("pointer", False) != bool(pointer) or info["train"]["seed"] != seed:
                sys.exit(
                    f"{work / out} holds another planner (pointer {info['model'].get('pointer')}, seed "
                    f"{info['train']['seed']})"
                )
            levels = rep["results"].get("planner (PLAN_DEEP=levels)", {})
            run = {
                "pointer": pointer,
                "seed": seed,
                "train_s": info["seconds"],
                "best_step": info["best"]["step"],
                **{k: rep["summary"][k] for k in KEYS},
                "levels_cos_next": round(levels.get("cos_next", float("nan")), 4),
                "levels_contrastive_acc": round(levels.get("contrastive_acc", float("nan")), 4),
                "levels_acc": [round(a, 4) for a in levels.get("acc", [])],
                "copy_acc": [round(a, 4) for a in rep["results"]["copy previous"]["acc"]],
                "level0_in_context": rep.get("level0_in_context"),
            }
            runs.append(run)
            print(json.dumps(run), flush=True)
    base = {k: rep["summary"][f"{k}_best_baseline"] for k in KEYS}
    base.update({f"{k}_name": rep["summary"][f"{k}_best_baseline_name"] for k in KEYS})
    mean = {}
    for pointer in (0, 1):
        sel = [r for r in runs if r["pointer"] == pointer]
        for k in KEYS + ("levels_cos_next", "levels_contrastive_acc"):
            mean[f"pointer{pointer}_{k}"] = round(sum(r[k] for r in sel) / len(sel), 4)
        for k in KEYS:
            mean[f"pointer{pointer}_{k}_ratio"] = round(mean[f"pointer{pointer}_{k}"] / base[k], 3)
    res = {
        "dir": str(work),
        "rows_val": rep["results"]["planner"]["n"],
        "preset": PRESET,
        "runs": runs,
        "best_baseline": base,
        "summary": mean,
    }
    path = ROOT / f"bench/results/bench_planner_pointer_{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(path)
    print(json.dumps(mean, indent=2))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
