"""The models: the planner (causality, pointer, heads, save/load, the runner) and the decoder
(code tokens, prompt format, loss mask, plan adapter, exemplar bank), with tiny random-init models."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tinydata import (
    SENTS,
    hidden_docs,
    synthetic_docs,
    tiny_env,
    write_trainsets,
)

from next_speed.core.config import resolve
from next_speed.core.errors import ConfigError, NextSpeedError, StaleInputError
from next_speed.evals.planner_eval import PlannerEvalConfig, eval_planner
from next_speed.models.decoder_model import (
    Conditioning,
    add_code_tokens_to_tokenizer,
    code_token,
    encode_example,
    init_code_embeddings,
)
from next_speed.models.planner import Planner, PlannerModelConfig, PlannerRunner, load_planner, mean_detail
from next_speed.training.train_planner import PlannerTrainConfig, train_planner


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
    prompt = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == -100]
    assert len(prompt) <= 20
    assert tok.decode(prompt).strip().endswith("<c0_0000> <c1_0001>") or "<c1_0001>" in tok.decode(prompt)
    assert SENTS[-1][-10:] in tok.decode(prompt)  # the most recent context survives
    assert len([lab for lab in ex["labels"] if lab != -100]) == 8  # target cut to MAX_OUT
    with pytest.raises(ConfigError, match="MAX_IN=8 is too small"):
        encode_example(tok, Conditioning(K=2, V=4, max_in=8), "", [0, 1], "x")


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


def test_exemplars_enter_the_prompt_whole(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cond = Conditioning(K=2, V=4, code_mode="inject", max_in=40, max_out=16, exemplars=2)
    ex = encode_example(tok, cond, " ".join(SENTS), [1, 2], "Cats sleep.", ["Stars shine.", "Rivers flow."])
    prompt = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == -100])
    assert (
        prompt.rstrip().endswith("Stars shine. Rivers flow.")
        and len([lab for lab in ex["labels"] if lab == -100]) <= 40
    )
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


@pytest.mark.parametrize(
    "extras",
    [
        {},
        {"codebook_dim": 5, "copy_gate": True},
        {"pointer": True},
        {"codebook_dim": 5, "copy_gate": True, "pointer": True, "head_mode": "chained"},
    ],
)
def test_planner_is_causal(extras):
    torch.manual_seed(0)
    m = Planner(
        PlannerModelConfig(K=3, V=7, d_model=32, n_heads=4, n_layers=2, dropout=0.0, max_len=8, **extras)
    ).eval()
    if extras.get("codebook_dim"):
        m.set_codebooks(torch.randn(3, 7, 5))
    x = torch.randint(0, 7, (2, 6, 3))
    x[1, 0] = 7  # a document start (BOS): nothing to point at there
    y = x.clone()
    y[:, 4:] = torch.randint(0, 7, (2, 2, 3))
    a, b = m(x), m(y)
    assert a.shape == (2, 6, 3, 7)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    assert torch.isfinite(a).all()
    if extras.get("pointer"):  # a mixture of distributions: normalized log-probabilities
        assert torch.allclose(a.logsumexp(-1), torch.zeros(()), atol=1e-5)
        # one position per row, as evaluation (each row's last index) and generation ask, equals the sequence's
        at, rows = torch.tensor([2, 5]), torch.arange(2)
        chained = extras.get("head_mode") == "chained"
        nxt = x.roll(-1, 1).clamp(max=6)  # teacher-forced lower levels for the chained heads
        full = m(x, nxt) if chained else a
        assert torch.allclose(
            m.outputs_at(m.hidden(x), x, at, nxt[rows, at] if chained else None), full[rows, at], atol=1e-5
        )
        # nothing to point at (row 1 starts with BOS): the generated distribution alone
        m.cfg.pointer = False
        plain = torch.log_softmax(m(x).float(), -1)
        m.cfg.pointer = True
        assert torch.allclose(a[1, 0], plain[1, 0], atol=1e-5)
        assert not torch.allclose(a[1, 1], plain[1, 1], atol=1e-3)
        # a gate wide open: row 1's position 1 can point only at its first sentence, never at BOS
        with torch.no_grad():
            m.ptr_gate.bias.fill_(30.0)
        b1 = m(x)[1, 1].exp()  # (K, V)
        assert torch.allclose(b1[torch.arange(3), x[1, 1]], torch.ones(3), atol=1e-4)


def test_pointer_points_at_earlier_sentences(workdir):
    """Documents alternate two random tuples (A B A B ...): the next tuple is the one two sentences
    back. Copy, bigram and frequency cannot know it (the tuples are new in every document); a
    pointer over the context's codes learns where to look."""
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(120):
        a, b = rng.integers(20, size=2).tolist(), rng.integers(20, size=2).tolist()
        docs.append([a, b] * 4)
    write_trainsets(workdir, docs, V=20, val_docs=20)
    info = train_planner(resolve(PlannerTrainConfig, environ=tiny_env(POINTER=1, STEPS=200)))
    assert info["model"]["pointer"] is True
    # the same budget without the pointer: the transformer alone does not find the pattern
    train_planner(resolve(PlannerTrainConfig, environ=tiny_env(POINTER=0, STEPS=200, OUT_DIR="out/no_pointer")))
    no_ptr = eval_planner(
        resolve(PlannerEvalConfig, environ={"DEVICE": "cpu", "OUT_DIR": "out/no_pointer", "OUT_JSON": "out/e0.json"})
    )["results"]["planner"]["acc"][0]
    rep = eval_planner(resolve(PlannerEvalConfig, environ={"DEVICE": "cpu"}))
    res, where = rep["results"], rep["level0_in_context"]
    best = max(res[b]["acc"][0] for b in ("most frequent", "copy previous", "bigram"))
    # the first two sentences of a document cannot be known: at most 6 of 8 rows per document
    assert res["planner"]["acc"][0] > 0.9 * 6 / 8 and best < 0.25, (res["planner"]["acc"], best)
    assert no_ptr < res["planner"]["acc"][0] - 0.15, no_ptr
    # the eval says where the next code was: in the context from the third sentence on (or by chance)
    assert 0.75 <= where["share"] < 0.85 and where["planner_acc_in"] > 0.9, where
    assert (
        abs(
            where["share"] * where["planner_acc_in"]
            + (1 - where["share"]) * where["planner_acc_out"]
            - res["planner"]["acc"][0]
        )
        < 1e-9
    )


