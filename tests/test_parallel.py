"""Plan-parallel rendering (PARALLEL): lookahead plans, drafts rendered side by side, verification."""

import numpy as np
import pytest
import torch
from conftest import tiny_generator

from next_speed.core.errors import ConfigError

PROMPT = "Paris is the capital of France. It lies on the Seine."


@pytest.fixture(scope="module")
def gen(tiny_run):
    return tiny_generator(tiny_run, N_CAND="2", RETRIES="0")


def _recording(gen, monkeypatch):
    """Record every render call's jobs (after rendering, with their rows' texts)."""
    calls = []
    real = gen.render_jobs

    def render_jobs(jobs):
        real(jobs)
        calls.append(list(jobs))

    monkeypatch.setattr(gen, "render_jobs", render_jobs)
    return calls


def test_parallel_one_is_the_sequential_loop(gen, monkeypatch):
    """PARALLEL=1 is today's loop: the same text, one job per render, no drafts, no pool."""
    calls = _recording(gen, monkeypatch)
    a = gen.run(PROMPT, 4, seed=3)
    b = gen.run(PROMPT, 4, seed=3, parallel=1)
    assert a.sentences == b.sentences and a.planned == b.planned and a.sentences
    assert all(len(c) == 1 and c[0].pool is None for c in calls)
    assert a.drafts == {} and all(st.lookahead == 0 for st in a.steps)


def test_parallel_sentences_are_the_batch_rows(gen, monkeypatch):
    """PARALLEL=3: each window renders the window's sentence and two drafts in one render call
    (3 x N_CAND rows, every job its own seed and plan); every kept sentence is a row of the
    window it was drafted in, and the same seed gives the same text."""
    calls = _recording(gen, monkeypatch)
    res = gen.run(PROMPT, 6, seed=2, parallel=3, parallel_verify=False)
    assert len(res.sentences) >= 1
    assert any(len(c) == 3 for c in calls)
    for c in calls:
        assert len({j.seed for j in c}) == len(c) and sum(j.n for j in c) == 2 * len(c)
    # walk the windows: a window's first sentence comes from its first job, a draft j ahead from job j
    i = 0
    for c in calls:
        first = res.steps[i]
        assert first.lookahead == 0 and first.sentence in [o["text"] for o in c[0].out]
        i += 1
        while i < len(res.steps) and res.steps[i].lookahead:
            st = res.steps[i]
            assert st.sentence in [o["text"] for o in c[st.lookahead].out]
            assert st.planned == c[st.lookahead].planned
            i += 1
    assert i == len(res.steps)
    kept = sum(1 for st in res.steps if st.lookahead)
    assert res.drafts["accepted"] == kept and res.drafts["drafted"] >= kept
    again = gen.run(PROMPT, 6, seed=2, parallel=3, parallel_verify=False)
    assert again.sentences == res.sentences


def test_lookahead_plans_feed_back_their_reconstruction(gen, monkeypatch):
    """The plan j ahead is drawn after the planned sentences before it, each read as its codes and
    its unit RVQ reconstruction."""
    seen = []
    real = gen.planner.next_tuple

    def next_tuple(context, **kw):
        seen.append((list(map(list, context)), np.array(kw.get("embeddings"))))
        return real(context, **kw)

    monkeypatch.setattr(gen.planner, "next_tuple", next_tuple)
    res = gen.run(PROMPT, 3, seed=1, parallel=3, parallel_verify=False)
    first, second, third = seen[:3]  # the window's own plan, then two ahead
    assert len(second[0]) == len(first[0]) + 1 and len(third[0]) == len(first[0]) + 2
    planned = second[0][-1]
    rec = gen.rvq.decode(np.asarray([planned]))[0]
    np.testing.assert_allclose(second[1][-1], rec / np.linalg.norm(rec), rtol=1e-5, atol=1e-6)
    assert res.steps[0].planned == planned


