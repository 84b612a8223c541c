"""Scale benchmark: steps 01, 03 and 04 on synthetic corpora of 100 thousand and 1
million sentences, side by side, and a 2-process torchrun planner run against 1 process.

  uv run python bench/bench_scale.py [--sizes 100000 1000000] [--fit-sample 50000] [--ddp-steps 60]

Each step runs in its own process (`next-speed <step>`), and its peak resident memory is read
from the kernel (`getrusage`: the process itself and, for step 01's splitting pool, its largest
child). Step 02 is replaced by stored random unit vectors (384-d float32, written in chunks with
the metadata step 02 writes), so the benchmark measures the data steps, not the encoder. Both
sizes use the same FIT_SAMPLE, so step 03 fits on equal samples and what grows is the encoding
pass. The planner runs use the 100k training sets, DROP=0 (dropout masks would differ between
runs), the same global batch; 1 process with 2 threads against 2 gloo processes with 1 thread each.
Writes bench/results/bench_scale.json with a flat `summary`:
`step01_rss_mb_100k`, `step01_rss_mb_1m`, `step03_...`, `step04_...`, their ratios, the output
arrays' size (`step03_out_mb_1m`: the codes), and `ddp_loss_gap`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

WORDS = [
    "river",
    "city",
    "music",
    "star",
    "planet",
    "history",
    "science",
    "language",
    "garden",
    "mountain",
    "ocean",
    "forest",
    "market",
    "school",
    "king",
    "queen",
    "empire",
    "treaty",
    "battle",
    "bridge",
    "engine",
    "theory",
    "number",
    "energy",
    "light",
    "water",
    "stone",
    "paper",
    "village",
    "island",
    "harbor",
    "railway",
    "festival",
    "church",
    "castle",
    "valley",
    "desert",
    "winter",
    "summer",
]

# Runs one `next-speed` stage and prints its peak memory and time. The peak is the process's own
# VmHWM (/proc/self/status): getrusage's ru_maxrss would carry over the high-water mark of the
# process that forked it (Linux keeps it across fork and exec). Step 01's splitting workers are
# forked from it: their largest peak is read from getrusage(RUSAGE_CHILDREN).
RUNNER = r"""
import json, resource, sys, time
from next_speed.cli import run_command
t = time.perf_counter()
run_command(sys.argv[1], sys.argv[2:])
hwm = [int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")][0]
print("BENCH " + json.dumps({"seconds": time.perf_counter() - t, "rss_self_mb": hwm / 1024,
                             "rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def write_corpus(path: Path, n_sentences: int, per_doc: int = 10, seed: int = 0) -> None:
    """Documents of `per_doc` sentences of 6-16 words each (about 40-120 characters)."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for d in range(0, n_sentences, per_doc):
            sents = []
            for _ in range(min(per_doc, n_sentences - d)):
                w = [WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(6, 17))]
                sents.append(" ".join(w).capitalize() + ".")
            fh.write(json.dumps({"id": f"doc{d // per_doc}", "text": " ".join(sents)}) + "\n")


def fake_embeddings(workdir: Path, dim: int = 384, chunk: int = 100_000) -> int:
    """Stand-in for step 02: unit random vectors, one per sentence, with step 02's metadata."""
    from next_speed.core.artifacts import make_meta, write_json
    from next_speed.core.config import resolve, to_dict
    from next_speed.data.embed import EmbedConfig

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with open("data/sentences.jsonl", "rb") as fh:
            n = sum(1 for _ in fh)
        rng = np.random.default_rng(1)
        arr = np.lib.format.open_memmap("data/embeddings.npy", mode="w+", dtype=np.float32, shape=(n, dim))
        for s in range(0, n, chunk):
            x = rng.standard_normal((min(chunk, n - s), dim)).astype(np.float32)
            arr[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        arr.flush()
        del arr
        cfg = resolve(EmbedConfig, environ={"EMB_MODEL": "random-unit-vectors"})
        meta = make_meta(
            "embeddings",
            to_dict(cfg),
            inputs={"sentences": cfg.sent_path},
            outputs={"embeddings": cfg.out_emb},
            counts={"rows": n, "dim": dim},
            model="random-unit-vectors",
            dim=dim,
            normalized=True,
        )
        write_json(cfg.out_meta, meta)
        return n
    finally:
        os.chdir(cwd)


def run_stage(workdir: Path, stage: str, args: list[str], env: dict) -> dict:
    full = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", **env}
    r = subprocess.run(
        [sys.executable, "-c", RUNNER, stage, *args], cwd=workdir, env=full, capture_output=True, text=True
    )
    if r.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{r.stderr[-3000:]}")
    line = [x for x in r.stdout.splitlines() if x.startswith("BENCH ")][-1]
    out = json.loads(line[6:])
    # step 01's workers are forked from the runner (so their figure includes its pages at the fork)
    out["rss_mb"] = max(out["rss_self_mb"], out["rss_children_mb"] if stage == "sentences" else 0)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def planner_run(workdir: Path, nproc: int, steps: int, out_dir: str) -> dict:
    args = [
        "--steps",
        str(steps),
        "--log-every",
        str(steps),
        "--drop",
        "0",
        "--bs",
        "64",
        "--device",
        "cpu",
        "--out-dir",
        out_dir,
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "OMP_NUM_THREADS": str(max(1, 2 // nproc))}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        str(ROOT / "05_train_sentence_lm.py"),
        *args,
    ]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"torchrun x{nproc} failed:\n{r.stderr[-3000:]}")
    info = json.loads((workdir / out_dir / "config.json").read_text())
    return {
        "processes": nproc,
        "seconds_per_step": info["seconds"] / steps,
        "wall_seconds": round(wall, 1),
        "final_val_loss": info["history"][-1]["val_loss"],
        "final_train_loss": info["history"][-1]["train_loss"],
    }


def label(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--fake-embeddings":
        print(fake_embeddings(Path(sys.argv[2])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--fit-sample", type=int, default=50_000, help="FIT_SAMPLE of step 03, the same at every size")
    ap.add_argument("--niter", type=int, default=10, help="NITER of step 03")
    ap.add_argument("--ddp-steps", type=int, default=60, help="planner steps of each torchrun run (0 = skip)")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed after)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/bench_scale.json"))
    a = ap.parse_args()

    base = Path(a.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
    results: dict = {"sizes": {}, "settings": vars(a)}
    summary: dict = {}
    try:
        for n in a.sizes:
            wd = base / label(n)
            shutil.rmtree(wd, ignore_errors=True)
            (wd / "data").mkdir(parents=True)
            write_corpus(wd / "docs.jsonl", n)
            row: dict = {}
            row["step01"] = run_stage(wd, "sentences", [], {"DOCS_JSONL": "docs.jsonl", "NUM_PROC": "2"})
            # in a process of its own: its memory-mapped writes must not count in this process's high-water mark
            r = subprocess.run([sys.executable, __file__, "--fake-embeddings", str(wd)], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"writing the stand-in embeddings failed:\n{r.stderr[-2000:]}")
            rows = int(r.stdout.split()[-1])
            row["step03"] = run_stage(wd, "rvq", [], {"FIT_SAMPLE": str(a.fit_sample), "NITER": str(a.niter)})
            row["step04"] = run_stage(wd, "trainsets", [], {})
            row["sentences"] = rows
            row["step03_out_mb"] = rows * 6 * 4 / 2**20  # the codes, N x K int32 (the only output array held)
            for s in ("step01", "step03", "step04"):
                row[s]["sentences_per_s"] = round(rows / row[s]["seconds"], 1)
                summary[f"{s}_rss_mb_{label(n)}"] = round(row[s]["rss_mb"], 1)
                summary[f"{s}_sent_per_s_{label(n)}"] = row[s]["sentences_per_s"]
            summary[f"step03_out_mb_{label(n)}"] = round(row["step03_out_mb"], 1)
            print(
                f"{label(n):>5}: "
                + "  ".join(
                    f"{s} {row[s]['rss_mb']:.0f} MB {row[s]['sentences_per_s']:.0f}/s"
                    for s in ("step01", "step03", "step04")
                ),
                flush=True,
            )
            if a.ddp_steps and n == a.sizes[0]:
                one = planner_run(wd, 1, a.ddp_steps, "out/p1")
                two = planner_run(wd, 2, a.ddp_steps, "out/p2")
                results["ddp"] = {"one_process": one, "two_processes": two, "sentences": rows}
                summary["ddp_loss_gap"] = round(abs(one["final_val_loss"] - two["final_val_loss"]), 6)
                summary["ddp_seconds_per_step_1"] = round(one["seconds_per_step"], 4)
                summary["ddp_seconds_per_step_2"] = round(two["seconds_per_step"], 4)
                print(
                    f"torchrun planner: 1 process {one['seconds_per_step']:.3f} s/step, val "
                    f"{one['final_val_loss']:.4f}; "
                    f"2 processes {two['seconds_per_step']:.3f} s/step, val {two['final_val_loss']:.4f}",
                    flush=True,
                )
            results["sizes"][label(n)] = row
            shutil.rmtree(wd, ignore_errors=True)
        if len(a.sizes) >= 2:
            lo, hi = label(a.sizes[0]), label(a.sizes[-1])
            for s in ("step01", "step03", "step04"):
                out_mb = summary.get(f"step03_out_mb_{hi}", 0) if s == "step03" else 0
                summary[f"{s}_rss_ratio"] = round(summary[f"{s}_rss_mb_{hi}"] / summary[f"{s}_rss_mb_{lo}"], 3)
                summary[f"{s}_within_1_3"] = summary[f"{s}_rss_mb_{hi}"] <= 1.3 * summary[f"{s}_rss_mb_{lo}"] + out_mb
    finally:
        if a.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    results["summary"] = summary
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
