"""Planner training throughput (sequences/s) on this machine, for the CPU preset's model size and
the spec's full size, on the real training rows (data/sent_lm_train.jsonl).

  uv run python bench/bench_planner.py [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F

    from next_speed.models.planner import Planner, PlannerModelConfig, load_rows, tensorize
    from next_speed.quant.rvq import RVQ

    rvq = RVQ.load("out/rvq.npz")
    rows = load_rows("data/sent_lm_train.jsonl")[:8192]
    x, y, _ = tensorize(rows, rvq.K, rvq.V)
    res = {"threads": torch.get_num_threads(), "seq_len": x.shape[1], "pointer": True}
    for name, d, L, H, bs, steps in (
        ("cpu preset (128x2)", 128, 2, 4, 64, args.steps),
        ("05 defaults (256x4)", 256, 4, 4, 64, args.steps),
        ("full preset (512x8)", 512, 8, 8, 256, max(5, args.steps // 6)),
    ):
        m = Planner(
            PlannerModelConfig(
                K=rvq.K, V=rvq.V, d_model=d, n_layers=L, n_heads=H, max_len=x.shape[1], codebook_dim=rvq.D, pointer=True
            )
        )  # step 05's default POINTER=1
        m.set_codebooks(rvq.codebooks)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        t0, n = 0.0, 0
        for step in range(steps + 5):
            if step == 5:
                t0, n = time.perf_counter(), 0
            idx = torch.randint(0, len(x), (bs,), generator=g)
            logits = m(x[idx], y[idx])
            loss = F.cross_entropy(logits.reshape(-1, rvq.V), y[idx].reshape(-1), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += bs
        dt = time.perf_counter() - t0
        res[name] = {
            "params": m.num_params(),
            "batch": bs,
            "seq_per_s": round(n / dt, 1),
            "step_ms": round(1000 * dt / steps, 1),
        }
    print(json.dumps(res, indent=2))
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/bench_planner.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
