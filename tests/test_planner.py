"""The planner: causality, save/load, learning a pattern the baselines cannot, CLI end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script

from next_speed.core.artifacts import make_meta, write_json, write_jsonl
from next_speed.core.config import resolve
from next_speed.core.errors import ConfigError, NextSpeedError, StaleInputError
from next_speed.evals.planner_eval import PlannerEvalConfig, eval_planner
from next_speed.models.planner import Planner, PlannerModelConfig, PlannerRunner, load_planner, mean_detail
from next_speed.training.train_planner import PlannerTrainConfig, train_planner


def synthetic_docs(n_docs=60, doc_len=8, V=5, seed=0):
    """next = ((a + b) % V, a): level 0 depends on both previous levels, so no per-level table predicts it."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        t = [int(rng.integers(V)), int(rng.integers(V))]
        seq = [t]
        for _ in range(doc_len - 1):
            a, b = seq[-1]
            seq.append([(a + b) % V, a])
        docs.append(seq)
    return docs


def hidden_docs(n_docs=80, doc_len=8, V=5, D=8, seed=0):
    """A sequence only the embeddings can predict. Each sentence has a hidden h in [0, V) that its
    embedding shows (one-hot + noise) and its codes do not; the next sentence's level-0 code is
    (h_t + h_t-1) % V, level 1 is noise. Copy, bigram and retrieval (the follower of the nearest
    sentence by embedding: it sees h_t, not h_t-1) sit near chance."""
    rng = np.random.default_rng(seed)
    docs, embs = [], []
    for _ in range(n_docs):
        h = rng.integers(V, size=doc_len)
        seq = [[int(rng.integers(V)), int(rng.integers(V))]]
        for t in range(1, doc_len):
            prev2 = h[t - 2] if t >= 2 else 0
            seq.append([int((h[t - 1] + prev2) % V), int(rng.integers(V))])
        e = np.eye(D)[h] + 0.1 * rng.normal(size=(doc_len, D))
        docs.append(seq)
        embs.append(e / np.linalg.norm(e, axis=1, keepdims=True))
    return docs, np.concatenate(embs).astype("float32")


def write_sentences(folder: Path, docs, emb, model="tiny-encoder", tag="s"):
    """A step 01-02 output folder: sentences.jsonl, embeddings.npy, emb_meta.json."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(
        folder / "sentences.jsonl",
        [
            {"doc": d, "pos": i, "text": f"{tag} doc {d} sentence {i}"}
            for d, seq in enumerate(docs)
            for i in range(len(seq))
        ],
    )
    np.save(folder / "embeddings.npy", emb)
    write_json(
        folder / "emb_meta.json",
        make_meta(
            "embeddings",
            {},
            outputs={"embeddings": folder / "embeddings.npy"},
            counts={"rows": len(emb)},
            model=model,
            dim=int(emb.shape[1]),
        ),
    )


def write_trainsets(root: Path, docs, K=2, V=5, context=3, val_docs=10, emb=None, D=8):
    """Planner rows as step 04 writes them, with the sentence file, embeddings (random unless
    given) and RVQ codebooks (random) they refer to."""
    from next_speed.quant.rvq import RVQ

    n = sum(len(seq) for seq in docs)
    emb = np.random.default_rng(1).normal(size=(n, D)).astype("float32") if emb is None else emb
    write_sentences(root / "data", docs, emb)
    RVQ(codebooks=np.random.default_rng(2).normal(size=(K, V, emb.shape[1])).astype("float32")).save(
        root / "out/rvq.npz"
    )
    write_json(
        root / "out/rvq_meta.json", make_meta("rvq", {"beam": 1}, outputs={"rvq": root / "out/rvq.npz"}, K=K, V=V)
    )
    rows = {"train": [], "val": []}
    sid = 0
    for d, seq in enumerate(docs):
        side = "val" if d < val_docs else "train"
        for i, tgt in enumerate(seq):
            rows[side].append({"doc": d, "pos": i, "sid": sid, "context": seq[max(0, i - context) : i], "target": tgt})
            sid += 1
    paths = {n: root / f"data/sent_lm_{n}.jsonl" for n in ("train", "val")}
    for n, p in paths.items():
        write_jsonl(p, rows[n])
    meta = make_meta(
        "trainsets",
        {"context_sents": context, "sent_path": "data/sentences.jsonl", "rvq_meta": "out/rvq_meta.json"},
        outputs={"lm_train": paths["train"], "lm_val": paths["val"]},
        K=K,
        V=V,
        rvq_path="out/rvq.npz",
        emb_path="data/embeddings.npy",
    )
    write_json(root / "data/train_meta.json", meta)
    return paths


def tiny_env(**kw):
    env = {
        "D_MODEL": "32",
        "N_HEADS": "2",
        "N_LAYERS": "2",
        "DROP": "0",
        "STEPS": "300",
        "LOG_EVERY": "100",
        "CODEBOOK_FEATURES": "0",
        "BS": "32",
        "LR": "3e-3",
        "WARMUP": "10",
        "DEVICE": "cpu",
        "PLANNER_INPUT": "codes",
    }
    env.update({k: str(v) for k, v in kw.items()})
    return env


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


def test_bad_inputs(workdir):
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


# ---------------------------------------------------------------------- embedding input (PLANNER_INPUT=emb)


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
            codes, lambda k, l: torch.full(l.shape[:1], c0) if k == 0 else l.argmax(-1), emb
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
