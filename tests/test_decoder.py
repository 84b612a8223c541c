"""The decoder with tiny random-init Llama-style and T5-style models built in the test."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TOPICS, run_script

from next_speed.core.artifacts import make_meta, write_json, write_jsonl
from next_speed.core.config import resolve
from next_speed.core.errors import ConfigError, NextSpeedError, StaleInputError
from next_speed.models.decoder_model import (
    Conditioning,
    add_code_tokens_to_tokenizer,
    code_token,
    encode_example,
    init_code_embeddings,
    load_decoder,
)
from next_speed.models.tiny import build_tiny_causal_lm, build_tiny_seq2seq
from next_speed.training.train_decoder import (
    DecoderEvalConfig,
    DecoderTrainConfig,
    eval_decoder,
    format_decoder_eval,
    train_decoder,
)

SENTS = [s for v in TOPICS.values() for s in v]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("llm") / "tiny-llama", SENTS * 3)


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    return build_tiny_seq2seq(tmp_path_factory.mktemp("t5") / "tiny-t5", SENTS * 3)


def write_decoder_sets(root: Path, K=2, V=4, n_docs=12):
    names = sorted(TOPICS)
    rows = {"train": [], "val": []}
    for d in range(n_docs):
        topic = names[d % 4]
        sents = TOPICS[topic]
        for i, s in enumerate(sents):
            codes = [d % 4, i % V][:K] + [0] * max(0, K - 2)
            rows["val" if d < 2 else "train"].append(
                {"doc": d, "pos": i, "context": " ".join(sents[max(0, i - 2) : i]), "codes": codes, "target": s}
            )
    paths = {n: root / f"data/decoder_{n}.jsonl" for n in rows}
    for n, p in paths.items():
        write_jsonl(p, rows[n])
    write_json(
        root / "data/train_meta.json",
        make_meta(
            "trainsets",
            {"context_sents": 2},
            outputs={"dec_train": paths["train"], "dec_val": paths["val"]},
            K=K,
            V=V,
            rvq_path="out/rvq.npz",
        ),
    )
    return rows


def env(model, **kw):
    e = {
        "MODEL": model,
        "MAX_STEPS": "6",
        "EVAL_EVERY": "3",
        "TRAIN_BS": "4",
        "LR": "1e-3",
        "WARMUP": "1",
        "DEVICE": "cpu",
        "TRAIN_LAYERS": "all",
        "VAL_ROWS": "8",
    }
    e.update({k: str(v) for k, v in kw.items()})
    return e


def test_code_tokens_round_trip(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cond = Conditioning(K=3, V=16)
    n = len(tok)
    assert add_code_tokens_to_tokenizer(tok, cond) == 48 and len(tok) == n + 48
    s = f"{code_token(0, 1, 16)} {code_token(2, 15, 16)}"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert [i for i in ids if i >= n] == tok.convert_tokens_to_ids(["<c0_0001>", "<c2_0015>"])
    assert tok.decode(ids).replace(" ", "") == s.replace(" ", "")


def test_code_embedding_init_is_in_distribution(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cond = Conditioning(K=2, V=4)
    n = len(tok)
    add_code_tokens_to_tokenizer(tok, cond)
    init_code_embeddings(
        model,
        tok,
        cond,
        n,
        {(0, 1): ["Cats sleep for most of the day."], (1, 2): ["A river is a natural stream of water."]},
    )
    emb = model.get_input_embeddings().weight.detach()
    mean = emb[:n].mean(0)
    spread = (emb[:n] - mean).norm(dim=1).mean()
    new = emb[n:]
    # every new row sits at a real token's typical distance from the centre of the embeddings
    assert torch.allclose((new - mean).norm(dim=1), spread.expand(len(new)), rtol=1e-3)
    # codes carrying different sentences point in different directions
    cos = torch.nn.functional.cosine_similarity(new[1] - mean, new[4 + 2] - mean, dim=0)
    assert cos < 0.5


@pytest.mark.parametrize("mode", ["special", "text", "none"])
def test_loss_mask_covers_exactly_the_target(tiny_llama, mode):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cond = Conditioning(K=2, V=4, code_mode=mode, max_in=64, max_out=32)
    add_code_tokens_to_tokenizer(tok, cond)
    ex = encode_example(tok, cond, "Rivers flow toward an ocean.", [1, 3], "Cats sleep for most of the day.")
    labels = [t for t in ex["labels"] if t != -100]
    assert labels == tok("Cats sleep for most of the day.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_prompt = ex["labels"].index(labels[0])
    assert all(t == -100 for t in ex["labels"][:n_prompt]) and ex["input_ids"][n_prompt:] == labels
    prompt = tok.decode(ex["input_ids"][:n_prompt])
    assert ("<c1_0003>" in prompt) == (mode == "special") and ("c1=3" in prompt) == (mode == "text")


def test_context_cut_from_the_left_and_max_in(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cond = Conditioning(K=2, V=4, max_in=20, max_out=8)
    add_code_tokens_to_tokenizer(tok, cond)
    long_ctx = " ".join(SENTS)
    ex = encode_example(tok, cond, long_ctx, [0, 1], "A river is a natural stream of water.")
    prompt = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l == -100]
    assert len(prompt) <= 20
    assert tok.decode(prompt).strip().endswith("<c0_0000> <c1_0001>") or "<c1_0001>" in tok.decode(prompt)
    assert SENTS[-1][-10:] in tok.decode(prompt)  # the most recent context survives
    assert len([l for l in ex["labels"] if l != -100]) == 8  # target cut to MAX_OUT
    with pytest.raises(ConfigError, match="MAX_IN=8 is too small"):
        encode_example(tok, Conditioning(K=2, V=4, max_in=8), "", [0, 1], "x")


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


def test_bad_inputs(workdir, tiny_llama):
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


# ---------------------------------------------------------------------- the plan reaches the decoder


def write_rvq(root: Path, K=2, V=4, D=16, seed=0):
    """A small random RVQ at out/rvq.npz, recorded in the training sets' metadata."""
    import numpy as np

    from next_speed.core.artifacts import sha256_path
    from next_speed.quant.rvq import RVQ

    rvq = RVQ(codebooks=np.random.default_rng(seed).normal(size=(K, V, D)).astype("float32"))
    rvq.save(root / "out/rvq.npz")
    meta_path = root / "data/train_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["rvq_path"], meta["rvq_sha256"] = "out/rvq.npz", sha256_path(root / "out/rvq.npz")
    write_json(meta_path, meta)
    return rvq


