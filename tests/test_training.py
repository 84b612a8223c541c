"""Training: the planner and decoder trainers (what they learn, their inputs' checks, the CLI), the
shared loop, mixed precision and time budgets, with tiny random-init models."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script
from tinydata import (
    env,
    hidden_docs,
    synthetic_docs,
    tiny_env,
    write_code_function_sets,
    write_decoder_sets,
    write_sentences,
    write_trainsets,
)

from next_speed.core.artifacts import make_meta, write_json
from next_speed.core.config import resolve
from next_speed.core.errors import ConfigError, NextSpeedError, StaleInputError
from next_speed.evals.planner_eval import PlannerEvalConfig, eval_planner
from next_speed.models.decoder_model import (
    Conditioning,
    add_code_tokens_to_tokenizer,
    encode_example,
    init_code_embeddings,
    load_decoder,
)
from next_speed.training.train_decoder import (
    DecoderEvalConfig,
    DecoderTrainConfig,
    eval_decoder,
    format_decoder_eval,
    train_decoder,
)
from next_speed.training.train_planner import PlannerTrainConfig, train_planner


@pytest.mark.parametrize("mode", ["special", "text", "none"])
def test_all_code_modes_train_and_reload(workdir, tiny_llama, mode):
    write_decoder_sets(workdir)
    info = train_decoder(resolve(DecoderTrainConfig, environ=env(tiny_llama, CODE_MODE=mode)))
    out = "out/decoder" if mode == "special" else f"out/decoder_{mode}"
    assert info["steps"] == 6 and (Path(out) / "model.safetensors").is_file() and (Path(out) / "curve.png").is_file()
    assert info["best"]["val_loss"] < info["val_loss_before"]
    m1, tok, cond, meta = load_decoder(out)
    m2, _, _, _ = load_decoder(out)
    assert cond.code_mode == mode and meta["K"] == 2 and meta["V"] == 4
    batch = tok(["Cats sleep"], return_tensors="pt")
    assert torch.equal(m1(**batch).logits, m2(**batch).logits)
    cfg = json.loads((Path(out) / "config.json").read_text())
    assert cfg["next_speed"]["conditioning"]["code_mode"] == mode


def test_seq2seq_family_trains(workdir, tiny_t5):
    write_decoder_sets(workdir)
    info = train_decoder(resolve(DecoderTrainConfig, environ=env(tiny_t5)))
    assert info["best"]["val_loss"] < info["val_loss_before"]
    _, _, cond, _ = load_decoder("out/decoder")
    assert cond.family == "seq2seq"


def test_top_layers_only_trains_top_and_code_rows(workdir, tiny_llama):
    from transformers import AutoModelForCausalLM

    write_decoder_sets(workdir)
    info = train_decoder(resolve(DecoderTrainConfig, environ=env(tiny_llama, TRAIN_LAYERS=1, TRAIN_CODE_EMB=1)))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tuned, tok, cond, _ = load_decoder("out/decoder")
    n = base.get_input_embeddings().weight.shape[0]
    assert torch.equal(base.model.layers[0].mlp.up_proj.weight, tuned.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(base.model.layers[1].mlp.up_proj.weight, tuned.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(base.get_input_embeddings().weight, tuned.get_input_embeddings().weight[:n])
    assert info["selection"]["code_rows"] == 8


def test_tokenization_cache_reused_and_invalidated(workdir, tiny_llama):
    write_decoder_sets(workdir)
    e = env(tiny_llama, CACHE_TOKENIZED=1, PRETOKENIZE_ONLY=1)
    r1 = train_decoder(resolve(DecoderTrainConfig, environ=e))
    assert r1["cache"]["hit"] is False and not Path("out/decoder").exists()
    r2 = train_decoder(resolve(DecoderTrainConfig, environ=e))
    assert r2["cache"]["hit"] is True and r2["cache"]["cache"] == r1["cache"]["cache"]
    r3 = train_decoder(resolve(DecoderTrainConfig, environ={**e, "MAX_IN": "40"}))
    assert r3["cache"]["hit"] is False and r3["cache"]["cache"] != r1["cache"]["cache"]
    # the input changes -> another key
    p = Path("data/decoder_train.jsonl")
    p.write_text(p.read_text().replace("Cats", "Dogs"))
    meta = json.loads(Path("data/train_meta.json").read_text())
    from next_speed.core.artifacts import sha256_path

    key = next(k for k in meta["outputs"] if k.endswith("decoder_train.jsonl"))
    meta["outputs"][key]["sha256"] = sha256_path(p)
    write_json("data/train_meta.json", meta)
    r4 = train_decoder(resolve(DecoderTrainConfig, environ=e))
    assert r4["cache"]["hit"] is False
    # a corrupted cache is rebuilt, never read
    cache = Path(r4["cache"]["cache"])
    (cache / "cache_meta.json").write_text('{"key_src": {}, "rows": 1}')
    assert train_decoder(resolve(DecoderTrainConfig, environ=e))["cache"]["hit"] is False


def test_decoder_bad_inputs(workdir, tiny_llama):
    with pytest.raises(StaleInputError, match="step 04"):
        train_decoder(resolve(DecoderTrainConfig, environ=env(tiny_llama)))
    write_decoder_sets(workdir)
    with pytest.raises(StaleInputError, match="V=8 here, but the training sets were built with V=4"):
        train_decoder(resolve(DecoderTrainConfig, environ=env(tiny_llama, V=8)))
    with pytest.raises(NextSpeedError, match="MODEL='/nope' could not be loaded.*smollm2-135m"):
        train_decoder(resolve(DecoderTrainConfig, environ=env("/nope")))
    with pytest.raises(ConfigError, match="MAX_IN=8 is too small"):
        train_decoder(resolve(DecoderTrainConfig, environ=env(tiny_llama, MAX_IN=8)))
    with pytest.raises(ConfigError, match="TRAIN_LAYERS='top'"):
        resolve(DecoderTrainConfig, environ=env(tiny_llama, TRAIN_LAYERS="top"))
    assert not Path("out/decoder").exists()
    Path("data/decoder_train.jsonl").write_text('{"context": "", "codes": [0, 1]\n')
    with pytest.raises(StaleInputError, match="does not match its metadata"):
        train_decoder(resolve(DecoderTrainConfig, environ=env(tiny_llama)))
    meta = json.loads(Path("data/train_meta.json").read_text())
    from next_speed.core.artifacts import sha256_path

    key = next(k for k in meta["outputs"] if k.endswith("decoder_train.jsonl"))
    meta["outputs"][key]["sha256"] = sha256_path("data/decoder_train.jsonl")
    write_json("data/train_meta.json", meta)
    with pytest.raises(NextSpeedError, match=r"decoder_train.jsonl:1: malformed JSON"):
        train_decoder(resolve(DecoderTrainConfig, environ=env(tiny_llama)))


def test_codes_value_report(workdir, tiny_llama):
    write_decoder_sets(workdir)
    train_decoder(resolve(DecoderTrainConfig, environ=env(tiny_llama, MAX_STEPS=30, EVAL_EVERY=30)))
    res = eval_decoder(resolve(DecoderEvalConfig, environ={"DEVICE": "cpu", "TRAIN_NONE": "0"}))
    assert res["no_codes_decoder"] is None and "CODE_MODE=none" in res["note"] and res["summary"]["loss_none"] is None
    # by default the no-codes decoder is trained here, with the codes decoder's recorded budget
    res = eval_decoder(resolve(DecoderEvalConfig, environ={"DEVICE": "cpu"}))
    _, _, cond, nmeta = load_decoder("out/decoder_none")
    steps = load_decoder("out/decoder")[3]["steps"]
    assert cond.code_mode == "none" and nmeta["steps"] == steps and nmeta["train"]["lr"] == 1e-3
    s = res["summary"]
    assert set(s) >= {"loss_true", "loss_shuffled", "loss_none", "rows"} and s["rows"] == res["rows"]
    assert s["ratio_none"] == round(s["loss_true"] / s["loss_none"], 4)
    assert "shuffled codes" in format_decoder_eval(res)
    # a no-codes decoder with another budget is not comparable: retrained (default) or refused (TRAIN_NONE=0)
    train_decoder(resolve(DecoderTrainConfig, environ=env(tiny_llama, MAX_STEPS=5, CODE_MODE="none")))
    res = eval_decoder(resolve(DecoderEvalConfig, environ={"DEVICE": "cpu", "TRAIN_NONE": "0"}))
    assert res["no_codes_decoder"] is None and "MAX_STEPS=5 there, 30 for the codes decoder" in res["note"]
    res = eval_decoder(resolve(DecoderEvalConfig, environ={"DEVICE": "cpu"}))
    assert res["no_codes_decoder"] is not None and load_decoder("out/decoder_none")[3]["steps"] == steps


@pytest.mark.slow
def test_cli_spec_commands(workdir, tiny_llama):
    write_decoder_sets(workdir)
    base = env(tiny_llama)
    r = run_script(
        "06_train_decoder.py",
        env={**base, "NUM_PROC": "2", "CACHE_TOKENIZED": "1", "MAP_BATCH_SIZE": "5", "PRETOKENIZE_ONLY": "1"},
        cwd=workdir,
    )
    assert r.returncode == 0, r.stderr
    assert "tokenized" in r.stdout and not (workdir / "out/decoder").exists()
    r = run_script("06_train_decoder.py", env={**base, "CODE_MODE": "none"}, cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert (workdir / "out/decoder_none/model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["inject", "special"])
def test_conditioning_learns_the_codes(workdir, tiny_llama, mode):
    """After a few dozen steps the true codes must beat shuffled codes by far, since the target
    depends on nothing else. (The random-init tiny LM cannot learn language with its top block
    alone, so all of it trains here and the plan enters at block 0.)"""
    write_code_function_sets(workdir)
    info = train_decoder(
        resolve(
            DecoderTrainConfig,
            environ=env(
                tiny_llama,
                CODE_MODE=mode,
                MAX_STEPS=60,
                NUM_EPOCHS=20,
                EVAL_EVERY=20,
                TRAIN_BS=8,
                LR="1e-2",
                ADAPTER_LR="3e-2",
                VAL_ROWS=24,
            ),
        )
    )
    if mode == "inject":
        assert info["selection"]["inject_layer"] == 0 and info["selection"]["adapter_params"] > 0
    res = eval_decoder(resolve(DecoderEvalConfig, environ={"DEVICE": "cpu", "VAL_ROWS": "24", "TRAIN_NONE": "0"}))
    # the special code rows learn slower on this tiny random-init LM (measured 1.22 vs 1.41 after 60 steps)
    assert res["true_codes"] < (0.7 if mode == "inject" else 0.9) * res["shuffled_codes"], res


def test_preset_path_reads_the_plan(tiny_llama):
    """The CPU preset's path (CODE_MODE=special + exemplars, top blocks only): the plan's positions
    (exemplar and code tokens) pass gradient into the trained block, whose weights get gradient, and
    the loss changes with the codes; frozen blocks get none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from next_speed.models.decoder_model import collate, token_losses
    from next_speed.training.train_decoder import select_trainable

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cond = Conditioning(K=2, V=4, code_mode="special", max_in=48, max_out=16, exemplars=2)
    n_before = len(tok)
    add_code_tokens_to_tokenizer(tok, cond)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    init_code_embeddings(model, tok, cond, n_before)
    select_trainable(model, "1", n_before, False)
    seen = {}

    def keep_input(_module, args, kwargs):  # the trained block's input as a leaf, to read its gradient
        if args:
            seen["h"] = args[0].detach().requires_grad_(True)
            return (seen["h"], *args[1:]), kwargs
        seen["h"] = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, {**kwargs, "hidden_states": seen["h"]}

    model.model.layers[1].register_forward_pre_hook(keep_input, with_kwargs=True)

    def loss(codes, ex):
        batch = collate(
            [encode_example(tok, cond, "Rivers flow.", codes, "Cats sleep.", ex)], tok.pad_token_id, "causal"
        )
        s, n = token_losses(model, batch, "causal")
        return (s.sum() / n.sum()), batch

    true, batch = loss([1, 2], ["Stars shine.", "Rivers flow."])
    true.backward()
    n_prompt = int((batch["labels"][0] == -100).sum())
    plan_len = len(
        tok(
            " ".join(["Stars shine.", "Rivers flow."]) + "\n" + cond.codes_text([1, 2]) + "\n", add_special_tokens=False
        )["input_ids"]
    )
    g = seen["h"].grad[0, n_prompt - plan_len : n_prompt - 1].abs().sum(-1)
    assert (g > 0).all(), g  # every plan token but the last (whose output predicts the target) is read
    assert model.model.layers[1].self_attn.k_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.up_proj.weight.grad is None
    with torch.no_grad():  # same length, other codes: if the code tokens were not read the loss would be equal
        assert abs(loss([3, 0], ["Stars shine.", "Rivers flow."])[0] - true) > 1e-6


