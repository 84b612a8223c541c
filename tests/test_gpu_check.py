"""bench/gpu_check.sh, the GPU recipe of the decoder's acceptance, run on CPU with --tiny."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_script_runs_with_the_tiny_preset(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LANG", "OUT_DIR", "VAL_ROWS", "EVAL_POSITIONS")}
    env.update(
        {
            "NEXT_SPEED_PYTHON": sys.executable,
            "GPU_CHECK_DIR": str(tmp_path / "gpu_check"),
            "PYTHONPATH": str(ROOT / "src"),
        }
    )
    r = subprocess.run(
        ["bash", str(ROOT / "bench/gpu_check.sh"), "--tiny"], env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("GPU_CHECK "))
    fig = json.loads(line[len("GPU_CHECK ") :])
    for k in (
        "decoder_loss_true",
        "decoder_loss_shuffled",
        "decoder_loss_none",
        "decoder_ratio_none",
        "decoder_loss_oracle_exemplars",
        "agreement_positions",
        "agreement_l0_norerank",
        "agreement_l0_rerank_n4",
        "agreement_cos_plan_rerank_n4",
    ):
        assert fig[k] is not None, k
    assert fig["agreement_positions"] == 6 and fig["device"] == "cpu"
    r = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), "--fast"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option --fast" in r.stderr


@pytest.mark.slow
def test_gpu_check_engine_script_runs_with_the_tiny_preset(tmp_path):
    """--engine: the engine and server check (bench_generate and bench_server on the main job's artifacts)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LANG", "OUT_DIR", "DEVICE")}
    env.update(
        {
            "NEXT_SPEED_PYTHON": sys.executable,
            "GPU_CHECK_DIR": str(tmp_path / "gpu_check"),
            "PYTHONPATH": str(ROOT / "src"),
        }
    )
    r = subprocess.run(
        ["bash", str(ROOT / "bench/gpu_check.sh"), "--tiny", "--engine"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("GPU_CHECK_ENGINE "))
    fig = json.loads(line[len("GPU_CHECK_ENGINE ") :])
    assert fig["device"] == "cpu"
    for k in (
        "generate_ratio_n1",
        "generate_ratio_n4",
        "generate_ratio_n8",
        "server_throughput_ratio_8",
        "server_throughput_ratio_16",
    ):
        assert isinstance(fig[k], (int, float)) and 0 < fig[k] < 50, (k, fig[k])
    for k in ("parallel_speedup_p2_n1", "parallel_speedup_p4_n1", "parallel_speedup_p4_n2"):
        assert isinstance(fig[k], (int, float)) and 0 < fig[k] < 50, (k, fig[k])
    assert "parallel_quality_gap_p4" in fig and "parallel_accept_rate_p4" in fig
    # the memory run's growth, 0 or below when memory stays flat: a leak of the tiny models' size would show
    assert isinstance(fig["server_rss_growth_mb"], (int, float)) and abs(fig["server_rss_growth_mb"]) < 300
    assert fig["server_errors"] == 0
