"""Generation: the sentence loop, its stop rules and rerank, the decoding engine, on the tiny preset's artifacts."""

import json
from pathlib import Path

import pytest
from conftest import no_eos

from next_speed.core.config import resolve
from next_speed.core.errors import ConfigError, StaleInputError
from next_speed.generation.generate import GenerateConfig, SentenceGenerator, match_score, run_generate


def test_loop_shapes_and_determinism(gen):
    res = gen.run("Paris is the capital of France. It lies on the Seine.", 2, seed=3)
    K = gen.rvq.K
    assert len(res.steps) >= 1 and len(res.sentences) <= 2
    for st in res.steps:
        assert len(st.planned) == K and len(st.candidates) == 3
        if st.chosen is not None:
            assert len(st.realized) == K and st.sentence == st.candidates[st.chosen]["text"]
    assert set(res.timings) >= {"planner", "decoder", "rerank", "total"}
    again = gen.run("Paris is the capital of France. It lies on the Seine.", 2, seed=3)
    assert again.sentences == res.sentences and again.planned == res.planned
    other = gen.run("Paris is the capital of France. It lies on the Seine.", 2, seed=4)
    assert other.planned != res.planned or other.sentences != res.sentences


def no_logprob(out):
    """An engine's candidates without the decoder's log-probabilities, which the reference
    engine (`render_hf`) does not compute."""
    return [{k: v for k, v in o.items() if k != "logprob"} for o in out]


def _fake_render(gen, monkeypatch, fn):
    """Replace the decoder: every sentence step's candidates come from fn(context, plan, params, seed, exemplars)."""

    def render_jobs(jobs):
        for j in jobs:
            j.out = fn(j.context, j.planned, j.params, j.seed, j.exemplars)

    monkeypatch.setattr(gen, "render_jobs", render_jobs)


def _rendered(texts, ended=True):
    return lambda ctx, codes, p, seed, exemplars=None: [
        {"text": t, "ended": ended, "tokens": len(t.split())} for t in texts[: p.n_cand]
    ]


def test_rerank_picks_best_match(gen, monkeypatch):
    cands = ["first candidate sentence.", "second candidate sentence.", "third candidate sentence."]
    _fake_render(gen, monkeypatch, _rendered(cands))

    def fake_score(planned, candidates, return_embeddings=False, embeddings=None):
        prefixes = {"first": 0, "second": 2, "third": 1}
        return [
            {
                "text": c,
                "codes": list(planned) if prefixes[c.split()[0]] == 2 else [0] * len(planned),
                "prefix": prefixes[c.split()[0]],
                "cosine": 0.5,
            }
            for c in candidates
        ]

    monkeypatch.setattr(gen, "score", fake_score)
    legacy = {"rerank_context": 0.0, "rerank_repeat": 0.0, "rerank_fluency": 0.0}  # the code match alone
    res = gen.run("A prompt sentence is here.", 1, rerank=True, **legacy)
    assert res.sentences == ["second candidate sentence."] and res.steps[0].chosen == 1
    assert res.realized[0] == res.planned[0]
    assert match_score([1, 2, 3], [1, 2, 0], 0.1) > match_score([1, 2, 3], [1, 0, 3], 0.9)
    # a candidate cut by MAX_NEW_TOKENS loses to one that ended, whatever its codes
    _fake_render(
        gen,
        monkeypatch,
        lambda ctx, codes, p, seed, exemplars=None: [
            {"text": cands[0], "ended": True, "tokens": 3},
            {"text": cands[1], "ended": False, "tokens": 3},
            {"text": cands[2], "ended": True, "tokens": 3},
        ],
    )
    res = gen.run("A prompt sentence is here.", 1, rerank=True, **legacy)
    assert res.sentences == ["third candidate sentence."] and res.steps[0].candidates[1]["ended"] is False


def test_stop_rules(gen, monkeypatch):
    _fake_render(gen, monkeypatch, _rendered(["", ""]))
    res = gen.run("A prompt sentence is here.", 3)
    assert res.sentences == [] and res.stop_reason == "empty"
    _fake_render(gen, monkeypatch, _rendered(["", "A prompt sentence is here."]))
    res = gen.run("A prompt sentence is here.", 3)
    assert res.sentences == [] and res.stop_reason == "repeat"
    seq = iter(["One new sentence.", "Another new sentence.", "One new sentence."])
    _fake_render(
        gen, monkeypatch, lambda ctx, codes, p, seed, exemplars=None: [{"text": next(seq), "ended": True, "tokens": 3}]
    )
    res = gen.run("A prompt sentence is here.", 5, n_cand=1, rerank=False, retries=0)
    assert res.sentences == ["One new sentence.", "Another new sentence."] and res.stop_reason == "repeat"


def test_refused_step_is_planned_again(gen, monkeypatch):
    """A step whose candidates the stop rules all refuse is planned and rendered again (new seeds)
    instead of ending the text; after RETRIES refused attempts the text ends there."""
    prompt = "A prompt sentence is here."
    calls = []

    def render(ctx, codes, p, seed, exemplars=None):
        calls.append(seed)
        first_try = len([c for c in calls]) % 2 == 1  # every step's first attempt repeats the prompt
        text = prompt if first_try else f"Fresh sentence number {len(calls)}."
        return [{"text": text, "ended": True, "tokens": 4}] * p.n_cand

    _fake_render(gen, monkeypatch, render)
    res = gen.run(prompt, 3, n_cand=2)
    assert len(res.sentences) == 3 and res.stop_reason == "steps" and len(calls) == 6
    refused = [st for st in res.steps if st.chosen is None]
    assert len(refused) == 3 and all(c["refused"] == "repeat" for st in refused for c in st.candidates)
    assert len(set(calls)) == 6  # every attempt samples with its own seed
    calls.clear()
    _fake_render(gen, monkeypatch, _rendered(["", prompt]))  # refused whatever the plan
    res = gen.run(prompt, 3, n_cand=2, retries=2)
    assert res.sentences == [] and res.stop_reason == "repeat" and len(res.steps) == 3
    assert len(gen.run(prompt, 3, n_cand=2, retries=0).steps) == 1