def test_oracle_exemplars_say_why_they_are_skipped(tmp_path):
    """The oracle-exemplar bound of decoder_eval is skipped with a reason that names the file,
    and computed from the embeddings the training sets name."""
    import numpy as np

    from next_speed.models.decoder_model import ExemplarBank, attach_bank
    from next_speed.training.train_decoder import _oracle_exemplars

    emb = np.eye(3, dtype="float32")
    bank = ExemplarBank(
        texts=["x", "y", "z"], docs=[1, 2, 3], emb=emb, codebooks=np.zeros((1, 2, 3), "float32"), codes=[[0]] * 3
    )

    class Model:
        pass

    m = Model()
    attach_bank(m, bank)
    cond = Conditioning(K=1, V=2, exemplars=1)
    rows = [{"sid": 1, "doc": 9, "target": "t"}]
    tm = tmp_path / "train_meta.json"
    meta = {"train": {"train_meta": str(tm)}}
    assert _oracle_exemplars(m, cond, meta, rows, "val.jsonl") == (
        None,
        f"no oracle-exemplar bound: {tm} is not a readable training-sets metadata file",
    )
    tm.write_text(json.dumps({"emb_path": str(tmp_path / "emb.npy")}))
    got, why = _oracle_exemplars(m, cond, meta, rows, "val.jsonl")
    assert got is None and "emb.npy" in why and "missing" in why
    np.save(tmp_path / "emb.npy", np.eye(3, dtype="float32")[[2, 1, 0]])
    assert _oracle_exemplars(m, cond, meta, rows, "val.jsonl") == ([["y"]], None)
    got, why = _oracle_exemplars(m, cond, meta, [{"sid": 7, "doc": 9, "target": "t"}], "val.jsonl")
    assert got is None and "val.jsonl names sentence rows beyond" in why
    assert _oracle_exemplars(m, Conditioning(K=1, V=2), meta, rows, "val.jsonl") == (
        None,
        None,
    )  # no exemplars: no bound


