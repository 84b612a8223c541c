"""The main job (`next-speed run`) with the tiny preset, through the real CLI and in-process."""

import json
from pathlib import Path

import pytest
from conftest import run_script

from next_speed.core.config import resolve
from next_speed.core.errors import ConfigError, NextSpeedError
from next_speed.pipeline import RunConfig, run_pipeline

ARTIFACTS = [
    "data/sentences.jsonl",
    "data/sentences.meta.json",
    "data/embeddings.npy",
    "data/emb_meta.json",
    "out/rvq.npz",
    "out/rvq_meta.json",
    "data/codes.npy",
    "data/sent_lm_train.jsonl",
    "data/sent_lm_val.jsonl",
    "data/decoder_train.jsonl",
    "data/decoder_val.jsonl",
    "data/train_meta.json",
    "out/sentence_lm/sentence_lm.pt",
    "out/sentence_lm/config.json",
    "out/decoder/config.json",
    "out/decoder/model.safetensors",
    "out/sentence_lm/meta.json",
    "out/decoder/meta.json",
]


@pytest.mark.slow
def test_main_job_cli_tiny_then_rerun_skips(tmp_path):
    r = run_script("next_speed.cli", "run", "--preset", "tiny", env={"LANG": "C.UTF-8"}, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for a in ARTIFACTS:
        assert (tmp_path / a).exists(), a
    for kind, folder, weights in (
        ("planner", "out/sentence_lm", "sentence_lm.pt"),
        ("decoder", "out/decoder", "model.safetensors"),
    ):
        meta = json.loads((tmp_path / folder / "meta.json").read_text())  # checkpoints: the metadata of every artifact
        assert (
            meta["kind"] == kind and meta["format_version"] >= 1 and set(meta["input_roles"]) >= {"train", "val", "rvq"}
        )
        assert weights in meta["outputs"] and meta["config"]["seed"] == 0 and meta["history"]
    logs = list((tmp_path / "out/generate").glob("*.json"))
    assert len(logs) == 1
    runs = json.loads(logs[0].read_text())["runs"]
    assert len(runs) == 3 and all(run["text"].strip() for run in runs)
    assert "[7/7] generate" in r.stdout and "done in" in r.stdout
    r2 = run_script("next_speed.cli", "run", "--preset", "tiny", cwd=tmp_path, timeout=900)
    assert r2.returncode == 0, r2.stderr[-3000:]
    for i, stage in enumerate(["sentences", "embed", "rvq", "trainsets", "planner", "decoder"], 1):
        assert f"[{i}/7] {stage}: up to date, skipped" in r2.stdout
    # a changed knob reruns that stage and the ones after it
    r3 = run_script("next_speed.cli", "run", "--preset", "tiny", env={"CONTEXT_SENTS": "2"}, cwd=tmp_path, timeout=900)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert "[3/7] rvq: up to date, skipped" in r3.stdout and "[4/7] trainsets: up to date" not in r3.stdout
    assert "[5/7] planner: up to date" not in r3.stdout
    # SIGKILL in the middle of step 04's writes (its second file is about to be published): the
    # next stage refuses with one line, the rerun completes and removes the dead run's temporaries
    killer = (
        "import os, signal, sys\n"
        "real, n = os.replace, [0]\n"
        "def replace(a, b):\n"
        "    n[0] += '.tmp-' in str(a)\n"
        "    if n[0] == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(a, b)\n"
        "os.replace = replace\n"
        "from next_speed.cli import script_main\n"
        "sys.argv = ['04_build_training_sets.py']\n"
        "script_main('trainsets')\n"
    )
    r4 = run_script("-c", killer, env={"CONTEXT_SENTS": "3"}, cwd=tmp_path, timeout=300)
    assert r4.returncode == -9, r4.stderr[-2000:]
    assert list((tmp_path / "data").glob("*.tmp-*")), "the killed run left its temporary behind"
    r5 = run_script("05_train_sentence_lm.py", cwd=tmp_path, timeout=300)
    err = r5.stderr.strip().splitlines()
    assert (
        r5.returncode != 0 and "Traceback" not in r5.stderr and err[-1].startswith("error:") and "step 04" in err[-1]
    ), r5.stderr
    r6 = run_script("04_build_training_sets.py", env={"CONTEXT_SENTS": "3"}, cwd=tmp_path, timeout=300)
    assert r6.returncode == 0, r6.stderr[-2000:]
    assert not list((tmp_path / "data").glob("*.tmp-*"))
    r7 = run_script(
        "05_train_sentence_lm.py",
        env={"STEPS": "2", "WARMUP": "0", "LOG_EVERY": "1", "D_MODEL": "16", "N_HEADS": "2", "N_LAYERS": "1"},
        cwd=tmp_path,
        timeout=300,
    )
    assert r7.returncode == 0, r7.stderr[-2000:]


@pytest.mark.slow
def test_interrupted_stage_is_redone_and_nothing_half_read(tmp_path, monkeypatch):
    import next_speed.pipeline as P

    monkeypatch.chdir(tmp_path)
    table = P._stage_table()

    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid whose process is gone, as after a SIGKILL

    def interrupted(cfg):
        Path(f"{cfg.out_dir}.tmp-{dead.pid}-partial").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(
        P, "_stage_table", lambda: {**table, "planner": (table["planner"][0], interrupted, *table["planner"][2:])}
    )
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(resolve(RunConfig, environ={"PRESET": "tiny"}), environ={}, echo=lambda s: None)
    assert not Path("out/sentence_lm").exists()
    monkeypatch.setattr(P, "_stage_table", lambda: table)
    lines = []
    run_pipeline(resolve(RunConfig, environ={"PRESET": "tiny"}), environ={}, echo=lines.append)
    assert [ln for ln in lines if "skipped" in ln] == [
        f"[{i}/7] {s}: up to date, skipped" for i, s in enumerate(["sentences", "embed", "rvq", "trainsets"], 1)
    ]
    assert Path("out/sentence_lm/sentence_lm.pt").is_file()
    assert not list(Path("out").glob("sentence_lm.tmp-*"))  # the interrupted run's temporary is gone
    # --from reruns from a named stage; --force reruns all
    lines = []
    run_pipeline(
        resolve(RunConfig, {"from_stage": "decoder"}, environ={"PRESET": "tiny"}), environ={}, echo=lines.append
    )
    assert sum("skipped" in ln for ln in lines) == 5


def test_ambiguous_env_and_bad_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="OUT_DIR is set, but it means different knobs"):
        run_pipeline(resolve(RunConfig, environ={}), environ={"OUT_DIR": "x"}, echo=lambda s: None)
    Path("afile").write_text("")
    with pytest.raises(NextSpeedError, match="cannot create output folder afile"):
        run_pipeline(
            resolve(RunConfig, environ={"PRESET": "tiny"}), environ={"SENT_PATH": "afile/s.jsonl"}, echo=lambda s: None
        )
