"""Steps 01-04 on tiny data with a random-init stand-in encoder."""

import json
from pathlib import Path

import numpy as np
import pytest

from next_speed.core.artifacts import atomic_path, read_jsonl
from next_speed.core.config import resolve
from next_speed.core.errors import NextSpeedError, StaleInputError
from next_speed.data.corpus import group_wikitext, hf_docs
from next_speed.data.embed import EmbedConfig, embed_sentences, load_encoder
from next_speed.data.sentences import SentencesConfig, make_sentences
from next_speed.data.trainsets import TrainSetsConfig, build_training_sets
from next_speed.quant.rvq import RVQConfig, RVQEvalConfig, fit_rvq, rvq_report


def run_01_04(docs_file, encoder, k=2, v=4, **env):
    env = {k_: str(v_) for k_, v_ in env.items()}
    make_sentences(resolve(SentencesConfig, environ={"DOCS_JSONL": str(docs_file), "NUM_PROC": "1", **env}))
    embed_sentences(resolve(EmbedConfig, environ={"EMB_MODEL": encoder, "DEVICE": "cpu", **env}))
    fit_rvq(resolve(RVQConfig, environ={"K": str(k), "V": str(v), "NITER": "5", **env}))
    return build_training_sets(resolve(TrainSetsConfig, environ={"CONTEXT_SENTS": "2", "VAL_FRAC": "0.25", **env}))


def test_sentences_keep_doc_and_position(workdir, docs_file):
    meta = make_sentences(
        resolve(SentencesConfig, environ={"DOCS_JSONL": str(docs_file), "NUM_PROC": "1", "MIN_LEN": "35"})
    )
    rows = list(read_jsonl("data/sentences.jsonl"))
    assert meta["counts"]["sentences"] == len(rows) > 0
    assert meta["counts"]["dropped_short"] > 0  # "Cats are small carnivorous mammals." stays; shorter ones go
    assert all(len(r["text"]) >= 35 for r in rows)
    assert [r["id"] for r in rows] == list(range(len(rows)))
    for a, b in zip(rows, rows[1:]):
        assert (b["doc"] == a["doc"] and b["pos"] == a["pos"] + 1) or (b["doc"] == a["doc"] + 1 and b["pos"] == 0)
    docs = [json.loads(x) for x in docs_file.read_text().splitlines()]
    first = [r["text"] for r in rows if r["doc"] == 0]
    assert " ".join(first) in docs[0]["text"] or all(s in docs[0]["text"] for s in first)


def test_parallel_split_matches_serial(workdir, docs_file):
    big = workdir / "big.jsonl"
    big.write_text(docs_file.read_text() * 4)  # > 64 docs, so the pool is used
    make_sentences(
        resolve(
            SentencesConfig,
            environ={"DOCS_JSONL": str(big), "NUM_PROC": "1", "SENT_PATH": "a.jsonl", "SENT_META": "a.json"},
        )
    )
    make_sentences(
        resolve(
            SentencesConfig,
            environ={"DOCS_JSONL": str(big), "NUM_PROC": "2", "SENT_PATH": "b.jsonl", "SENT_META": "b.json"},
        )
    )
    assert Path("a.jsonl").read_text() == Path("b.jsonl").read_text()


def test_malformed_jsonl_names_file_and_line(workdir):
    bad = workdir / "bad.jsonl"
    bad.write_text('{"text": "A fine first sentence here."}\n{not json}\n')
    with pytest.raises(NextSpeedError, match=r"bad.jsonl:2: malformed JSON"):
        make_sentences(resolve(SentencesConfig, environ={"DOCS_JSONL": str(bad)}))
    assert not Path("data/sentences.jsonl").exists()
    bad.write_text('{"title": "no text"}\n')
    with pytest.raises(NextSpeedError, match=r"bad.jsonl:1: missing field 'text'"):
        make_sentences(resolve(SentencesConfig, environ={"DOCS_JSONL": str(bad)}))


def test_empty_and_filtered_out_corpus(workdir):
    empty = workdir / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(NextSpeedError, match="no documents"):
        make_sentences(resolve(SentencesConfig, environ={"DOCS_JSONL": str(empty)}))
    short = workdir / "short.jsonl"
    short.write_text('{"text": "Hi. Yo. Ok."}\n')
    with pytest.raises(NextSpeedError, match="no sentences left.*MIN_LEN=20"):
        make_sentences(resolve(SentencesConfig, environ={"DOCS_JSONL": str(short)}))
    assert not list(Path("data").glob("*")) if Path("data").exists() else True


def test_missing_docs_file(workdir):
    with pytest.raises(NextSpeedError, match="nope.jsonl: file not found"):
        make_sentences(resolve(SentencesConfig, environ={"DOCS_JSONL": "nope.jsonl"}))