def test_select_candidate_is_the_one_rule():
    """The selection rule that generation and code_agreement_eval share: refused candidates never,
    ended before truncated, then the code match; the weighed score when a weight is set."""
    from next_speed.generation.generate import GenParams, select_candidate

    def c(prefix, cos, ended=True, refused=None, ctx=0.0, overlap=0.0):
        return {
            "prefix": prefix,
            "cosine": cos,
            "ended": ended,
            "refused": refused,
            "context_cos": ctx,
            "pair_overlap": overlap,
            "logprob": -4.0,
            "tokens": 3,
        }

    p = GenParams(rerank_context=0.0, rerank_repeat=0.0)  # no weight: the code match alone
    assert select_candidate([c(6, 1.0, refused="repeat"), c(1, 0.2)], p) == 1
    assert select_candidate([c(6, 1.0, ended=False), c(1, 0.2)], p) == 1
    assert select_candidate([c(1, 0.9), c(2, 0.1), c(2, 0.3)], p) == 2
    assert select_candidate([c(1, 0.9, refused="empty")], p) is None
    assert select_candidate([c(1, 0.2), c(3, 0.9)], GenParams(rerank=False)) == 0
    assert select_candidate([c(1, 0.2), c(3, 0.9, ctx=0.5)], GenParams()) == 1  # the defaults weigh the text so far
    # a step that can still be retried refuses a sentence cut off by the token limit
    assert select_candidate([c(6, 1.0, ended=False)], p, truncated_ok=False) is None
    assert select_candidate([c(6, 1.0, ended=False)], p) == 0
    # weighed: the text so far counts, repeated word pairs cost
    assert (
        select_candidate([c(3, 0.5, ctx=0.1), c(0, 0.45, ctx=0.6)], GenParams(rerank_context=1.0, rerank_repeat=0.0))
        == 1
    )
    assert select_candidate([c(0, 0.5, overlap=0.5), c(0, 0.45)], GenParams(rerank_context=0.0, rerank_repeat=1.0)) == 1


def test_several_plans_share_one_step(gen, monkeypatch):
    """PLANS=2: each step renders two distinct plans side by side (one engine batch), the rerank
    chooses among all their candidates, and the chosen candidate's plan is the step's plan."""
    seen_steps = []
    real = gen.render_jobs

    def render_jobs(jobs):
        seen_steps.append([(list(j.planned), j.n, j.seed) for j in jobs])
        real(jobs)

    monkeypatch.setattr(gen, "render_jobs", render_jobs)
    res = gen.run("Paris is the capital of France. It lies on the Seine.", 2, seed=5, plans=2, n_cand=2, plan_temp=1.0)
    assert any(len(s) == 2 for s in seen_steps)
    for s in seen_steps:
        assert len({tuple(pl) for pl, _, _ in s}) == len(s) and all(n == 2 for _, n, _ in s)
    for st in res.steps:
        if st.chosen is not None:
            k = st.candidates[st.chosen].get("plan", 0)
            assert st.planned == seen_steps[res.steps.index(st)][k][0]
            assert len(st.candidates) == 2 * len(seen_steps[res.steps.index(st)])
    # PLANS=1 keeps the one-plan text and seeds
    one = gen.run("Paris is the capital of France. It lies on the Seine.", 2, seed=5, n_cand=2)
    seen_steps.clear()
    assert (
        gen.run("Paris is the capital of France. It lies on the Seine.", 2, seed=5, n_cand=2, plans=1).sentences
        == one.sentences
    )


def test_copy_guard(gen, monkeypatch):
    """A candidate that copies REPEAT_SPAN consecutive words of an earlier sentence (the prompt's
    included) is a repeat; a shorter shared run is not."""
    prompt = "The Amazon is the largest rainforest on Earth."
    copy = "The Amazon is the largest rainforest on Earth and covers a region."
    fresh = "It covers much of the largest basin in South America."
    _fake_render(gen, monkeypatch, _rendered([copy, fresh]))
    res = gen.run(prompt, 1, n_cand=2, rerank=True, repeat_cos=1.01)
    assert res.sentences == [fresh] and res.steps[0].candidates[0]["copies"] is True
    assert res.steps[0].candidates[1]["copies"] is False  # "the largest" is a run of 2 words only
    _fake_render(gen, monkeypatch, _rendered([copy]))
    assert gen.run(prompt, 1, n_cand=1, repeat_cos=1.01).stop_reason == "repeat"
    assert gen.run(prompt, 1, n_cand=1, repeat_cos=1.01, repeat_span=0).sentences == [copy]  # 0 turns it off
    assert gen.run(prompt, 1, n_cand=1, repeat_cos=1.01, repeat_span=12).sentences == [copy]  # 8 words copied < 12


def test_rerank_off_renders_one_candidate(gen, monkeypatch):
    """RERANK=0 renders one candidate per sentence (nothing would choose among more) and its stop
    reason says what happened to that one."""
    asked = []

    def render(ctx, codes, p, seed, exemplars=None):
        asked.append(p.n_cand)
        return [{"text": "", "ended": True, "tokens": 0}] * p.n_cand

    _fake_render(gen, monkeypatch, render)
    res = gen.run("A prompt sentence is here.", 2, n_cand=4, rerank=False, retries=0)
    assert asked == [1] and res.stop_reason == "empty" and len(res.steps[0].candidates) == 1
    _fake_render(gen, monkeypatch, _rendered(["A fresh sentence.", "Another one."]))
    res = gen.run("A prompt sentence is here.", 1, n_cand=2, rerank=False)
    assert res.sentences == ["A fresh sentence."] and len(res.steps[0].candidates) == 1


def test_semantic_repeat_stops(gen, monkeypatch):
    """LCM's rule: a candidate whose embedding is within REPEAT_COS of an earlier sentence is a repeat."""
    import numpy as np

    vecs = {
        "A prompt sentence is here.": [1, 0, 0],
        "Here is a prompt sentence.": [0.99, 0.141, 0],
        "Something else.": [0, 1, 0],
    }
    dim = gen.rvq.D
    monkeypatch.setattr(
        gen,
        "embed",
        lambda texts: np.asarray(
            [np.pad(np.asarray(vecs.get(t, [0, 0, 1]), dtype="float32"), (0, dim - 3)) for t in texts], dtype="float32"
        ),
    )
    _fake_render(gen, monkeypatch, _rendered(["Here is a prompt sentence."]))
    res = gen.run("A prompt sentence is here.", 2, n_cand=1, repeat_cos=0.9)
    assert res.sentences == [] and res.stop_reason == "repeat" and res.steps[0].candidates[0]["repeat_cos"] > 0.98
    res = gen.run("A prompt sentence is here.", 1, n_cand=1, repeat_cos=1.01)
    assert res.sentences == ["Here is a prompt sentence."]
    _fake_render(gen, monkeypatch, _rendered(["Something else.", "Here is a prompt sentence."]))
    res = gen.run("A prompt sentence is here.", 1, n_cand=2, rerank=True, repeat_cos=0.9)
    assert res.sentences == ["Something else."]