def test_time_budget_replans_the_schedule(workdir, tiny_llama):
    """TIME_BUDGET re-plans the step count after three steps, so the learning rate has decayed when
    the budget ends (without the re-plan it would still be near its peak at step ~1% of 2,000)."""
    write_decoder_sets(workdir)
    info = train_decoder(
        resolve(
            DecoderTrainConfig,
            environ=env(tiny_llama, MAX_STEPS=2000, NUM_EPOCHS=1000, TIME_BUDGET=0.05, EVAL_EVERY=1000, WARMUP=1),
        )
    )
    assert 3 < info["steps"] < 2000 and info["seconds"] < 60, info["steps"]
    assert info["history"][-1]["lr"] < 0.7 * 1e-3, info["history"][-1]


def test_bf16_mixed_precision_training(workdir, tiny_llama, monkeypatch):
    """AMP: bf16 autocast trains (fp32 weights kept, loss going down), is recorded with the
    decoder, resolves by device and CPU support, and is part of the budget a no-codes decoder must share."""
    from next_speed.core import runtime
    from next_speed.training.train_decoder import _none_mismatch

    write_decoder_sets(workdir)
    info = train_decoder(resolve(DecoderTrainConfig, environ=env(tiny_llama, AMP="bf16")))
    assert info["selection"]["amp"] == "bf16" and info["best"]["val_loss"] < info["val_loss_before"]
    model, _, _, meta = load_decoder("out/decoder")
    assert meta["selection"]["amp"] == "bf16" and next(model.parameters()).dtype == torch.float32
    for native, want in ((True, "bf16"), (False, "off")):
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda native=native: native)
        assert runtime.resolve_amp("auto", "cpu") == want
    assert runtime.resolve_amp("auto", "cuda:0") == "bf16" and runtime.resolve_amp("off", "cuda") == "off"
    with pytest.raises(ConfigError, match="AMP=bf16 is for cuda and cpu"):
        runtime.resolve_amp("bf16", "mps")
    x = torch.ones(2, 2)
    with runtime.autocast("bf16", "cpu"):
        assert (x @ x).dtype == torch.bfloat16  # the products the training step runs
    with runtime.autocast("off", "cpu"):
        assert (x @ x).dtype == torch.float32
    a, b = {"train": {"amp": "auto"}, "inputs": {}}, {"train": {"amp": "off"}, "inputs": {}}
    assert _none_mismatch(a, b) == "AMP=off there, auto for the codes decoder"
    a2, b2 = ({"train": {"amp": "auto"}, "selection": {"amp": amp}, "inputs": {}} for amp in ("bf16", "off"))
    assert _none_mismatch(a2, b2) == "it trained with AMP resolved to off, the codes decoder with bf16"
    assert _none_mismatch(a2, a2) is None