def test_wikitext_grouping():
    lines = ["", " = Alpha = ", "", " First para . ", " = = Section = = ", " Second para . ", " = Beta = ", " Third . "]
    docs = list(group_wikitext(iter(lines)))
    assert [d["title"] for d in docs] == ["Alpha", "Beta"]
    assert docs[0]["text"] == "First para .\nSecond para ."


def test_hf_offline_names_builtin_corpora(monkeypatch):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(NextSpeedError, match="could not load Hugging Face dataset 'wikitext'.*CORPUS=wiki"):
        list(hf_docs("wikitext", "wikitext-2-raw-v1", "train"))


def test_embeddings_normalized_and_in_sentence_order(workdir, docs_file, tiny_encoder):
    make_sentences(resolve(SentencesConfig, environ={"DOCS_JSONL": str(docs_file), "NUM_PROC": "1"}))
    meta = embed_sentences(resolve(EmbedConfig, environ={"EMB_MODEL": tiny_encoder, "BS": "3", "DEVICE": "cpu"}))
    x = np.load("data/embeddings.npy")
    texts = [r["text"] for r in read_jsonl("data/sentences.jsonl")]
    assert x.shape == (len(texts), 32) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    ref = load_encoder(tiny_encoder).encode(texts, normalize_embeddings=True)
    assert np.allclose(x, ref, atol=1e-5)  # batching by length never reorders rows
    assert meta["counts"]["rows"] == len(texts)


def test_unloadable_encoder_is_one_line(workdir, docs_file):
    make_sentences(resolve(SentencesConfig, environ={"DOCS_JSONL": str(docs_file), "NUM_PROC": "1"}))
    with pytest.raises(NextSpeedError, match="EMB_MODEL='/no/such/model' could not be loaded.*all-MiniLM-L6-v2"):
        embed_sentences(resolve(EmbedConfig, environ={"EMB_MODEL": "/no/such/model", "DEVICE": "cpu"}))
    assert not Path("data/embeddings.npy").exists()


def test_full_01_04_and_split(workdir, docs_file, tiny_encoder):
    meta = run_01_04(docs_file, tiny_encoder)
    train = list(read_jsonl("data/sent_lm_train.jsonl"))
    val = list(read_jsonl("data/sent_lm_val.jsonl"))
    dtrain = list(read_jsonl("data/decoder_train.jsonl"))
    assert {r["doc"] for r in train}.isdisjoint({r["doc"] for r in val}) and val
    assert meta["counts"]["val_docs"] == 6  # round(0.25 * 24)
    codes = np.load("data/codes.npy")
    sents = list(read_jsonl("data/sentences.jsonl"))
    # every row's target is its sentence's code tuple; context is at most CONTEXT_SENTS previous ones
    by_key = {(s["doc"], s["pos"]): i for i, s in enumerate(sents)}
    for r in train + val:
        i = by_key[(r["doc"], r["pos"])]
        assert r["target"] == codes[i].tolist()
        assert r["context"] == codes[max(i - min(r["pos"], 2), 0) : i].tolist()
    for r in dtrain:
        i = by_key[(r["doc"], r["pos"])]
        assert r["target"] == sents[i]["text"] and r["codes"] == codes[i].tolist()
        prev = [s["text"] for s in sents[max(0, i - min(r["pos"], 2)) : i]]
        assert r["context"] == " ".join(prev)
    rep = rvq_report(resolve(RVQEvalConfig, environ={}))
    assert len(rep["levels"]) == 2 and rep["levels"][1]["rel_error"] < rep["levels"][0]["rel_error"]
    assert json.loads(Path("out/rvq_recon_error.json").read_text())["K"] == 2


def test_stale_inputs_are_refused(workdir, docs_file, tiny_encoder):
    run_01_04(docs_file, tiny_encoder)
    # K disagreeing with the codes
    with pytest.raises(StaleInputError, match="K=3 here, but data/codes.npy was built with K=2"):
        build_training_sets(resolve(TrainSetsConfig, environ={"K": "3"}))
    # sentences changed after embedding: embeddings no longer match
    other = workdir / "other.jsonl"
    other.write_text(docs_file.read_text().replace("Cats", "Dogs"))
    make_sentences(resolve(SentencesConfig, environ={"DOCS_JSONL": str(other), "NUM_PROC": "1"}))
    with pytest.raises(StaleInputError, match="another sentence file"):
        build_training_sets(resolve(TrainSetsConfig, environ={}))
    # a half-written / replaced data file never matches its metadata
    np.save("data/embeddings.npy", np.zeros((3, 32), dtype=np.float32))
    with pytest.raises(StaleInputError, match="does not match its metadata.*step 02"):
        fit_rvq(resolve(RVQConfig, environ={"K": "2", "V": "4"}))
    Path("data/emb_meta.json").unlink()
    with pytest.raises(StaleInputError, match="emb_meta.json is missing.*step 02"):
        fit_rvq(resolve(RVQConfig, environ={"K": "2", "V": "4"}))


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("new, half")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1