def test_repetition_guards_spare_the_prompt(gen):
    """The penalty and the n-gram ban see the sentence being written, never the prompt: the engine
    hands them the sentence's own tokens only."""
    import torch

    from next_speed.generation.engine import sentence_processors
    from next_speed.generation.generate import GenParams

    scores = torch.ones(1, 10)
    for proc in sentence_processors(GenParams(repetition_penalty=2.0, no_repeat_ngram=2)):
        scores = proc(torch.tensor([[7, 8, 7]]), scores)  # the sentence so far
    assert scores[0, 8] == float("-inf")  # "7 8" again is banned
    assert scores[0, 7] == 0.5  # used in the sentence: penalized
    assert scores[0, 5] == 1.0  # untouched
    # in a real step the guards get the sentence so far (empty at first), never the prompt's tokens
    calls = []
    orig = gen.engine._choose
    gen.engine._choose = lambda job, logits, generated, g, procs: (
        calls.append([list(x) for x in generated]) or orig(job, logits, generated, g, procs)
    )
    try:
        job = gen.make_job(
            "Paris is the capital of France.", [0] * gen.rvq.K, replace_params(gen, n_cand=1, max_new_tokens=4), seed=0
        )
        gen.render_jobs([job])
    finally:
        gen.engine._choose = orig
    assert calls and calls[0] == [[]] and all(len(c[0]) == i for i, c in enumerate(calls))


def replace_params(gen, **kw):
    from next_speed.generation.generate import update_params

    return update_params(gen.params, kw)


