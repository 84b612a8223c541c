"""Beyond one machine: streamed steps 01/03/04 give what the in-memory ones gave, the
Ray Data path of step 02 gives the local path's embeddings, and torchrun runs of steps 05 and 06
(2 processes, gloo) match one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, free_port

from next_speed.core.artifacts import NpyRows
from next_speed.core.config import resolve
from next_speed.data.embed import EmbedConfig, embed_sentences
from next_speed.data.sentences import SentencesConfig, make_sentences
from next_speed.data.trainsets import TrainSetsConfig, build_training_sets
from next_speed.quant.rvq import RVQ, RVQConfig, fit_rvq


def _setup(docs_file, encoder):
    make_sentences(resolve(SentencesConfig, environ={"DOCS_JSONL": str(docs_file), "NUM_PROC": "1"}))
    embed_sentences(resolve(EmbedConfig, environ={"EMB_MODEL": encoder, "DEVICE": "cpu"}))


def test_npy_rows_reads_what_numpy_wrote(tmp_path):
    x = np.random.default_rng(0).standard_normal((103, 7)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    rows = NpyRows(tmp_path / "x.npy")
    assert rows.shape == (103, 7) and len(rows) == 103
    assert np.array_equal(np.concatenate([c for _, c in rows.chunks(10)]), x)
    assert np.array_equal(rows.read(100, 200), x[100:]) and np.array_equal(rows.take([3, 50, 102]), x[[3, 50, 102]])


def test_chunked_rvq_encoding_equals_whole_array(workdir, docs_file, tiny_encoder, monkeypatch):
    import next_speed.quant.rvq as rvq_mod

    _setup(docs_file, tiny_encoder)
    monkeypatch.setattr(rvq_mod, "ENCODE_CHUNK", 7)  # many chunks, the last one short
    meta = fit_rvq(resolve(RVQConfig, environ={"K": "3", "V": "4", "NITER": "5"}))
    x = np.load("data/embeddings.npy")
    rvq = RVQ.load("out/rvq.npz")
    assert np.array_equal(np.load("data/codes.npy"), rvq.encode(x))
    whole = rvq_mod.level_stats(x, rvq, rvq.encode(x))
    for a, b in zip(meta["levels"], whole):
        assert a["used"] == b["used"] and a["perplexity"] == pytest.approx(b["perplexity"])
        assert a["rel_error"] == pytest.approx(b["rel_error"], rel=1e-5) and a["cosine"] == pytest.approx(
            b["cosine"], rel=1e-5
        )
    # FIT_SAMPLE: the codebooks come from a seeded sample, every vector is still encoded
    meta = fit_rvq(resolve(RVQConfig, environ={"K": "3", "V": "4", "NITER": "5", "FIT_SAMPLE": "40"}))
    assert meta["counts"]["fit_rows"] == 40 and meta["counts"]["rows"] == len(x) > 40
    assert len(np.load("data/codes.npy")) == len(x)
    first = np.load("out/rvq.npz")["codebooks"]
    fit_rvq(resolve(RVQConfig, environ={"K": "3", "V": "4", "NITER": "5", "FIT_SAMPLE": "40"}))
    assert np.array_equal(first, np.load("out/rvq.npz")["codebooks"])  # the same seed, the same sample


def test_streamed_trainsets_with_small_code_chunks(workdir, docs_file, tiny_encoder, monkeypatch):
    import next_speed.data.trainsets as ts

    _setup(docs_file, tiny_encoder)
    fit_rvq(resolve(RVQConfig, environ={"K": "2", "V": "4", "NITER": "5"}))
    env = {"CONTEXT_SENTS": "2", "VAL_FRAC": "0.25"}
    build_training_sets(resolve(TrainSetsConfig, environ=env))
    whole = {
        p: Path(p).read_text()
        for p in (
            "data/sent_lm_train.jsonl",
            "data/sent_lm_val.jsonl",
            "data/decoder_train.jsonl",
            "data/decoder_val.jsonl",
        )
    }
    monkeypatch.setattr(ts, "CODES_CHUNK", 5)
    build_training_sets(resolve(TrainSetsConfig, environ=env))
    assert all(Path(p).read_text() == text for p, text in whole.items())


@pytest.mark.integration
def test_ray_path_equals_local_path(workdir, docs_file, tiny_encoder):
    """BACKEND=ray: Ray Data map_batches on a local Ray instance (2 CPUs), one encoder per actor;
    the same file, the same metadata keys, the same vectors (up to float rounding: batches differ);
    then step 03's encoding pass on Ray gives the local pass's codes."""
    pytest.importorskip("ray", reason="the optional 'ray' group is not installed (uv sync --extra ray)")
    make_sentences(resolve(SentencesConfig, environ={"DOCS_JSONL": str(docs_file), "NUM_PROC": "1"}))
    local = embed_sentences(resolve(EmbedConfig, environ={"EMB_MODEL": tiny_encoder, "DEVICE": "cpu"}))
    ray_meta = embed_sentences(
        resolve(
            EmbedConfig,
            environ={
                "EMB_MODEL": tiny_encoder,
                "DEVICE": "cpu",
                "BACKEND": "ray",
                "OUT_EMB": "data/emb_ray.npy",
                "OUT_META": "data/emb_ray.json",
            },
        )
    )
    a, b = np.load("data/embeddings.npy"), np.load("data/emb_ray.npy")
    assert a.shape == b.shape and np.allclose(a, b, atol=1e-5), np.abs(a - b).max()
    assert ray_meta["ray_actors"] >= 1 and set(local) <= set(ray_meta)
    assert ray_meta["counts"] == local["counts"] and ray_meta["inputs"] == local["inputs"]
    # step 03's encoding pass on Ray (chunks of 7 vectors over the actors): the same codes and stats
    import next_speed.quant.rvq as rvq_mod

    env = {"K": "3", "V": "4", "NITER": "5"}
    here = fit_rvq(resolve(RVQConfig, environ=env))
    codes = np.load("data/codes.npy")
    rvq_mod.ENCODE_CHUNK = 7
    try:
        there = fit_rvq(
            resolve(
                RVQConfig,
                environ={
                    **env,
                    "BACKEND": "ray",
                    "CODES_PATH": "data/codes_ray.npy",
                    "RVQ_META": "out/rvq_ray.json",
                    "RVQ_PATH": "out/rvq_ray.npz",
                },
            )
        )
    finally:
        rvq_mod.ENCODE_CHUNK = 65536
    assert np.array_equal(codes, np.load("data/codes_ray.npy")) and there["ray_actors"] >= 1
    for a_, b_ in zip(here["levels"], there["levels"]):
        assert a_["used"] == b_["used"] and a_["rel_error"] == pytest.approx(b_["rel_error"], rel=1e-5)


def _torchrun(n: int, script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}/src:{ROOT}", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(n),
        "--master-port",
        str(free_port()),
        str(ROOT / script),
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_planner_matches_one_process(tiny_run, tmp_path):
    """Step 05 under torchrun, 2 gloo processes, against 1 process with the same global batch."""
    import torch

    args = ["--steps", "12", "--log-every", "4", "--drop", "0", "--bs", "16", "--device", "cpu"]
    for n in (1, 2):
        r = _torchrun(n, "05_train_sentence_lm.py", [*args, "--out-dir", str(tmp_path / f"p{n}")], tiny_run)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("planner (") == 1  # rank 0 alone reports
    a = torch.load(tmp_path / "p1/sentence_lm.pt", weights_only=True)
    b = torch.load(tmp_path / "p2/sentence_lm.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)
    ca, cb = (json.loads((tmp_path / f"p{n}/config.json").read_text()) for n in (1, 2))
    assert cb["world_size"] == 2 and ca["world_size"] == 1
    assert [h["val_loss"] for h in ca["history"]] == pytest.approx([h["val_loss"] for h in cb["history"]], abs=1e-4)
    assert not list(tmp_path.glob("p2*.tmp-*"))  # written once, atomically


@pytest.mark.slow
def test_torchrun_decoder_matches_one_process(tiny_run, tmp_path):
    """Step 06 under torchrun (tiny decoder), 2 gloo processes against 1."""
    from safetensors.torch import load_file

    args = [
        "--model",
        "cache/tiny/decoder",
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--train-bs",
        "4",
        "--max-in",
        "64",
        "--max-out",
        "24",
        "--val-rows",
        "8",
        "--lr",
        "0.001",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--amp",
        "off",
    ]  # fp32: bf16 products of other micro-batch shapes round differently
    for n in (1, 2):
        r = _torchrun(n, "06_train_decoder.py", [*args, "--out-dir", str(tmp_path / f"d{n}")], tiny_run)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(tmp_path / "d1/model.safetensors"), load_file(tmp_path / "d2/model.safetensors")
    assert all(np.allclose(a[k].float().numpy(), b[k].float().numpy(), atol=1e-5) for k in a)
    ha, hb = (json.loads((tmp_path / f"d{n}/config.json").read_text())["next_speed"]["history"] for n in (1, 2))
    assert [h["val_loss"] for h in ha] == pytest.approx([h["val_loss"] for h in hb], abs=1e-5)