def test_engine_with_injected_plan_equals_generate(tiny_llama):
    """CODE_MODE=inject through the engine (prompt cache kept across sentences, candidates batched,
    rows dropped as they end) writes what transformers' generate writes, and the plan changes it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from next_speed.generation.engine import DecodeEngine, PromptCache, SentenceJob
    from next_speed.generation.generate import GenParams
    from next_speed.models.decoder_model import PlanInjector, attach_injector, build_plan_adapter

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    adapter = build_plan_adapter(torch.randn(2, 4, 16), model.config.hidden_size, 16, 5.0)
    with torch.no_grad():
        for p in adapter.parameters():  # an adapter that says something (a fresh one adds zero)
            p.normal_(0, 0.5)
    attach_injector(model, PlanInjector(model, adapter, 1))
    engine = DecodeEngine(model, tok, [], "cpu")
    with torch.no_grad():
        model.get_output_embeddings().weight[engine.stop_ids] = 0.0  # greedy would end at once
    cond = Conditioning(K=2, V=4, code_mode="inject", max_in=48, max_out=16)
    p = GenParams(do_sample=False, max_new_tokens=5, n_cand=2)

    def job(ctx, plan, cache=None):
        ex = encode_example(tok, cond, ctx, plan, None)
        return SentenceJob(
            prompt=ex["input_ids"], n=2, params=p, seed=0, planned=plan, plan_start=ex["plan_start"], cache=cache
        )

    cache = PromptCache()
    outs = {}
    for plan, ctx in (([1, 2], "Rivers flow."), ([3, 0], "Rivers flow. Cats sleep."), ([0, 1], "Rivers flow.")):
        a, b = job(ctx, plan, cache), job(ctx, plan)
        engine.render([a])
        engine.render_hf([b])
        # the reference engine does not compute the decoder's log-probabilities
        assert [{k: v for k, v in o.items() if k != "logprob"} for o in a.out] == b.out and a.out[0]["text"]
        outs[tuple(plan)] = a.out[0]["text"]
    assert cache.reused > 0  # the second prompt extends the first
    assert len(set(outs.values())) > 1  # the plan reaches the text
    # jobs with different plans in one batch: each as alone
    together = [job("Rivers flow.", [1, 2]), job("Cats sleep all day.", [0, 1])]
    engine.render(together)
    assert together[0].out[0]["text"] == outs[(1, 2)]


@pytest.mark.parametrize("head_mode", ["independent", "chained"])
def test_training_learns_pattern_beyond_baselines(workdir, head_mode):
    write_trainsets(workdir, synthetic_docs())
    info = train_planner(resolve(PlannerTrainConfig, environ=tiny_env(HEAD_MODE=head_mode)))
    hist = info["history"]
    assert hist[-1]["val_loss"] < 0.5 * np.log(5)  # far below the loss of a uniform guess
    rep = eval_planner(resolve(PlannerEvalConfig, environ={"DEVICE": "cpu"}))
    res = rep["results"]
    best_baseline = max(res[b]["acc"][0] for b in ("most frequent", "copy previous", "bigram"))
    assert res["planner"]["acc"][0] > best_baseline + 0.2, res
    assert res["planner"]["exact"] > res["bigram"]["exact"]
    for f in ("sentence_lm.pt", "config.json", "curve.png"):
        assert (workdir / "out/sentence_lm" / f).is_file()
    assert json.loads(Path("out/sent_lm_eval.json").read_text())["results"]["planner"]["n"] == 80
    ahead = [rep["summary"][f"l0_top1_ahead_{d}"] for d in range(1, 5)]  # PARALLEL's plans, 1..4 sentences ahead
    assert all(0.0 <= a <= 1.0 for a in ahead) and ahead[0] > best_baseline


def test_reconstruction_inputs():
    """RECON_INPUT: a share of the real positions read their codes' unit RVQ reconstruction; BOS
    and padding rows never do; share 0 leaves the embeddings as they are."""
    from next_speed.training.train_planner import with_reconstructions

    books = torch.randn(2, 5, 8)
    codes = torch.tensor([[[5, 5], [1, 2], [3, 4]]])  # BOS, then two sentences (V = 5)
    emb = torch.randn(1, 3, 8)
    assert torch.equal(with_reconstructions(emb, codes, books, torch.zeros(1, 3, dtype=torch.bool)), emb)
    out = with_reconstructions(emb, codes, books, torch.ones(1, 3, dtype=torch.bool))
    rec = books[0][1] + books[1][2]
    assert torch.equal(out[0, 0], emb[0, 0])
    assert torch.allclose(out[0, 1], rec / rec.norm()) and torch.allclose(out[0, 2].norm(), torch.tensor(1.0))


def test_planner_bad_inputs(workdir):
    with pytest.raises(StaleInputError, match="step 04"):
        train_planner(resolve(PlannerTrainConfig, environ=tiny_env()))
    write_trainsets(workdir, synthetic_docs(n_docs=12))
    with pytest.raises(StaleInputError, match="K=3 here, but the training sets were built with K=2"):
        train_planner(resolve(PlannerTrainConfig, environ=tiny_env(K=3)))
    with pytest.raises(ConfigError, match="STEPS=0 is too small"):
        resolve(PlannerTrainConfig, environ=tiny_env(STEPS=0))
    # codes out of range for V
    write_trainsets(workdir, synthetic_docs(n_docs=12, V=9), V=5)
    with pytest.raises(StaleInputError, match="out of range"):
        train_planner(resolve(PlannerTrainConfig, environ=tiny_env()))
    # an empty training split
    paths = write_trainsets(workdir, synthetic_docs(n_docs=4), val_docs=4)
    with pytest.raises(NextSpeedError, match="is empty"):
        train_planner(resolve(PlannerTrainConfig, environ=tiny_env()))
    assert not Path("out/sentence_lm").exists()
    del paths


@pytest.mark.slow
def test_cli_end_to_end(workdir):
    write_trainsets(workdir, synthetic_docs(n_docs=20))
    r = run_script("05_train_sentence_lm.py", "--steps", "30", env=tiny_env(STEPS=5000), cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert (
        "planner (" in r.stdout and json.loads(Path("out/sentence_lm/config.json").read_text())["train"]["steps"] == 30
    )
    r = run_script("sent_lm_eval.py", env={"DEVICE": "cpu"}, cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "bigram" in r.stdout and "copy previous" in r.stdout and "most frequent" in r.stdout
    r = run_script("05_train_sentence_lm.py", env=tiny_env(D_MODEL=30, N_HEADS=4), cwd=workdir)
    assert r.returncode == 2 and r.stderr.strip() == "error: D_MODEL=30 is not divisible by N_HEADS=4"


def test_one_learning_rate_schedule():
    """Both trainers use training.cosine_lr: linear warmup to the base rate, cosine down to a tenth."""
    from next_speed.training.loop import cosine_lr

    lrs = [cosine_lr(s, 100, 10, 1e-3) for s in range(101)]
    assert lrs[0] == 1e-4 and abs(lrs[9] - 1e-3) < 1e-12
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert abs(lrs[100] - 1e-4) < 1e-12


def test_fit_follows_the_schedule_and_keeps_the_best_state():
    """Both trainers run `training.loop.fit`: every step's rate is the schedule's (scaled per
    group), and the kept state is the one of the lowest validation loss, not the last."""
    from next_speed.training.loop import Dist, cosine_lr, decay_groups, fit

    w = torch.nn.Parameter(torch.zeros(2, 2))
    b = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD(decay_groups([w, b], lambda p: p.dim() < 2, 0.0, lr_scale=0.5), lr=1.0)
    seen_lr, val = [], {2: 3.0, 4: 1.0, 6: 2.0}

    def step(i):
        seen_lr.append([g["lr"] for g in opt.param_groups])
        (w.sum() + b.sum()).backward()
        return 1.0

    res = fit(opt=opt, params=[w, b], total=6, train_step=step, evaluate=lambda s: {"val_loss": val[s]},
              snapshot=lambda: len(seen_lr), lr_at=lambda s, n: cosine_lr(s, n, 2, 1e-2), dd=Dist(), desc="t",
              eval_every=2)  # fmt: skip
    assert seen_lr == [[0.5 * cosine_lr(s, 6, 2, 1e-2)] * 2 for s in range(6)]
    assert res.steps == 6 and res.stopped_by == "steps" and [h["step"] for h in res.history] == [2, 4, 6]
    assert res.best["step"] == 4 and res.best["val_loss"] == 1.0 and res.best_state == 4


def test_embedding_input_beats_every_baseline(workdir):
    docs, emb = hidden_docs()
    write_trainsets(workdir, docs, emb=emb)
    # RECON_INPUT=0: here the next tuple hangs on what only the embedding holds, which a
    # reconstruction from the codes cannot carry
    env = tiny_env(PLANNER_INPUT="emb", STEPS=400, RECON_INPUT=0)
    info = train_planner(resolve(PlannerTrainConfig, environ=env))
    assert info["planner_input"] == "emb" and info["model"]["emb_dim"] == 8
    rep = eval_planner(resolve(PlannerEvalConfig, environ={"DEVICE": "cpu"}))
    res, sm = rep["results"], rep["summary"]
    assert set(res) == {
        "planner",
        "planner (PLAN_DEEP=levels)",
        "most frequent",
        "copy previous",
        "bigram",
        "retrieval",
    }
    assert rep["plan_deep"] == "mean" and res["planner"]["acc"][0] == res["planner (PLAN_DEEP=levels)"]["acc"][0]
    assert not any(sm[f"{k}_best_baseline_name"].startswith("planner") for k in ("l0_top1", "cos_next"))
    for name in ("most frequent", "copy previous", "bigram", "retrieval"):
        assert res["planner"]["acc"][0] > res[name]["acc"][0] + 0.3, (name, res[name]["acc"])
    assert (
        sm["l0_top1"] >= 1.3 * sm["l0_top1_best_baseline"] and sm["l0_top5"] >= sm["l0_top5_best_baseline"]
    )  # V=5: top-5 is every code
    for key in ("cos_next", "contrastive_acc"):  # every model is scored on every measure
        assert all(0 <= abs(m[key]) <= 1 for m in res.values()) and f"{key}_best_baseline" in sm
    # the tuple-only planner, same budget, cannot see h: it stays near chance
    train_planner(
        resolve(PlannerTrainConfig, environ=tiny_env(PLANNER_INPUT="codes", STEPS=400, OUT_DIR="out/codes_only"))
    )
    rep2 = eval_planner(
        resolve(PlannerEvalConfig, environ={"DEVICE": "cpu", "OUT_DIR": "out/codes_only", "OUT_JSON": "out/e2.json"})
    )
    assert rep2["results"]["planner"]["acc"][0] < res["planner"]["acc"][0] - 0.3
    # PLAN_DEEP=levels: the rows swap, the summary follows the named tuple
    rep3 = eval_planner(
        resolve(PlannerEvalConfig, environ={"DEVICE": "cpu", "PLAN_DEEP": "levels", "OUT_JSON": "out/e3.json"})
    )
    assert rep3["results"]["planner"] == res["planner (PLAN_DEEP=levels)"]
    assert rep3["results"]["planner (PLAN_DEEP=mean)"] == res["planner"]
    assert rep3["summary"]["cos_next"] == round(res["planner (PLAN_DEEP=levels)"]["cos_next"], 4)


def test_extra_data_joins_training_not_validation(workdir):
    docs, emb = hidden_docs(n_docs=30)
    write_trainsets(workdir, docs, emb=emb)
    more, more_emb = hidden_docs(n_docs=40, seed=5)
    write_sentences(workdir / "other", more, more_emb, tag="o")
    base = train_planner(resolve(PlannerTrainConfig, environ=tiny_env(PLANNER_INPUT="emb", STEPS=10, LOG_EVERY=10)))
    info = train_planner(
        resolve(
            PlannerTrainConfig,
            environ=tiny_env(PLANNER_INPUT="emb", STEPS=10, LOG_EVERY=10, EXTRA_DATA="other", OUT_DIR="out/more"),
        )
    )
    assert info["extra_rows"] == 40 * 8 and info["train_rows"] == base["train_rows"] + 40 * 8
    # documents this run already has (a training one, a validation one) are left out, the others join
    mixed = workdir / "mixed"
    write_sentences(
        mixed, more + [docs[0], docs[15]], np.concatenate([more_emb, emb[:8], emb[15 * 8 : 16 * 8]]), tag="o"
    )
    with open(mixed / "sentences.jsonl") as fh:
        lines = fh.read().splitlines()
    lines[-16:] = [
        json.dumps({"doc": 40 + j // 8, "pos": j % 8, "text": f"s doc {d} sentence {j % 8}"})
        for j, d in zip(range(16), [0] * 8 + [15] * 8)
    ]
    (mixed / "sentences.jsonl").write_text("\n".join(lines) + "\n")
    write_json(
        mixed / "emb_meta.json",
        make_meta(
            "embeddings",
            {},
            outputs={"embeddings": mixed / "embeddings.npy"},
            counts={"rows": 40 * 8 + 16},
            model="tiny-encoder",
            dim=8,
        ),
    )
    info = train_planner(
        resolve(
            PlannerTrainConfig,
            environ=tiny_env(PLANNER_INPUT="emb", STEPS=10, LOG_EVERY=10, EXTRA_DATA="mixed", OUT_DIR="out/mixed"),
        )
    )
    assert info["extra_rows"] == 40 * 8
    with pytest.raises(ConfigError, match="EXTRA_DATA: nowhere is not a folder"):
        train_planner(resolve(PlannerTrainConfig, environ=tiny_env(EXTRA_DATA="nowhere")))
    write_sentences(workdir / "alien", more, more_emb, model="another-encoder")
    with pytest.raises(ConfigError, match="embedded with the encoder another-encoder, this run with tiny-encoder"):
        train_planner(resolve(PlannerTrainConfig, environ=tiny_env(EXTRA_DATA="alien")))