def test_bad_calls(gen):
    with pytest.raises(ConfigError, match="prompt: is empty"):
        gen.run("   ")
    with pytest.raises(ConfigError, match="control character"):
        gen.run("Hello\x00 there.")
    with pytest.raises(ConfigError, match="unknown parameter 'temperature'"):
        gen.run("Hello there.", 1, temperature=0.5)
    with pytest.raises(ConfigError, match="top_p"):
        gen.run("Hello there.", 1, top_p=1.5)
    for bad in ({"temp": float("nan")}, {"top_p": float("inf")}, {"n_cand": True}, {"seed": 2**64}, {"seed": -1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            gen.run("Hello there.", 1, **bad)
    with pytest.raises(ConfigError, match="PROMPT: is empty"):
        resolve(GenerateConfig, environ={"PROMPT": "   "})


def test_generate_log_schema(in_run, gen):
    cfg = resolve(
        GenerateConfig,
        environ={
            "EMB_MODEL": "cache/tiny/encoder",
            "DEVICE": "cpu",
            "RUN_ID": "t1",
            "PROMPT": "Paris is the capital of France.",
            "MAX_NEW_TOKENS": "8",
        },
    )
    out = run_generate(cfg, generator=gen)
    log = json.loads(Path("out/generate/t1.json").read_text())
    assert out["out_path"] == "out/generate/t1.json"
    assert log["run_id"] == "t1" and log["settings"]["prompt"] == "Paris is the capital of France."
    run = log["runs"][0]
    assert {"prompt", "sentences", "planned", "realized", "steps", "stop_reason", "timings", "text", "params"} <= set(
        run
    )
    step = run["steps"][0]
    assert {"planned", "candidates", "chosen", "sentence", "realized", "timings"} <= set(step)
    assert {"text", "codes", "prefix", "cosine"} <= set(step["candidates"][0])
    assert log["device"] == "cpu" and log["dtype"] == "fp32"  # DTYPE=auto is fp32 on a CPU


def test_bf16_decoder_at_generation(in_run, gen, monkeypatch):
    """DTYPE=bf16 casts the decoder's weights; generation runs, and the same seed gives the same
    text; auto is fp32 on a CPU and bf16 on CUDA; a bad DTYPE is a one-line error naming it."""
    import torch

    from next_speed.core import runtime

    env = {
        "EMB_MODEL": "cache/tiny/encoder",
        "DEVICE": "cpu",
        "MAX_NEW_TOKENS": "8",
        "N_CAND": "3",
        "REPEAT_COS": "1.01",
        "PLANS": "1",
        "UNPLANNED": "0",
    }
    fast = SentenceGenerator(resolve(GenerateConfig, environ={**env, "DTYPE": "bf16"}))
    assert fast.dtype == "bf16" and next(fast.model.parameters()).dtype == torch.bfloat16
    rope = [b for n, b in fast.model.named_buffers() if n.endswith("inv_freq")]
    assert rope and all(b.dtype == torch.float32 for b in rope)  # RoPE frequencies are not rounded to bf16
    assert gen.dtype == "fp32" and next(gen.model.parameters()).dtype == torch.float32
    prompt = "Paris is the capital of France. It lies on the Seine."
    a, b = fast.run(prompt, 2, seed=3), fast.run(prompt, 2, seed=3)
    assert a.steps and [s.candidates for s in a.steps] == [s.candidates for s in b.steps]
    assert runtime.resolve_dtype("auto", "cpu") == "fp32"
    for supported, want in ((True, "bf16"), (False, "fp32")):  # GPUs before Ampere only emulate bf16
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, supported=supported, **k: supported)
        assert runtime.resolve_dtype("auto", "cuda:0") == want
    with pytest.raises(ConfigError, match="DTYPE=bf16 is for cuda and cpu"):
        runtime.resolve_dtype("bf16", "mps")
    with pytest.raises(ConfigError, match="DTYPE='fp16' is not valid"):
        resolve(GenerateConfig, environ={**env, "DTYPE": "fp16"})


def test_mismatched_artifacts_are_refused(in_run, tmp_path):
    with pytest.raises(StaleInputError, match="CODE_MODE=none but the decoder"):
        SentenceGenerator(
            resolve(
                GenerateConfig,
                environ={
                    "EMB_MODEL": "cache/tiny/encoder",
                    "DEVICE": "cpu",
                    "CODE_MODE": "none",
                    "DECODER_DIR": "out/decoder",
                },
            )
        )
    with pytest.raises(StaleInputError, match="no trained planner"):
        SentenceGenerator(resolve(GenerateConfig, environ={"PLANNER_DIR": str(tmp_path / "nothing"), "DEVICE": "cpu"}))


def test_code_agreement_and_report(in_run):
    from next_speed.evals.agreement import AgreementConfig, code_agreement, format_agreement
    from next_speed.evals.report import ReportConfig, make_report

    env = {"EMB_MODEL": "cache/tiny/encoder", "DEVICE": "cpu", "MAX_NEW_TOKENS": "6"}
    rep = code_agreement(resolve(AgreementConfig, {"eval_docs": 3, "n_cands": "1,2,4"}, environ=env))
    assert [(r["rerank"], r["n_cand"]) for r in rep["results"]] == [
        (mode, n) for mode in ("off", "on", "codes") for n in (1, 2, 4)
    ]
    by = {(r["rerank"], r["n_cand"]): r for r in rep["results"]}
    # the code-match pick is the most levels matched among the same candidates: never below generation's
    for n in (1, 2, 4):
        assert by[("codes", n)]["prefix"] >= by[("on", n)]["prefix"]
    assert by[("codes", 4)]["prefix"] >= by[("codes", 2)]["prefix"] >= by[("codes", 1)]["prefix"]
    assert rep["summary"]["l0_codes_rule_n4"] == by[("codes", 4)]["per_level"][0]
    # reranking among more candidates never lowers the matched prefix (same samples, best of more)
    assert by[("on", 4)]["prefix"] >= by[("on", 2)]["prefix"] >= by[("on", 1)]["prefix"] == by[("off", 1)]["prefix"]
    assert "rerank" in format_agreement(rep)
    s = rep["summary"]
    assert s["positions"] == rep["positions"] == by[("off", 1)]["n"] > 0
    assert s["l0_norerank"] == by[("off", 1)]["per_level"][0] and s["l0_rerank_n4"] == by[("on", 4)]["per_level"][0]
    for k in ("cos_plan_norerank", "cos_plan_rerank_n4", "cos_next_norerank", "cos_next_rerank_n4"):
        assert -1.0 <= s[k] <= 1.0
    # rerank among more candidates raises the cosine to the plan's reconstruction whenever prefixes tie
    assert by[("on", 4)]["prefix"] >= by[("off", 4)]["prefix"]
    out = make_report(
        ReportConfig(out_dir="out/report_test", eval_positions=6, decoder_rows=8, device="cpu"), environ=env
    )
    md = Path(out["report"]).read_text()
    for needle in (
        "## RVQ",
        "## Planner against baselines",
        "## Code agreement",
        "rvq.png",
        "agreement.png",
        "retrieval",
        "oracle exemplars",
    ):
        assert needle in md
    for png in ("rvq.png", "agreement.png", "planner.png", "planner_curve.png", "decoder.png"):
        assert (Path("out/report_test") / png).stat().st_size > 1000
    with pytest.raises(ConfigError, match="N_CANDS='1,x'"):
        resolve(AgreementConfig, {"n_cands": "1,x"}, environ=env)
    # generation's own stop rules and selection: with every candidate a "repeat" (REPEAT_COS 0),
    # every position is counted as refused
    rep = code_agreement(resolve(AgreementConfig, {"eval_docs": 2, "n_cands": "2"}, environ={**env, "REPEAT_COS": "0"}))
    assert all(r["all_refused"] == r["n"] > 0 for r in rep["results"] if r["rerank"] != "codes")
    assert all(r["all_refused"] == 0 for r in rep["results"] if r["rerank"] == "codes")  # no stop rules there


def test_candidates_never_contain_code_tokens(in_run, tmp_path):
    """Even a special-token decoder that prefers code tokens above all else never writes one."""
    import torch

    from next_speed.models.decoder_model import code_token_ids
    from next_speed.training.train_decoder import DecoderTrainConfig, train_decoder

    train_decoder(
        resolve(
            DecoderTrainConfig,
            environ={
                "MODEL": "cache/tiny/decoder",
                "CODE_MODE": "special",
                "MAX_STEPS": "1",
                "TRAIN_BS": "2",
                "VAL_ROWS": "2",
                "DEVICE": "cpu",
                "OUT_DIR": str(tmp_path / "dec_special"),
            },
        )
    )
    g = SentenceGenerator(
        resolve(
            GenerateConfig,
            environ={
                "EMB_MODEL": "cache/tiny/encoder",
                "DEVICE": "cpu",
                "CODE_MODE": "special",
                "DECODER_DIR": str(tmp_path / "dec_special"),
                "MAX_NEW_TOKENS": "6",
                "N_CAND": "2",
            },
        )
    )
    ids = code_token_ids(g.tok, g.cond)
    assert ids
    g.model.lm_head.register_forward_hook(
        lambda m, a, out: out.index_add(-1, torch.tensor(ids), torch.full((*out.shape[:-1], len(ids)), 100.0))
    )
    prompt = torch.tensor([g.tok("Cats sleep.")["input_ids"]])
    raw = g.model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False, pad_token_id=g.tok.pad_token_id)
    assert set(raw[0, prompt.shape[1] :].tolist()) <= set(ids)  # unsuppressed, the boosted codes win
    res = g.run("Cats sleep. They purr.", 2, do_sample=False)
    texts = [c["text"] for st in res.steps for c in st.candidates]
    assert texts and not any("<c" in t for t in texts)


