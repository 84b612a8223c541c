"""The CLI and the spec's scripts: flags, one-line errors, exit codes."""

import json

import pytest
from conftest import run_script


@pytest.mark.slow
def test_help_is_fast_and_lists_stages():
    r = run_script("next_speed.cli", "--help")
    assert r.returncode == 0
    for name in ("sentences", "embed", "rvq", "trainsets", "train-planner"):
        assert name in r.stdout


@pytest.mark.slow
def test_script_bad_knob_is_one_line(tmp_path):
    r = run_script("03_fit_rvq.py", env={"K": "0"}, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: K=0 is too small: it must be at least 1"]


@pytest.mark.slow
def test_script_missing_input_names_step(tmp_path):
    r = run_script("04_build_training_sets.py", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "error: data/sentences.jsonl is missing: run step 01 (01_make_sentences.py / next-speed sentences) first"
    )


@pytest.mark.slow
def test_script_01_with_docs_jsonl_and_flags(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "The first sentence is long enough. The second one is also fine."}) + "\n")
    r = run_script(
        "01_make_sentences.py",
        "--min-len",
        "10",
        env={"DOCS_JSONL": str(docs), "MIN_LEN": "500", "MAX_LEN": "1000"},
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    rows = (tmp_path / "data/sentences.jsonl").read_text().splitlines()
    assert len(rows) == 2  # the flag (10) won over the environment (500)
    meta = json.loads((tmp_path / "data/sentences.meta.json").read_text())
    assert meta["config"]["min_len"] == 10 and meta["config"]["max_len"] == 1000


@pytest.mark.slow
def test_export_tool_offline_error(tmp_path):
    r = run_script(
        "tools/export_wikimedia_wikipedia.py", env={"MAX_DOCS": "3", "HF_HUB_OFFLINE": "1"}, cwd=tmp_path, timeout=300
    )
    assert r.returncode == 2, r.stderr
    assert "could not load Hugging Face dataset 'wikimedia/wikipedia'" in r.stderr and "CORPUS=wiki" in r.stderr
    assert not (tmp_path / "data/raw/docs.jsonl").exists()
