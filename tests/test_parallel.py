"""Plan-parallel rendering (PARALLEL): lookahead plans, drafts rendered side by side, verification."""

import time

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


def _batch_log(gen, monkeypatch):
    """Record what joins the generation's decoder batch (the jobs of each `add`, and how many
    rows were decoding when they joined) and its rows at every token."""
    log = {"adds": [], "rows": []}
    real = gen.decode_batch

    def decode_batch():
        b = real()
        add, step = b.add, b.step

        def add_(jobs):
            log["adds"].append((list(jobs), b.rows))
            add(jobs)

        def step_():
            log["rows"].append(b.rows)
            return step()

        b.add, b.step = add_, step_
        return b

    monkeypatch.setattr(gen, "decode_batch", decode_batch)
    return log


def test_parallel_sentences_are_the_batch_rows(gen, monkeypatch):
    """PARALLEL=3: the sentence after the real text and two drafts join the batch together (3 x
    N_CAND rows, every job its own seed and plan); later drafts join while others are still
    decoding (the pipeline keeps its rows busy); every kept sentence is a row of a job that
    rendered its plan, a draft's of a draft planned as far ahead; the same seed gives the same text.
    (The tiny decoder's drafts are mostly refused: `test_pipeline_keeps_the_rows_busy` follows the
    pipeline with a stand-in decoder.)"""
    from next_speed.generation.generate import LOOKAHEAD_SEED_STRIDE

    log = _batch_log(gen, monkeypatch)
    res = gen.run(PROMPT, 6, seed=2, parallel=3, parallel_verify=False)
    assert len(res.sentences) >= 3
    first, busy = log["adds"][0]
    assert len(first) == 3 and busy == 0 and max(log["rows"]) >= 6
    jobs = [j for js, _ in log["adds"] for j in js]
    assert len({j.seed for j in jobs}) == len(jobs) and all(j.n == 2 for j in jobs)
    for st in res.steps:
        if st.chosen is None:
            continue
        src = [j for j in jobs if st.sentence in [o["text"] for o in j.out] and j.planned == st.planned]
        assert src and any(j.seed // LOOKAHEAD_SEED_STRIDE == st.lookahead for j in src)
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


TOPICS = [
    "volcanoes erupt molten rock from deep below",
    "the orchestra rehearsed a symphony all night",
    "glaciers carve valleys over thousands of years",
    "a spacecraft docked with the orbiting station",
    "farmers harvest wheat before the autumn rains",
    "the court ruled on the copyright dispute",
    "coral reefs shelter a quarter of marine species",
]


class _StubBatch:
    """A stand-in decoder batch: a step's sentence is "Alpha ..." and takes `head` tokens, a
    draft's (seeded LOOKAHEAD_SEED_STRIDE apart) "Beta ..." and `draft` tokens; each job writes
    on another topic."""

    def __init__(self, head: int = 1, draft: int = 1):
        self.left: list = []  # [job, tokens left]
        self.head, self.draft = head, draft
        self.steps, self.joined_busy, self.rendered = 0, 0, 0

    @property
    def rows(self):
        return sum(j.n for j, _ in self.left)

    def add(self, jobs):
        from next_speed.generation.generate import LOOKAHEAD_SEED_STRIDE

        self.joined_busy += bool(jobs) and bool(self.left)
        self.left += [[j, self.draft if j.seed >= LOOKAHEAD_SEED_STRIDE else self.head] for j in jobs]

    def remove(self, jobs):
        gone = {id(j) for j in jobs}
        self.left = [e for e in self.left if id(e[0]) not in gone]

    @property
    def jobs(self):
        return [j for j, _ in self.left]

    def step(self):
        from next_speed.generation.generate import LOOKAHEAD_SEED_STRIDE

        self.steps += 1
        for e in self.left:
            e[1] -= 1
        done = [j for j, n in self.left if n == 0]
        self.left = [e for e in self.left if e[1] > 0]
        for j in done:
            word = "Beta" if j.seed >= LOOKAHEAD_SEED_STRIDE else "Alpha"
            self.rendered += 1
            topic = TOPICS[self.rendered % len(TOPICS)]
            j.out = [
                {"text": f"{word} {topic} {j.seed % 997} {i}.", "ended": True, "tokens": 4, "logprob": -4.0}
                for i in range(j.n)
            ]
        return done


def test_pipeline_keeps_the_rows_busy(gen, monkeypatch):
    """A stand-in decoder whose steps take 1 token and drafts 3: once the first sentence is
    written, the next draft joins the drafts still decoding (nothing waits for a window's
    longest sentence); sentences are decided in order, each draft as far ahead as it was planned."""
    batches = []

    def decode_batch():
        batches.append(_StubBatch(head=1, draft=3))
        return batches[-1]

    monkeypatch.setattr(gen, "decode_batch", decode_batch)
    res = gen.run(PROMPT, 6, seed=0, parallel=3, parallel_verify=False, no_repeat_ngram=0)
    b = batches[-1]
    assert len(res.sentences) == 6 and res.drafts["accepted"] == 5
    # token 1: sentence 0 written, draft 3 joins drafts 1 and 2 (2 ahead); token 3: 1 and 2
    # written, drafts 4 (1 ahead of draft 3, still decoding) and 5 join
    assert [st.lookahead for st in res.steps] == [0, 1, 2, 2, 1, 2]
    assert b.joined_busy == 2 and b.steps == 6


def test_verification_rejects_a_draft_that_contradicts_its_real_context(gen, monkeypatch):
    """A stand-in decoder: the sentence after the real text is "Alpha ...", the drafts "Beta
    ..."; its likelihoods say a draft fits badly after the real text (it holds "Alpha") and well
    after the drafted context. Verification rejects the draft, which is written again after the
    real text; PARALLEL_VERIFY=0 keeps it; a tolerance that covers the gap keeps it too."""

    def score_rows(seqs, pool=None):
        return [[-3.0 if "Alpha" in gen.tok.decode(ids[:start]) else -1.0] * (len(ids) - start) for ids, start in seqs]

    monkeypatch.setattr(gen, "decode_batch", _StubBatch)
    monkeypatch.setattr(gen.engine, "score_rows", score_rows)
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
    without a prefix pool (whose cache it reuses), and so is score_rows for rows scored together."""
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
    # several rows in one forward, each with its own cached prefix (padded apart): the same scores
    other = gen.tok("Mountains rise above the plains and snow covers them.", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        lo = torch.log_softmax(gen.model(input_ids=torch.tensor([other])).logits[0].float(), -1)
    want_other = lo[torch.arange(2, len(other) - 1), torch.tensor(other[3:])].tolist()
    both = gen.engine.score_rows([(ids, start), (other, 3)], pool)
    np.testing.assert_allclose(both[0], want, atol=1e-4)
    np.testing.assert_allclose(both[1], want_other, atol=1e-4)


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


def test_server_drops_the_drafts_of_a_finished_pipeline(gen, monkeypatch):
    """A pipelined request that ends while its drafts are still decoding (a stop string in its
    first sentence) takes their rows out of the scheduler's open batch; the next request is served."""
    from fastapi.testclient import TestClient

    from next_speed.serving.server import ServerConfig, create_app

    batches = []

    def decode_batch():
        batches.append(_StubBatch(head=1, draft=3))
        return batches[-1]

    monkeypatch.setattr(gen, "decode_batch", decode_batch)
    app = create_app(lambda: gen, ServerConfig(max_queue=8), background=False)
    with TestClient(app) as c:
        body = {"model": "next-speed", "prompt": PROMPT, "max_sentences": 4, "stop": ["Alpha"], "parallel": 3}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        deadline = time.monotonic() + 10  # the worker takes them out just after it answers
        while any(b.left for b in batches) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batches and all(not b.left for b in batches)  # the two drafts left with their request
        ok = c.post("/generate", json={"prompt": PROMPT, "max_sentences": 2, "params": {"parallel": 2, "seed": 1}})
        assert ok.status_code == 200 and len(ok.json()["sentences"]) == 2


def test_scheduler_keeps_drafts_that_wait_for_room(gen, monkeypatch):
    """With MAX_BATCH_ROWS smaller than a pipeline's rows, drafts that do not fit wait their turn:
    none is lost, so the request ends (it used to wait for a lost draft for good)."""
    from next_speed.serving.scheduler import BatchScheduler

    batches = []

    def decode_batch():
        batches.append(_StubBatch(head=1, draft=3))
        return batches[-1]

    monkeypatch.setattr(gen, "decode_batch", decode_batch)
    sched = BatchScheduler(gen, max_batch_rows=4)
    try:
        res = sched.submit(PROMPT, 6, seed=0, parallel=3, parallel_verify=False).result(timeout=60)
    finally:
        sched.close()
    assert res.sentences and res.drafts["drafted"] >= 1
    assert all(not b.left for b in batches)


def test_parallel_with_the_whole_sequence_engine(gen, monkeypatch):
    """ENGINE=hf (transformers' `generate`, no KV reuse) renders a pipeline too: its batch renders
    whatever joined at the next step, and drafts are judged and verified without a prefix pool."""
    monkeypatch.setattr(gen, "use_kv", False)
    res = gen.run(PROMPT, 4, seed=1, parallel=3)
    assert res.sentences and res.drafts["drafted"] >= 1
    assert "prompt_tokens_reused" not in res.timings  # no pool, no prompt caches