def test_inject_decoder_generates_and_reloads(in_run, tmp_path):
    """A CODE_MODE=inject decoder with exemplars: trained, reloaded with its adapter and bank, used by the loop."""
    from next_speed.models.decoder_model import exemplar_bank, plan_injector
    from next_speed.training.train_decoder import DecoderTrainConfig, train_decoder

    out = tmp_path / "dec_inject"
    train_decoder(
        resolve(
            DecoderTrainConfig,
            environ={
                "MODEL": "cache/tiny/decoder",
                "CODE_MODE": "inject",
                "EXEMPLARS": "1",
                "MAX_STEPS": "2",
                "TRAIN_BS": "2",
                "VAL_ROWS": "2",
                "DEVICE": "cpu",
                "OUT_DIR": str(out),
            },
        )
    )
    assert (out / "plan_adapter.safetensors").is_file() and (out / "exemplars.npz").is_file()
    g = SentenceGenerator(
        resolve(
            GenerateConfig,
            environ={
                "EMB_MODEL": "cache/tiny/encoder",
                "DEVICE": "cpu",
                "DECODER_DIR": str(out),
                "MAX_NEW_TOKENS": "6",
                "N_CAND": "2",
            },
        )
    )
    assert g.cond.code_mode == "inject" and plan_injector(g.model) is not None and exemplar_bank(g.model) is not None
    res = g.run("Cats sleep. They purr.", 2, seed=1)
    assert res.steps and all(len(st.exemplars) == 1 for st in res.steps)
    assert res.to_dict()["steps"][0]["exemplars"] == res.steps[0].exemplars
    assert g.run("Cats sleep. They purr.", 2, seed=1).sentences == res.sentences  # same seed, same text
    with pytest.raises(StaleInputError, match="CODE_MODE=special but the decoder"):
        SentenceGenerator(
            resolve(
                GenerateConfig,
                environ={
                    "EMB_MODEL": "cache/tiny/encoder",
                    "DEVICE": "cpu",
                    "DECODER_DIR": str(out),
                    "CODE_MODE": "special",
                },
            )
        )


def _rare_stops(gen, request):
    """Zero the output rows of the sentence-ending tokens (logit 0, below the greedy maximum):
    greedy sentences of the random-init tiny decoder then have words. Restored after the test (the
    generator is shared by the module's tests)."""
    import torch

    w, ids = gen.model.get_output_embeddings().weight, gen.engine.stop_ids
    saved = w[ids].detach().clone()

    def restore():
        with torch.no_grad():
            w[ids] = saved

    request.addfinalizer(restore)
    with torch.no_grad():  # with PACK_WEIGHTS (the CPU default) the LM head's packed copy follows the edit
        w[ids] = 0.0


def test_engine_equals_straightforward_loop(gen, monkeypatch, request):
    """Greedy decoding: the engine (prompt cache kept across sentences, one prefill shared by the
    candidates, ended rows dropped) writes exactly what transformers' generate on the whole prompt
    writes; the cache reuse changes nothing but speed."""
    _rare_stops(gen, request)  # greedy would end every sentence at once
    prompt = "Paris is the capital of France. It lies on the Seine."
    got = {}
    for kv in (True, False):
        monkeypatch.setattr(gen, "use_kv", kv)
        for n in (1, 3):
            res = gen.run(prompt, 3, n_cand=n, do_sample=False, max_new_tokens=6, seed=5)
            got[kv, n] = [[(c["text"], c["ended"]) for c in st.candidates] for st in res.steps], res.timings
    for n in (1, 3):
        assert got[True, n][0] == got[False, n][0]
        assert len(got[True, n][0]) >= 2 and all(c[0] for step in got[True, n][0] for c in step)
        assert got[True, n][1]["prompt_tokens_reused"] > 0  # the second sentence reused the first one's prompt


def test_engine_drops_ended_rows_and_batches_jobs(gen, monkeypatch):
    """Jobs of different prompts, sizes and settings rendered in one batch give what each gives alone."""
    no_eos(gen, monkeypatch)
    K = gen.rvq.K
    specs = [
        ("Paris is the capital of France.", 2, 7),
        ("A much longer context sentence that goes on and on for a while.", 3, 8),
        ("Short.", 1, 9),
    ]

    def jobs():
        return [
            gen.make_job(ctx, [i % 2] * K, replace_params(gen, n_cand=n, max_new_tokens=4 + n, temp=1.5), seed=s)
            for i, (ctx, n, s) in enumerate(specs)
        ]

    alone = []
    for j in jobs():
        gen.render_jobs([j])
        alone.append(j.out)
    together = jobs()
    gen.render_jobs(together)
    assert [j.out for j in together] == alone
    assert all(len(j.out) == n for j, (_, n, _) in zip(together, specs))
    assert all(
        c["tokens"] <= 4 + n and (c["ended"] or c["tokens"] == 4 + n)
        for j, (_, n, _) in zip(together, specs)
        for c in j.out
    )


def test_decode_batch_jobs_join_and_leave_between_tokens(gen, monkeypatch):
    """The server's open batch: a short job leaves as soon as its rows end while a long one goes
    on, a job that joins mid-sentence is prefilled and merged, a cancelled one is taken out, and
    every job writes exactly what it writes alone."""
    no_eos(gen, monkeypatch)
    K = gen.rvq.K

    def job(ctx, n, max_new, seed):
        return gen.make_job(
            ctx, [seed % 3] * K, replace_params(gen, n_cand=n, max_new_tokens=max_new, temp=1.5), seed=seed
        )

    specs = {
        "short": ("Paris is the capital of France.", 2, 2, 1),
        "long": ("Short.", 1, 9, 2),
        "late": ("A much longer context sentence that goes on and on for a while.", 3, 4, 3),
        "gone": ("It rains.", 2, 9, 4),
    }
    alone = {}
    for k, sp in specs.items():
        j = job(*sp)
        gen.render_jobs([j])
        alone[k] = j.out
    b = gen.engine.batch()
    jobs = {k: job(*sp) for k, sp in specs.items()}
    b.add([jobs["short"], jobs["long"], jobs["gone"]])
    assert b.rows == 5
    finished = b.step() + b.step()  # two tokens: the short job's limit
    assert finished == [jobs["short"]] and b.rows == 3 and jobs["long"].out is None
    b.remove([jobs["gone"]])
    b.add([jobs["late"]])  # joins while "long" is mid-sentence, with a longer prompt
    assert b.rows == 4
    while b.rows:
        finished += b.step()
    assert finished == [jobs["short"], jobs["late"], jobs["long"]] and jobs["gone"].out is None
    assert {k: jobs[k].out for k in ("short", "long", "late")} == {k: alone[k] for k in ("short", "long", "late")}