def test_verification_rejects_a_draft_that_contradicts_its_real_context(gen, monkeypatch):
    """A stand-in decoder: the window's sentence is "Alpha ...", the drafts "Beta ..."; its
    likelihoods say a draft fits badly after the real text (it holds "Alpha") and well after the
    drafted context. Verification rejects the draft; the next window writes that sentence after
    the real text; PARALLEL_VERIFY=0 keeps it; a tolerance that covers the gap keeps it too."""

    def render_jobs(jobs):
        for k, j in enumerate(jobs):
            word = "Alpha" if k == 0 else "Beta"
            j.out = [
                {"text": f"{word} sentence {j.seed % 997} {i}.", "ended": True, "tokens": 4, "logprob": -4.0}
                for i in range(j.n)
            ]

    def token_logprobs(ids, start, pool=None):
        before = gen.tok.decode(ids[:start])
        return [-3.0 if "Alpha" in before else -1.0] * (len(ids) - start)

    monkeypatch.setattr(gen, "render_jobs", render_jobs)
    monkeypatch.setattr(gen.engine, "token_logprobs", token_logprobs)
    res = gen.run(PROMPT, 2, seed=0, parallel=2)
    assert res.drafts == {"drafted": 1, "accepted": 0, "refused": 0, "rejected": 1}
    assert [st.lookahead for st in res.steps] == [0, 0] and all(s.startswith("Alpha") for s in res.sentences)
    kept = gen.run(PROMPT, 2, seed=0, parallel=2, parallel_verify=False)
    assert kept.drafts["accepted"] == 1 and kept.sentences[1].startswith("Beta") and kept.steps[1].lookahead == 1
    assert kept.steps[1].verify is None
    tolerant = gen.run(PROMPT, 2, seed=0, parallel=2, verify_tol=2.5)
    assert tolerant.drafts["accepted"] == 1 and tolerant.steps[1].verify == {
        "ll_real": -3.0,
        "ll_draft": -1.0,
        "accepted": True,
    }


def test_verification_scores_with_the_decoder(gen):
    """token_logprobs is the decoder's own log-probability of each continuation token, with or
    without a prefix pool (whose cache it reuses)."""
    from next_speed.generation.engine import PrefixPool

    ids = gen.tok("A river is a natural stream of water. Rivers flow toward an ocean.", add_special_tokens=False)[
        "input_ids"
    ]
    start = 5
    with torch.inference_mode():
        logits = gen.model(input_ids=torch.tensor([ids])).logits[0].float()
    want = torch.log_softmax(logits, -1)[torch.arange(start - 1, len(ids) - 1), torch.tensor(ids[start:])].tolist()
    np.testing.assert_allclose(gen.engine.token_logprobs(ids, start), want, atol=1e-4)
    pool = PrefixPool()
    gen.engine.token_logprobs(ids[: start + 2], start, pool)
    np.testing.assert_allclose(gen.engine.token_logprobs(ids, start, pool), want, atol=1e-4)
    assert pool.reused > 0


def test_parallel_knobs_are_checked(gen):
    with pytest.raises(ConfigError, match="parallel"):
        gen.run(PROMPT, 2, parallel=0)
    with pytest.raises(ConfigError, match="verify_tol"):
        gen.run(PROMPT, 2, parallel=2, verify_tol=-1)


def test_server_batches_lookahead_rows(gen):
    """A request with PARALLEL=3 puts its drafts' rows into the scheduler's batches beside its own
    and gets the text it gets alone; the OpenAI surface takes `parallel` too."""
    from fastapi.testclient import TestClient

    from next_speed.serving.server import ServerConfig, create_app

    alone = gen.run(PROMPT, 3, seed=4, n_cand=2, parallel=3, parallel_verify=False)
    app = create_app(lambda: gen, ServerConfig(max_queue=8), background=False)
    with TestClient(app) as c:
        sched = app.state.server.sched
        r = c.post(
            "/generate",
            json={
                "prompt": PROMPT,
                "max_sentences": 3,
                "params": {"seed": 4, "n_cand": 2, "parallel": 3, "parallel_verify": False},
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["sentences"] == alone.sentences
        assert sched.rows / sched.batches > 2  # one sentence step has at most 2 rows; its drafts add theirs
        o = c.post(
            "/v1/completions",
            json={
                "model": "next-speed",
                "prompt": PROMPT,
                "seed": 4,
                "max_tokens": 40,
                "max_sentences": 3,
                "parallel": 2,
            },
        )
        assert o.status_code == 200, o.text
        bad = c.post("/v1/completions", json={"model": "next-speed", "prompt": PROMPT, "parallel": 0})
        assert bad.status_code == 400 and "parallel" in bad.text


def test_a_draft_that_copies_an_earlier_sentence_is_refused(gen):
    """Drafts were decoded before the sentences now before them existed, so NO_COPY_NGRAM could
    not steer them: a draft holding such a run of an earlier sentence's tokens is refused."""
    from next_speed.generation.generate import _Text, copy_ids

    earlier = "Rivers flow toward an ocean or a lake and many cities were built along them."
    text = _Text(
        history=[earlier],
        hist_emb=np.zeros((1, 4), np.float32),
        ctx_codes=[[0]],
        seen=set(),
        spans=set(),
        earlier=copy_ids(gen.tok, [earlier]),
    )
    scored = [
        {"text": earlier[:-1] + " long ago.", "refused": None},
        {"text": "A star is a ball of plasma.", "refused": None},
    ]
    gen.refuse_token_repeats(scored, text, gen.params)
    assert scored[0]["refused"] == "repeat" and scored[1]["refused"] is None