def test_chained_heads_see_lower_levels_only():
    torch.manual_seed(0)
    m = Planner(
        PlannerModelConfig(K=3, V=7, d_model=32, n_heads=4, n_layers=1, dropout=0.0, head_mode="chained")
    ).eval()
    x = torch.randint(0, 7, (1, 4, 3))
    t1 = torch.randint(0, 7, (1, 4, 3))
    t2 = t1.clone()
    t2[..., 1] = (t2[..., 1] + 1) % 7  # change level 1 of the target
    a, b = m(x, t1), m(x, t2)
    assert torch.allclose(a[..., :2, :], b[..., :2, :])  # levels 0 and 1 do not see level 1
    assert not torch.allclose(a[..., 2, :], b[..., 2, :])  # level 2 does


@pytest.mark.parametrize("pointer", [0, 1])
def test_save_load_identical_and_seeded(workdir, pointer):
    write_trainsets(workdir, synthetic_docs(n_docs=20))
    train_planner(resolve(PlannerTrainConfig, environ=tiny_env(STEPS=20, LOG_EVERY=10, POINTER=pointer)))
    m1, info = load_planner("out/sentence_lm")
    m2, _ = load_planner("out/sentence_lm")
    x = torch.randint(0, 5, (3, 4, 2))
    assert torch.equal(m1(x), m2(x))
    sd = torch.load("out/sentence_lm/sentence_lm.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    runner = PlannerRunner(m1, info["context_sents"])
    ctx = [[1, 2], [3, 4]]
    draws = [runner.next_tuple(ctx, temperature=1.5, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    probs = runner.distributions(ctx)
    assert probs.shape == (2, 5) and torch.allclose(probs.sum(-1), torch.ones(2))
    assert runner.next_tuple(ctx, greedy=True) == probs.argmax(-1).tolist()
    # same seed, same training -> same weights
    info2 = train_planner(
        resolve(PlannerTrainConfig, environ=tiny_env(STEPS=20, LOG_EVERY=10, OUT_DIR="out/again", POINTER=pointer))
    )
    sd2 = torch.load("out/again/sentence_lm.pt", weights_only=True)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert info2["best"] == info["best"]


def test_embedding_input_is_causal():
    torch.manual_seed(0)
    m = Planner(
        PlannerModelConfig(
            K=3, V=7, d_model=32, n_heads=4, n_layers=2, dropout=0.0, max_len=8, emb_dim=6, copy_gate=True
        )
    ).eval()
    x = torch.randint(0, 7, (2, 6, 3))
    e = torch.randn(2, 6, 6)
    e2 = e.clone()
    e2[:, 4:] = torch.randn(2, 2, 6)  # later sentences' embeddings change, their codes do not
    a, b = m(x, emb=e), m(x, emb=e2)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    with pytest.raises(ValueError, match="embeddings"):
        m(x)  # a planner that reads embeddings refuses to run without them


def test_embedding_planner_save_load_and_runner(workdir):
    docs, emb = hidden_docs(n_docs=20)
    write_trainsets(workdir, docs, emb=emb)
    train_planner(resolve(PlannerTrainConfig, environ=tiny_env(PLANNER_INPUT="emb", STEPS=20, LOG_EVERY=10)))
    m1, info = load_planner("out/sentence_lm")
    m2, _ = load_planner("out/sentence_lm")
    x, e = torch.randint(0, 5, (3, 4, 2)), torch.randn(3, 4, 8)
    assert torch.equal(m1(x, emb=e), m2(x, emb=e))
    runner = PlannerRunner(m1, info["context_sents"])
    ctx, vecs = [[1, 2], [3, 4]], np.random.default_rng(0).normal(size=(2, 8)).astype("float32")
    assert (
        runner.next_tuple(ctx, greedy=True, embeddings=vecs)
        == runner.distributions(ctx, embeddings=vecs).argmax(-1).tolist()
    )
    with pytest.raises(NextSpeedError, match="PLANNER_INPUT=emb"):
        runner.next_tuple(ctx, greedy=True)
    # the vectors matter: other embeddings, other distribution
    assert not torch.allclose(runner.distributions(ctx, embeddings=vecs), runner.distributions(ctx, embeddings=-vecs))


def test_planner_with_unknown_settings_is_refused(workdir):
    write_trainsets(workdir, synthetic_docs(n_docs=12))
    train_planner(resolve(PlannerTrainConfig, environ=tiny_env(STEPS=2, LOG_EVERY=1)))
    cfg = json.loads(Path("out/sentence_lm/config.json").read_text())
    cfg["model"]["from_the_future"] = 1
    Path("out/sentence_lm/config.json").write_text(json.dumps(cfg))
    with pytest.raises(StaleInputError, match=r"does not know \(from_the_future\): rerun step 05"):
        load_planner("out/sentence_lm")


def test_mean_detail_renders_the_expected_sentence():
    """PLAN_DEEP=mean: level 0 (and pinned levels) kept, deeper levels = greedy RVQ of the unit mean."""
    K, V = 3, 4
    books = torch.zeros(K, V, K * V)
    for k in range(K):
        books[k, :, k * V : (k + 1) * V] = torch.eye(V) / 3**0.5  # disjoint subspaces: a tuple's vector has unit norm
    t = torch.tensor([[2, 1, 3]])
    sure = torch.nn.functional.one_hot(t, V).float()  # a planner certain of t renders t
    assert mean_detail(sure, torch.tensor([[2, 0, 0]]), books).tolist() == [[2, 1, 3]]
    # unsure of level 2 between codes 0 and 3 (0.6 / 0.4): the mean's nearest codeword there is 0
    p = sure.clone()
    p[0, 2] = torch.tensor([0.6, 0.0, 0.0, 0.4])
    assert mean_detail(p, torch.tensor([[2, 0, 0]]), books).tolist() == [[2, 1, 0]]
    # a greedy level 0 enters the mean with its probabilities, a pinned one with its codeword
    g = torch.Generator().manual_seed(0)
    rb, rp = torch.randn(K, V, 6, generator=g), torch.softmax(3 * torch.randn(50, K, V, generator=g), -1)
    c0 = torch.zeros(50, K, dtype=torch.long)
    assert not torch.equal(mean_detail(rp, c0, rb), mean_detail(rp, c0, rb, pinned=1))
    assert (mean_detail(rp, c0, rb)[:, 0] == 0).all()
    # level 0 is kept as chosen even where the planner put little mass; pinned levels too
    assert mean_detail(sure, torch.tensor([[0, 0, 0]]), books)[0, 0] == 0
    assert mean_detail(sure, torch.tensor([[2, 2, 0]]), books, pinned=2)[0, :2].tolist() == [2, 2]
    assert mean_detail(sure, torch.tensor([[2, 2, 0]]), books, pinned=2)[0, 2] == 3


@pytest.mark.parametrize("head_mode", ["independent", "chained"])
def test_runner_plan_deep(workdir, head_mode):
    """PLAN_DEEP=mean through the runner, with independent heads and with chained ones (whose mean
    is built from the probabilities along the path chosen so far: the greedy path here)."""
    write_trainsets(workdir, synthetic_docs(n_docs=20))
    train_planner(resolve(PlannerTrainConfig, environ=tiny_env(STEPS=20, LOG_EVERY=10, HEAD_MODE=head_mode)))
    model, info = load_planner("out/sentence_lm")
    K, V = model.cfg.K, model.cfg.V
    books = torch.randn(K, V, 6)
    runner = PlannerRunner(model, info["context_sents"], codebooks=books)
    ctx = [[1, 2], [3, 4]]
    greedy = runner.next_tuple(ctx, greedy=True, deep="levels")
    mean = runner.next_tuple(ctx, greedy=True, deep="mean")
    assert mean[0] == greedy[0]
    assert mean == mean_detail(runner.distributions(ctx)[None], torch.tensor([greedy]), books)[0].tolist()

    def path_probs(c0: int):
        """(1, K, V): the planner's probabilities with level 0 set to c0 (chained heads condition on it)."""
        codes, emb = runner._inputs(ctx, True, None)
        _, lg = model.next_logits_levelwise(
            codes, lambda k, lab: torch.full(lab.shape[:1], c0) if k == 0 else lab.argmax(-1), emb
        )
        return torch.softmax(lg.float(), -1)

    pinned = runner.next_tuple(ctx, greedy=True, deep="mean", fixed=[4])  # K=2: level 0 pinned, level 1 from the mean
    assert pinned[0] == 4 and pinned == mean_detail(path_probs(4), torch.tensor([[4, 0]]), books, pinned=1)[0].tolist()
    # a sampled level 0 is a decision: the mean is built on its codeword, as a pinned one
    for seed in range(5):
        drawn = runner.next_tuple(ctx, temperature=2.0, deep="mean", generator=torch.Generator().manual_seed(seed))
        assert drawn == mean_detail(path_probs(drawn[0]), torch.tensor([[drawn[0], 0]]), books, pinned=1)[0].tolist()
    with pytest.raises(ConfigError, match="PLAN_DEEP"):
        runner.next_tuple(ctx, greedy=True, deep="median")
    assert not model.cfg.codebook_dim  # tiny_env: CODEBOOK_FEATURES=0, so the planner holds no codebooks of its own
    with pytest.raises(NextSpeedError, match="PLAN_DEEP=levels"):
        PlannerRunner(model, info["context_sents"]).next_tuple(ctx, greedy=True, deep="mean")
    # numpy codebooks are accepted as well as tensors
    assert (
        PlannerRunner(model, info["context_sents"], codebooks=books.numpy()).next_tuple(ctx, greedy=True, deep="mean")
        == mean
    )