def test_decode_batch_rows_join_and_leave_in_place(gen, monkeypatch):
    """A job whose prompt fits the batch's columns joins by writing its rows into the batch's
    buffers (the rows already there are not copied), rows that end are replaced by the last live
    rows, and every job still writes exactly what it writes alone."""
    no_eos(gen, monkeypatch)
    K = gen.rvq.K

    def job(ctx, n, max_new, seed):
        return gen.make_job(
            ctx, [seed % 3] * K, replace_params(gen, n_cand=n, max_new_tokens=max_new, temp=1.5), seed=seed
        )

    specs = {
        "first": ("A much longer context sentence that goes on and on for a while.", 2, 3, 5),
        "second": ("Another long context sentence, which also goes on for some time.", 3, 8, 6),
        "short": ("Hi.", 2, 5, 7),
        "more": ("Yes.", 3, 4, 8),
    }
    alone = {}
    for k, sp in specs.items():
        j = job(*sp)
        gen.render_jobs([j])
        alone[k] = j.out
    jobs = {k: job(*sp) for k, sp in specs.items()}
    b = gen.engine.batch()
    b.add([jobs["first"], jobs["second"]])
    finished = b.step()
    buf = b.kv.layers[0]._kb
    b.add([jobs["short"]])  # a shorter prompt: written in place
    assert b.rows == 7 and b.kv.layers[0]._kb is buf
    finished += b.step()
    b.add([jobs["more"]])  # past the spare rows: the buffers grow, the rows already there are kept
    assert b.rows == 10 and b.kv.layers[0]._kb.shape[0] >= 10
    while b.rows:
        finished += b.step()  # "first" ends before the others: its rows are refilled from the end
    assert finished[0] is jobs["first"] and {id(j) for j in finished} == {id(j) for j in jobs.values()}
    assert {k: j.out for k, j in jobs.items()} == alone


def test_nucleus_sample_keeps_the_top_p_set():
    """The partial-sort nucleus draws from exactly transformers' TopPLogitsWarper set, on both paths
    (the set inside the top 256 tokens, and a flat distribution that needs the whole vocabulary)."""
    import torch
    from transformers import TopPLogitsWarper

    from next_speed.generation.engine import nucleus_sample

    torch.manual_seed(0)
    for scale in (6.0, 0.05):
        logits = torch.randn(1, 2000) * scale
        allowed = set(torch.isfinite(TopPLogitsWarper(0.9)(None, logits.clone()))[0].nonzero().flatten().tolist())
        g = torch.Generator().manual_seed(1)
        seen = {int(nucleus_sample(logits, 0.9, g)[0]) for _ in range(400)}
        assert seen <= allowed and (len(allowed) > 256 or len(seen) > 1)
        if len(allowed) <= 4:
            assert seen == allowed
    logits = torch.randn(3, 50)
    a = nucleus_sample(logits, 0.8, torch.Generator().manual_seed(7))
    assert a.shape == (3,) and torch.equal(
        a, nucleus_sample(logits, 0.8, torch.Generator().manual_seed(7))
    )  # same seed, same tokens


def test_roomy_cache_layer_matches_concatenation():
    """The batch cache writes new tokens into spare room (no copy of the cache), grows when full,
    and selects rows, crops and trims exactly as transformers' concatenating DynamicLayer would."""
    import torch
    from transformers.cache_utils import DynamicLayer

    from next_speed.generation.engine import roomy_layer

    g = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    ref = DynamicLayer()
    ref.update(k0, v0)
    lay = roomy_layer(k0, v0, room=2)
    buf = lay.keys.data_ptr()
    for step, m in enumerate((1, 1, 3, 1)):  # the third update outgrows the room
        k, v = torch.randn(3, 2, m, 4, generator=g), torch.randn(3, 2, m, 4, generator=g)
        ref.update(k, v)
        keys, values = lay.update(k, v)
        assert torch.equal(keys, ref.keys) and torch.equal(values, ref.values)
        if step < 2:
            assert lay.keys.data_ptr() == buf  # written in place
    assert lay.get_seq_length() == ref.get_seq_length() == 11
    idx = torch.tensor([2, 0])
    ref.batch_select_indices(idx)
    lay.batch_select_indices(idx)
    ref.crop(-2)
    lay.crop(-2)
    assert torch.equal(lay.keys, ref.keys) and torch.equal(lay.values, ref.values)
    lay.trim_front(3)
    assert torch.equal(lay.keys, ref.keys[:, :, 3:]) and torch.equal(lay.values, ref.values[:, :, 3:])
    assert lay.get_seq_length() == 6
    k, v = torch.randn(2, 2, 1, 4, generator=g), torch.randn(2, 2, 1, 4, generator=g)
    keys, values = lay.update(k, v)
    assert torch.equal(keys, torch.cat([ref.keys[:, :, 3:], k], 2)) and torch.equal(
        values, torch.cat([ref.values[:, :, 3:], v], 2)
    )
    # an empty layer initializes itself on its first update, as DynamicLayer does
    fresh = type(lay)()
    keys, values = fresh.update(k0, v0)
    assert torch.equal(keys, k0) and torch.equal(values, v0) and fresh.get_seq_length() == 5


def test_vetoed_candidate_stops_early_in_both_engines(gen, monkeypatch, request):
    """A job's veto (the loop's copy guard) stops a candidate as soon as its complete words show
    the copy: fewer tokens, its text the start of what it would have written; the straightforward
    reference (`render_hf`) cuts greedy candidates at the same token."""
    no_eos(gen, monkeypatch)
    K = gen.rvq.K

    def job(p, veto=None):
        j = gen.make_job("Paris is the capital of France.", [1] * K, p, seed=7)
        j.veto = veto
        return j

    def veto_after(first_word, seen):
        def veto(text):  # stop a candidate that starts with `first_word` once it has three complete words
            seen.append(text)
            return len(text.split()) >= 3 and text.split()[0] == first_word

        return veto

    p = replace_params(gen, n_cand=3, max_new_tokens=14, temp=1.5)
    free, seen = job(p), []
    gen.engine.render([free])
    cut = job(p, veto_after(free.out[0]["text"].split()[0], seen))
    gen.engine.render([cut])
    assert seen  # (what the veto sees: test_veto_sees_complete_words_only)
    assert cut.out[0].get("vetoed") and cut.out[0]["tokens"] < free.out[0]["tokens"] and not cut.out[0]["ended"]
    assert free.out[0]["text"].startswith(cut.out[0]["text"])
    # (the job's other candidates share its random stream, so after the cut their samples may differ)
    import torch

    _rare_stops(gen, request)  # and only tokens that start a word: greedy text with words to veto
    vocab = gen.tok.convert_ids_to_tokens(list(range(len(gen.tok))))
    glued = torch.tensor([i for i, t in enumerate(vocab) if not t.startswith("Ġ") and i not in gen.engine._stop_set])
    monkeypatch.setattr(gen.engine, "bad", torch.cat([gen.engine.bad, glued]).unique())
    g = replace_params(gen, n_cand=1, max_new_tokens=14, do_sample=False)
    free = job(g)
    gen.engine.render([free])
    cut, ref = (
        job(g, veto_after(free.out[0]["text"].split()[0], [])),
        job(g, veto_after(free.out[0]["text"].split()[0], [])),
    )
    gen.engine.render([cut])
    gen.engine.render_hf([ref])
    assert cut.out[0].get("vetoed") and cut.out[0]["tokens"] < free.out[0]["tokens"] and ref.out == no_logprob(cut.out)


