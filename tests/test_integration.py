"""Integration tier: the real packaged models and corpora on small slices (`-m integration`)."""

import json

import numpy as np
import pytest
from conftest import run_script

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_real_minilm_through_steps_01_04(tmp_path):
    env = {
        "CORPUS": "wiki",
        "MAX_DOCS": "60",
        "NUM_PROC": "2",
        "K": "3",
        "V": "16",
        "NITER": "10",
        "CONTEXT_SENTS": "4",
        "VAL_FRAC": "0.1",
        "DEVICE": "cpu",
    }
    for script in (
        "01_make_sentences.py",
        "02_embed_sentences.py",
        "03_fit_rvq.py",
        "04_build_training_sets.py",
        "rvq_recon_error.py",
    ):
        r = run_script(script, env=env, cwd=tmp_path)
        assert r.returncode == 0, f"{script}: {r.stderr[-2000:]}"
    sents = (tmp_path / "data/sentences.jsonl").read_text().splitlines()
    assert 150 <= len(sents) <= 400
    x = np.load(tmp_path / "data/embeddings.npy")
    assert x.shape == (len(sents), 384) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-4)
    # genuine MiniLM: related sentences (neighbours in one article) are closer than unrelated ones
    # (sentences of different articles)
    docs = np.asarray([json.loads(s)["doc"] for s in sents])
    same = docs[1:] == docs[:-1]
    near = (x[1:] * x[:-1]).sum(1)[same].mean()
    partner = np.roll(np.arange(len(x)), len(x) // 2)  # a sentence half the corpus away
    far = (x * x[partner]).sum(1)[docs != docs[partner]].mean()
    assert near > far + 0.1, (near, far)
    meta = json.loads((tmp_path / "data/emb_meta.json").read_text())
    assert meta["model"] == "all-MiniLM-L6-v2" and meta["dim"] == 384
    rep = json.loads((tmp_path / "out/rvq_recon_error.json").read_text())
    errs = [lv["rel_error"] for lv in rep["levels"]]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.9
    tm = json.loads((tmp_path / "data/train_meta.json").read_text())
    assert tm["counts"]["train_rows"] + tm["counts"]["val_rows"] == len(sents)


def test_minilm_is_genuine():
    from next_speed.data.embed import load_encoder

    m = load_encoder("all-MiniLM-L6-v2", device="cpu")
    e = m.encode(["A man is eating food.", "A man is eating a piece of bread."], normalize_embeddings=True)
    assert abs(float(e[0] @ e[1]) - 0.755) < 0.01


@pytest.mark.slow
def test_real_smollm2_trains_a_few_steps(tmp_path):
    env = {
        "CORPUS": "wiki",
        "MAX_DOCS": "40",
        "NUM_PROC": "1",
        "K": "2",
        "V": "8",
        "NITER": "5",
        "VAL_FRAC": "0.2",
        "DEVICE": "cpu",
    }
    for script in ("01_make_sentences.py", "02_embed_sentences.py", "03_fit_rvq.py", "04_build_training_sets.py"):
        r = run_script(script, env=env, cwd=tmp_path)
        assert r.returncode == 0, f"{script}: {r.stderr[-2000:]}"
    denv = {
        "MAX_STEPS": "4",
        "MAX_ROWS": "16",
        "VAL_ROWS": "8",
        "TRAIN_BS": "4",
        "EVAL_EVERY": "2",
        "MAX_IN": "128",
        "MAX_OUT": "40",
        "TRAIN_LAYERS": "2",
        "DEVICE": "cpu",
        "EXEMPLARS": "2",
        "WARMUP": "1",
        "LR": "3e-4",
    }
    r = run_script("06_train_decoder.py", env=denv, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path / "out/decoder/config.json").read_text())
    ns = cfg["next_speed"]
    assert ns["base_model"] == "smollm2-135m" and ns["conditioning"]["code_mode"] == "special"
    assert ns["conditioning"]["exemplars"] == 2 and (tmp_path / "out/decoder/exemplars.npz").is_file()
    assert ns["val_loss_before"] < 6.0  # a real pretrained LM: low loss from the start
    assert ns["best"]["val_loss"] < ns["val_loss_before"]  # four steps already adapt it to the format