def write_code_function_sets(root: Path, n_train=96, n_val=24, seed=0):
    """Synthetic rows where the target is a function of the codes alone: code 0 picks a topic, code 1
    one of its sentences, and the context is the same filler for every row."""
    import random as _r

    names = sorted(TOPICS)
    rng = _r.Random(seed)
    rows = {"train": [], "val": []}
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            c0, c1 = rng.randrange(4), rng.randrange(4)
            rows[split].append(
                {
                    "doc": i if split == "train" else 10_000 + i,
                    "pos": 1,
                    "context": "Here is a sentence.",
                    "codes": [c0, c1],
                    "target": TOPICS[names[c0]][c1],
                }
            )
    paths = {n: root / f"data/decoder_{n}.jsonl" for n in rows}
    for n, p in paths.items():
        write_jsonl(p, rows[n])
    write_json(
        root / "data/train_meta.json",
        make_meta(
            "trainsets",
            {"context_sents": 1},
            outputs={"dec_train": paths["train"], "dec_val": paths["val"]},
            K=2,
            V=4,
            rvq_path="out/rvq.npz",
        ),
    )
    write_rvq(root)
    return rows


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

    from next_speed.models.decoder_model import add_code_tokens_to_tokenizer, collate, token_losses
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


def test_inject_parameters_receive_gradient(workdir, tiny_llama):
    """On CODE_MODE=inject's path, the adapter (the plan's only way in) gets gradient; frozen blocks do not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from next_speed.models.decoder_model import PlanInjector, attach_injector, build_plan_adapter, collate, token_losses
    from next_speed.training.train_decoder import select_trainable

    rvq_books = torch.randn(2, 4, 16)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cond = Conditioning(K=2, V=4, code_mode="inject", max_in=32, max_out=16)
    select_trainable(model, "1", len(tok), False)
    adapter = build_plan_adapter(rvq_books, model.config.hidden_size, 16, 1.0)
    torch.nn.init.normal_(adapter.out.weight, std=0.1)  # off zero, so the first layer gets gradient too
    attach_injector(model, PlanInjector(model, adapter, 1))
    batch = collate(
        [
            encode_example(tok, cond, "Rivers flow.", [1, 2], "Cats sleep."),
            encode_example(tok, cond, "Stars shine.", [3, 0], "A river is long."),
        ],
        tok.pad_token_id,
        "causal",
    )
    s, n = token_losses(model, batch, "causal")
    (s.sum() / n.sum()).backward()
    assert adapter.inp.weight.grad is not None and adapter.inp.weight.grad.abs().sum() > 0
    assert adapter.out.weight.grad.abs().sum() > 0
    assert model.model.layers[1].mlp.up_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.up_proj.weight.grad is None


def test_untrained_adapter_changes_nothing(tiny_llama):
    """A zero-initialized adapter leaves the decoder exactly the no-codes decoder (so codes can only help)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from next_speed.models.decoder_model import PlanInjector, attach_injector, build_plan_adapter, collate, token_losses

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cond = Conditioning(K=2, V=4, code_mode="inject", max_in=32, max_out=16)
    batch = collate([encode_example(tok, cond, "Rivers flow.", [1, 2], "Cats sleep.")], tok.pad_token_id, "causal")
    before, _ = token_losses(model, batch, "causal")
    attach_injector(
        model, PlanInjector(model, build_plan_adapter(torch.randn(2, 4, 16), model.config.hidden_size, 16, 5.0), 0)
    )
    after, _ = token_losses(model, batch, "causal")
    assert torch.equal(before, after)