def test_copy_guard_stops_a_copying_candidate_early(gen, monkeypatch):
    """The loop hands its copy guard to the engine: a candidate is stopped once it shows
    REPEAT_SPAN words of an earlier sentence, and the step refuses it as before."""
    from next_speed.generation.generate import word_spans

    job = gen.make_job(
        "ctx",
        [0] * gen.rvq.K,
        replace_params(gen, repeat_span=3),
        seed=1,
        copy_spans=word_spans("The Amazon is the largest rainforest.", 3),
    )
    assert job.veto("So the largest") is False and job.veto("the Amazon is") is True
    assert (
        gen.make_job("ctx", [0] * gen.rvq.K, replace_params(gen, repeat_span=0), seed=1, copy_spans={("a", "b")}).veto
        is None
    )


def test_veto_sees_complete_words_only():
    """The veto is shown the text up to its last whitespace (a word there can no longer grow),
    only when that grew, and one word less when decoding cleans up spaces (" n't" glues on)."""
    from next_speed.generation.engine import veto_cut

    class Tok:
        vocab = ["Ġthe", "Ġama", "zon", "Ġis", "Ġn't"]

        def __init__(self, clean):
            self.clean_up_tokenization_spaces = clean

        def decode(self, ids, skip_special_tokens=True):
            text = "".join(self.vocab[i] for i in ids).replace("Ġ", " ")
            return text.replace(" n't", "n't") if self.clean_up_tokenization_spaces else text

    seen = []

    def veto(text):
        seen.append(text)
        return "amazon is" in text

    tok = Tok(False)
    assert veto_cut(tok, [0, 1], veto) == (False, 4) and seen == [" the"]  # " ama" may grow: not shown
    assert veto_cut(tok, [0, 1, 2], veto, 4) == (False, 4) and seen == [" the"]  # nothing new: not asked
    assert veto_cut(tok, [0, 1, 2, 3], veto, 4)[0] is False and seen[-1] == " the amazon"
    assert veto_cut(tok, [0, 1, 2, 3, 4], veto, 11)[0] is True and seen[-1] == " the amazon is"
    seen.clear()  # with clean-up, " is" may still become "isn't": one word held back
    assert veto_cut(Tok(True), [0, 1, 2, 3, 4], veto)[0] is False and seen == [" the"]


def test_loop_refuses_a_vetoed_candidate(gen, monkeypatch):
    """The loop hands its copy guard to the engine and refuses what the engine stopped."""
    prompt = "The Amazon is the largest rainforest on Earth."
    vetoes = []

    def render_jobs(jobs):
        for j in jobs:
            vetoes.append(j.veto)
            text = "The Amazon is the largest rainforest on"
            j.out = (
                [{"text": text, "ended": False, "tokens": 7, "vetoed": True}]
                if j.veto and j.veto(text)
                else [{"text": text + " Earth, again.", "ended": True, "tokens": 9}]
            )

    monkeypatch.setattr(gen, "render_jobs", render_jobs)
    res = gen.run(prompt, 1, n_cand=1, repeat_cos=1.01, repeat_span=3)
    assert vetoes[0] is not None and res.stop_reason == "repeat" and res.steps[0].candidates[0]["copies"] is True
    res = gen.run(prompt, 1, n_cand=1, repeat_cos=1.01, repeat_span=0)  # the guard off: no veto, kept
    assert vetoes[-1] is None and res.sentences == ["The Amazon is the largest rainforest on Earth, again."]


def test_no_copy_ngram_never_bans_ending_the_sentence(gen):
    """The copy ban bans the token that would continue an earlier sentence, but never the end of
    sequence that separates the earlier sentences in `copy_ids`: a candidate whose last words end
    an earlier sentence too may still end (banning it made the decoder append a stray token)."""
    import torch

    from next_speed.generation.engine import sentence_processors
    from next_speed.generation.generate import copy_ids

    tok, n = gen.tok, 3
    earlier = copy_ids(tok, ["Paris is the capital of France."])
    ids = tok("Paris is the capital of France.", add_special_tokens=False)["input_ids"]
    (ban,) = sentence_processors(
        replace_params(gen, no_copy_ngram=n, no_repeat_ngram=0, repetition_penalty=1.0), earlier, tok.eos_token_id
    )
    V = gen.model.get_output_embeddings().weight.shape[0]
    start = ban(torch.tensor([ids[: n - 1]]), torch.zeros(1, V))  # the sentence's start: its next token is banned
    assert start[0, ids[n - 1]] == float("-inf")
    end = ban(torch.tensor([ids[-(n - 1) :]]), torch.zeros(1, V))  # the sentence's end: ending stays allowed
    assert end[0, tok.eos_token_id] == 0
    bare = sentence_processors(
        replace_params(gen, no_copy_ngram=n, no_repeat_ngram=0, repetition_penalty=1.0), earlier
    )[0]
    assert bare(torch.tensor([ids[-(n - 1) :]]), torch.zeros(1, V))[0, tok.eos_token_id] == float(
        "-inf"
    )  # what it guards against


