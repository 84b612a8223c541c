"""The whole-text benchmark's measures (next_speed.evals.quality) on hand-made texts with known values,
and its token-level baselines on the tiny preset's random-init decoder."""

import json

import numpy as np
import pytest

from next_speed.evals import quality as q


def _split(text):
    from next_speed.data.sentences import _init_worker, split_text

    _init_worker("en")
    return split_text(text)


def test_rep_n_and_diversity_follow_simctg():
    # "a b a b": bigrams ab, ba, ab -> 2 unique of 3; trigrams aba, bab -> none repeated
    assert q.rep_n(["a b a b"], 2) == pytest.approx(1 / 3)
    assert q.rep_n(["a b a b"], 3) == 0.0
    assert q.rep_n(["the cat sat on the mat"], 2) == 0.0
    # pooled over texts: n-grams repeat within a text only, never across two texts
    assert q.rep_n(["a b", "a b"], 2) == 0.0
    assert q.rep_n(["x x x x x"], 2) == pytest.approx(1 - 1 / 4)
    assert q.rep_n(["", "one"], 2) == 0.0  # no n-grams at all
    assert q.diversity(["the cat sat on the mat"]) == 1.0
    texts = ["a b a b a b", "c d e f"]
    assert q.diversity(texts) == pytest.approx(np.prod([1 - q.rep_n(texts, n) for n in (2, 3, 4)]))


def test_sentence_counts():
    assert q.complete_sentences("One sentence here. Another one here! And a third?", _split) == 3
    assert q.complete_sentences("One sentence here. And an unfinished one", _split) == 1
    assert q.complete_sentences('He said "it is done." Then he left.', _split) == 2
    assert q.complete_sentences("", _split) == 0
    assert q.ended_sentences("One. Two. Thr") == 2 and q.ended_sentences("One. Two.") == 1
    assert (
        q.first_sentences("First one here. Second one here. Third one.", 2, _split)
        == "First one here. Second one here."
    )


def test_cosines_plan_gap_and_measures():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    assert q.cosines(a, b).tolist() == pytest.approx([1.0, 0.0, -1.0])  # an empty text (zero row) scores 0
    assert q.plan_gap(0.6, 0.6, 0.5) == 0.0 and q.plan_gap(0.6, 0.5, 0.5) == 1.0 and q.plan_gap(0.6, 0.55, 0.5) == 0.5
    e = np.eye(3, dtype=np.float32)
    m = q.text_measures(["A b c. D e f.", ""], e[[0, 1]], e[[0, 2]], e[[0, 1]], asked=2, split=_split)
    assert m["coherence"] == 1.0 and m["ref_sim"] == 0.5 and m["sentences"] == 0.5 and m["empty"] == 1
    assert q.embed_texts(lambda ts: np.ones((len(ts), 3), np.float32), ["x", " ", "y"]).tolist() == [
        [1, 1, 1],
        [0, 0, 0],
        [1, 1, 1],
    ]


def test_mauve_tells_same_from_different_distributions():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(120, 16))
    same = rng.normal(size=(120, 16))
    far = rng.normal(size=(120, 16)) + 4.0
    s, d = q.mauve_score(p, same), q.mauve_score(p, far)
    assert s["mauve"] > 0.9 and d["mauve"] < 0.2
    assert s["p"] == 120 and s["q"] == 120 and s["buckets"] == 24
    from next_speed.core.errors import NextSpeedError

    with pytest.raises(NextSpeedError, match="at least 8"):
        q.mauve_score(p[:4], same[:4])


def test_prompt_sets(tmp_path):
    rows = [
        {"doc": d, "pos": i, "target": f"Doc {d} sentence {i}."} for d, n in ((0, 6), (1, 3), (2, 5)) for i in range(n)
    ]
    path = tmp_path / "dec_val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = q.main_prompt_set(str(path), 10, top_up=[("extra", [f"E{i}." for i in range(5)])])
    assert sorted(it.doc for it in items) == ["extra", "val:0", "val:2"]  # doc 1 is too short
    it = next(i for i in items if i.doc == "val:0")
    assert it.prompt == "Doc 0 sentence 0. Doc 0 sentence 1." and it.reference_sents == [
        f"Doc 0 sentence {i}." for i in (2, 3, 4)
    ]
    text = " ".join(f"Sentence number {i} of the speech." for i in range(200))
    other = q.other_prompt_set([("a", text), ("b", text), ("c", "Too short.")], 5, _split, seed=1)
    assert len(other) == 2 and all(len(o.prompt_sents) == 2 and len(o.reference_sents) == 3 for o in other)
    for o in other:  # a window of consecutive sentences of the document
        nums = [int(s.split()[2]) for s in o.prompt_sents + o.reference_sents]
        assert nums == list(range(nums[0], nums[0] + 5))


@pytest.fixture(scope="module")
def tiny_lm(tiny_run):
    from next_speed.models.decoder_model import load_base_model, load_base_tokenizer

    path = str(tiny_run / "cache/tiny/decoder")
    tok, _, _ = load_base_tokenizer(path)
    return load_base_model(path, "causal").eval(), tok


def test_contrastive_search_without_penalty_is_greedy(tiny_lm):
    """alpha = 0 leaves the model's probability alone: contrastive search is then greedy decoding,
    for every row of a left-padded batch."""
    import torch

    model, tok = tiny_lm
    prompts = ["Cats are small carnivorous mammals.", "A river"]
    got = q.contrastive_search(model, tok, prompts, 50, alpha=0.0, k=3, max_new_tokens=8)
    for prompt, text in zip(prompts, got):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            ref = model.generate(**ids, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
        assert text == tok.decode(ref[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    # with the penalty on, the search is deterministic and still writes
    a = q.contrastive_search(model, tok, prompts, 50, alpha=0.6, k=3, max_new_tokens=8)
    assert a == q.contrastive_search(model, tok, prompts, 50, alpha=0.6, k=3, max_new_tokens=8) and all(a)


def test_nucleus_baseline_and_features(tiny_lm):
    model, tok = tiny_lm
    out = q.nucleus_sample_texts(
        model,
        tok,
        ["Cats are small.", "Rivers flow."],
        2,
        seed=0,
        temp=0.5,
        top_p=0.9,
        repetition_penalty=1.1,
        max_new_tokens=12,
    )
    assert len(out) == 2 and out == q.nucleus_sample_texts(
        model,
        tok,
        ["Cats are small.", "Rivers flow."],
        2,
        seed=0,
        temp=0.5,
        top_p=0.9,
        repetition_penalty=1.1,
        max_new_tokens=12,
    )
    f = q.lm_features(model, tok, ["Cats are small.", "", "Rivers flow into the sea."], bs=2)
    assert f.shape == (3, model.config.hidden_size) and np.isfinite(f).all()
    # a text's feature does not depend on what it is batched with (right padding, its own last token)
    assert np.allclose(f[2], q.lm_features(model, tok, ["Rivers flow into the sea."])[0], atol=1e-4)