def test_label_only_lm_head_matches_full_logits(tiny_llama):
    """The step's cheaper loss (LM head only where a label is scored) equals the loss over full logits."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from next_speed.models.decoder_model import collate, token_losses

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cond = Conditioning(K=2, V=4, code_mode="none", max_in=32, max_out=16)
    batch = collate(
        [
            encode_example(tok, cond, "Rivers flow toward an ocean.", [1, 2], "Cats sleep."),
            encode_example(tok, cond, "", [3, 0], "A river is a natural stream of water."),
        ],
        tok.pad_token_id,
        "causal",
    )
    s, n = token_losses(model, batch, "causal")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    ref = F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100, reduction="none").sum(1)
    assert torch.allclose(s, ref, atol=1e-5) and n.tolist() == (batch["labels"][:, 1:] != -100).sum(1).tolist()


def test_exemplar_bank_lookup_and_exclusions():
    import numpy as np

    from next_speed.models.decoder_model import ExemplarBank

    books = np.zeros((2, 2, 4), dtype="float32")
    books[0, 0, 0] = books[0, 1, 1] = 1.0  # level 0: axis 0 or axis 1
    books[1, 1, 2] = 0.5  # level 1: nothing, or a bit of axis 2
    emb = np.eye(4, dtype="float32")[[0, 0, 1, 2]]
    emb[1] += [0, 0, 0.3, 0]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    codes = [[0, 0], [0, 1], [1, 0], [0, 1]]
    bank = ExemplarBank(texts=["a0", "a0 too", "b", "e"], docs=[1, 2, 3, 4], emb=emb, codebooks=books, codes=codes)
    assert bank.lookup([[0, 0]], 2) == [["a0", "a0 too"]]
    # the longest matched code prefix first, then cosine: "e" (prefix 2, cosine 0.45) before "a0" (prefix 1, 0.89)
    assert bank.lookup([[0, 1]], 3) == [["a0 too", "e", "a0"]]
    assert bank.lookup([[0, 1]], 2, exclude_docs=[2]) == [["e", "a0"]]
    assert bank.lookup([[0, 1]], 2, exclude_texts=[{"e"}]) == [["a0 too", "a0"]]
    assert bank.lookup([[1, 0], [0, 0]], 1) == [["b"], ["a0"]]
    # generation's guard: exemplars within REPEAT_COS of text already written ("a0" 1.0 and
    # "a0 too" 0.96 from axis 0) come last, used only when nothing else is left; None avoids nothing
    axis0 = np.eye(4, dtype="float32")[[0]]
    assert bank.lookup([[0, 0]], 2, avoid=[axis0], avoid_cos=0.9) == [["e", "b"]]
    assert bank.lookup([[0, 0]], 2, avoid=[axis0], avoid_cos=0.99) == [["a0 too", "e"]]
    assert bank.lookup([[0, 0], [0, 0]], 1, avoid=[None, axis0], avoid_cos=0.9) == [["a0"], ["e"]]
    assert bank.lookup([[0, 0]], 4, avoid=[axis0], avoid_cos=0.9) == [["e", "b", "a0", "a0 too"]]
    # by a vector (the oracle bound of decoder_eval): cosine alone, same exclusions
    assert bank.nearest(np.eye(4, dtype="float32")[[2]], 2) == [["e", "a0 too"]]
    assert bank.nearest(np.eye(4, dtype="float32")[[0, 2]], 1, exclude_docs=[1, 4]) == [["a0 too"], ["a0 too"]]
    assert bank.nearest(np.eye(4, dtype="float32")[[0]], 1, exclude_texts=[{"a0"}]) == [["a0 too"]]


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


def test_exemplars_enter_the_prompt_whole(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cond = Conditioning(K=2, V=4, code_mode="inject", max_in=40, max_out=16, exemplars=2)
    ex = encode_example(tok, cond, " ".join(SENTS), [1, 2], "Cats sleep.", ["Stars shine.", "Rivers flow."])
    prompt = tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l == -100])
    assert prompt.rstrip().endswith("Stars shine. Rivers flow.") and len([l for l in ex["labels"] if l == -100]) <= 40
    assert SENTS[-1][-8:] in prompt  # the latest context stays, cut from the left
    plain = encode_example(
        tok,
        Conditioning(K=2, V=4, code_mode="inject", max_in=40, max_out=16),
        "Rivers flow.",
        [1, 2],
        "Cats sleep.",
        ["Stars shine."],
    )
    assert "Stars" not in tok.decode(plain["input_ids"])  # a decoder trained without exemplars ignores them


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