def test_no_copy_ngram_steers_off_earlier_sentences(gen, monkeypatch, request):
    """NO_COPY_NGRAM: no candidate writes a run of that many tokens found in the earlier
    sentences (HF's encoder-no-repeat-n-gram ban over their tokens), in the engine and in the
    straightforward reference alike; the loop hands every step the tokens of the prompt's
    sentences and of those it wrote."""
    from next_speed.generation.generate import copy_ids

    no_eos(gen, monkeypatch)
    _rare_stops(gen, request)
    K = gen.rvq.K
    rows: list = []
    orig = gen.engine._choose

    def choose(job, logits, generated, g, procs):
        nxt = orig(job, logits, generated, g, procs)
        rows.append(list(generated[0]) + [int(nxt[0])])
        return nxt

    monkeypatch.setattr(gen.engine, "_choose", choose)
    g = replace_params(
        gen, n_cand=1, max_new_tokens=12, do_sample=False, no_repeat_ngram=0, repetition_penalty=1.0, no_copy_ngram=3
    )

    def run(earlier, hf=False):
        rows.clear()
        j = gen.make_job("Paris is the capital of France.", [1] * K, g, seed=7, earlier_ids=earlier)
        (gen.engine.render_hf if hf else gen.engine.render)([j])
        return j, rows[-1] if rows else None

    free, free_ids = run(None)
    earlier = free_ids + [gen.tok.eos_token_id]  # the free sentence as an earlier one: every run of it is banned
    banned, banned_ids = run(earlier)
    grams = {tuple(earlier[i : i + 3]) for i in range(len(earlier) - 2)}
    assert len(banned_ids) >= 3 and not any(tuple(banned_ids[i : i + 3]) in grams for i in range(len(banned_ids) - 2))
    assert banned.out[0]["text"] != free.out[0]["text"]
    ref, _ = run(earlier, hf=True)
    assert ref.out == no_logprob(banned.out)
    assert (
        gen.make_job("ctx", [0] * K, replace_params(gen, no_copy_ngram=0), seed=1, earlier_ids=earlier).earlier_ids
        is None
    )
    # the loop: the first step gets the prompt's sentences (as sentence starts and after a space)
    jobs = []
    steps = gen.steps(**gen.prepare("Paris is the capital of France.", 1, no_copy_ngram=3))
    jobs += next(steps)
    assert jobs[0].earlier_ids == copy_ids(gen.tok, ["Paris is the capital of France."])
    ids = gen.tok("Paris is the capital of France.", add_special_tokens=False)["input_ids"]
    assert jobs[0].earlier_ids[: len(ids)] == ids


def test_pack_linears_matches_linear(monkeypatch, caplog):
    """oneDNN-packed linears (PACK_WEIGHTS) give nn.Linear's values, keep its parameters and state
    dict, follow an in-place edit of the weight, and leave autograd and other dtypes to the plain
    product; a oneDNN op that fails the check packs nothing, with a warning."""
    import torch

    from next_speed.models.packing import onednn_linear_available, pack_linears

    if not onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 8, bias=False))
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        want = model(x)
    keys = list(model.state_dict())
    assert pack_linears(model) == 2
    assert list(model.state_dict()) == keys and all(isinstance(m, torch.nn.Linear) for m in (model[0], model[2]))
    with torch.inference_mode():
        assert torch.allclose(model(x), want, atol=1e-5)
        assert model(x[:1, :1]).shape == (1, 1, 8)  # a decoding step's one row
    out = model(x)  # grad enabled, weights require grad: the plain product, so gradients flow
    out.sum().backward()
    assert model[0].weight.grad is not None and torch.allclose(out.detach(), want, atol=1e-5)
    with torch.no_grad():
        before = model[2].packed
        model[2].weight.mul_(2.0)
        assert torch.allclose(model(x), 2 * want, atol=1e-4)  # the edit reached the packed product...
        assert model[2].packed is not before  # ...because the copy was made anew (the packed path ran)
        model.to(torch.bfloat16)  # another dtype: the plain product
        assert torch.allclose(model(x.bfloat16()).float(), 2 * want, atol=0.1)

    fresh = torch.nn.Linear(24, 8)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, w, b, *a: torch.zeros(x.shape[0], 8))
    with caplog.at_level("WARNING"):
        assert pack_linears(fresh) == 0
    assert type(fresh) is torch.nn.Linear and "PACK_WEIGHTS" in caplog.text


def test_generator_packs_its_decoder_on_cpu(in_run, gen, monkeypatch, caplog):
    """PACK_WEIGHTS=1 (the default) packs the fp32 CPU decoder's linears and changes its logits by
    float rounding only, and a seeded generation's text not at all; PACK_WEIGHTS=0 leaves it as
    loaded; without oneDNN the generator says so and runs unpacked."""
    import torch

    import next_speed.models.packing as packing

    env = {
        "EMB_MODEL": "cache/tiny/encoder",
        "DEVICE": "cpu",
        "MAX_NEW_TOKENS": "10",
        "N_CAND": "3",
        "REPEAT_COS": "1.01",
        "PLANS": "1",
        "UNPLANNED": "0",
    }
    assert gen.packed_linears > 0
    plain = SentenceGenerator(resolve(GenerateConfig, environ={**env, "PACK_WEIGHTS": "0"}))
    assert plain.packed_linears == 0
    ids = torch.tensor([gen.tok("Paris is the capital of France.")["input_ids"]])
    with torch.inference_mode():
        a, b = gen.model(input_ids=ids).logits, plain.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    for seed in (1, 2):
        got, ref = (g.run("Paris is the capital of France.", 2, seed=seed) for g in (gen, plain))
        assert [st.candidates for st in got.steps] == [st.candidates for st in ref.steps]
    monkeypatch.setattr(packing, "onednn_linear_available", lambda: False)
    with caplog.at_level("WARNING"):
        assert SentenceGenerator(resolve(GenerateConfig, environ=env)).packed_linears == 0
    assert "PACK_WEIGHTS" in caplog.text


def test_unplanned_candidates_continue_the_text(gen):
    """UNPLANNED=2: each step also gets two candidates from the base model the decoder was
    fine-tuned from, continuing the text by one sentence; the rerank weighs them with the plan's."""
    from next_speed.generation.engine import _starts_sentence

    res = gen.run("Paris is the capital of France. It lies on the Seine.", 2, seed=2, unplanned=2, n_cand=2)
    for st in res.steps:
        assert len(st.candidates) == 4 and [bool(c.get("unplanned")) for c in st.candidates] == [
            False,
            False,
            True,
            True,
        ]
    again = gen.run("Paris is the capital of France. It lies on the Seine.", 2, seed=2, unplanned=2, n_cand=2)
    assert again.sentences == res.sentences
    base = gen.base_engine()
    assert base.model is not gen.model and base.tok("x")["input_ids"]
    tok = base.tok
    ids = tok("It rains.", add_special_tokens=False)["input_ids"]
    then = tok(" Then", add_special_tokens=False)["input_ids"][0]
    assert _starts_sentence(tok, ids, then)
    assert not _starts_sentence(tok, tok("It rains", add_special_tokens=False)["input_ids"], then)
