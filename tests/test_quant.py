"""Residual vector quantization: round trip, levels, the spherical fit, beam encoding, save/load."""

from pathlib import Path

import numpy as np
import pytest

from next_speed.core.config import resolve
from next_speed.core.errors import ConfigError
from next_speed.data.embed import EmbedConfig, embed_sentences
from next_speed.data.sentences import SentencesConfig, make_sentences
from next_speed.quant.rvq import RVQ, RVQConfig, fit_rvq


def test_rvq_roundtrip_and_levels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16)).astype(np.float32)
    rvq = RVQ.fit(x, K=3, V=16, niter=10)
    codes = rvq.encode(x)
    assert codes.shape == (500, 3) and codes.min() >= 0 and codes.max() < 16
    # decode is exactly the sum of the chosen codewords, and re-encoding reproduces the codes
    manual = sum(rvq.codebooks[k][codes[:, k]] for k in range(3))
    assert np.array_equal(rvq.decode(codes), manual)
    errs = [((x - rvq.decode(codes, levels=k + 1)) ** 2).sum() for k in range(3)]
    assert errs[0] > errs[1] > errs[2]
    # beam search never ends with a larger total error than greedy
    beam = rvq.encode(x, beam=4)
    assert ((x - rvq.decode(beam)) ** 2).sum() <= errs[2] + 1e-3
    # the greedy path agrees with a plain numpy nearest-codeword search
    resid = x.copy()
    for k in range(3):
        d = ((resid[:, None, :] - rvq.codebooks[k][None]) ** 2).sum(-1)
        assert np.array_equal(d.argmin(1), codes[:, k])
        resid -= rvq.codebooks[k][codes[:, k]]


def test_spherical_fit_keeps_every_level_alive():
    """Unit vectors in 64-d with a few clusters: after the first levels the residual is near-isotropic
    noise, where plain k-means parks most codewords on outliers and sends most points to one
    codeword near zero. The spherical fit keeps every level's code use broad (perplexity >= V/4),
    at no higher error, and the report warns about collapsed levels."""
    from next_speed.quant.rvq import collapsed_levels, format_report, level_stats

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 64))
    x = centres[rng.integers(0, 8, 4000)] + 0.8 * rng.normal(size=(4000, 64))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    fits = {m: RVQ.fit(x, K=5, V=32, niter=15, method=m) for m in ("spherical", "kmeans")}
    stats = {m: level_stats(x, r, r.encode(x)) for m, r in fits.items()}
    assert min(s["perplexity"] for s in stats["spherical"]) >= 32 / 4, stats["spherical"]
    assert stats["spherical"][-1]["rel_error"] <= stats["kmeans"][-1]["rel_error"] + 1e-3
    levels = [
        {"level": 0, "rel_error": 0.5, "cosine": 0.7, "used": 32, "perplexity": 30.0},
        {"level": 1, "rel_error": 0.4, "cosine": 0.8, "used": 32, "perplexity": 2.5},
    ]
    assert [r["level"] for r in collapsed_levels(levels, 32)] == [1]
    text = format_report(
        {"K": 2, "V": 32, "rows": 10, "beam": 1, "levels": levels, "shared_tuple_share": 0.0, "unique_tuples": 9}
    )
    assert "warning: level 1 has collapsed" in text and "warning: level 0" not in text
    with pytest.raises(ConfigError, match="RVQ_FIT"):
        RVQ.fit(x, K=1, V=4, method="lloyd")


def test_rvq_save_load(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    rvq = RVQ.fit(x, K=2, V=4, niter=3)
    rvq.save(tmp_path / "r.npz")
    again = RVQ.load(tmp_path / "r.npz")
    assert np.array_equal(again.encode(x), rvq.encode(x))


def test_v_larger_than_sentences(workdir, docs_file, tiny_encoder):
    make_sentences(resolve(SentencesConfig, environ={"DOCS_JSONL": str(docs_file), "NUM_PROC": "1"}))
    embed_sentences(resolve(EmbedConfig, environ={"EMB_MODEL": tiny_encoder, "DEVICE": "cpu"}))
    with pytest.raises(ConfigError, match="V=4096 is larger than the number of sentences"):
        fit_rvq(resolve(RVQConfig, environ={"K": "2", "V": "4096"}))
    assert not Path("out/rvq.npz").exists() and not Path("data/codes.npy").exists()


def test_beam_encoding_is_exhaustive_when_wide_enough():
    """With a beam as wide as every partial tuple (V^(K-1)) the search is exhaustive: it finds the
    tuple of least error among all V^K; greedy can only be worse or equal."""
    import itertools

    rng = np.random.default_rng(0)
    K, V, D = 3, 4, 5
    rvq = RVQ(codebooks=rng.normal(size=(K, V, D)).astype("float32"))
    x = rng.normal(size=(40, D)).astype("float32")
    tuples = np.asarray(list(itertools.product(range(V), repeat=K)))
    errs = ((x[:, None, :] - rvq.decode(tuples)[None]) ** 2).sum(-1)  # (N, V^K)
    best = errs.min(1)
    beam = rvq.encode(x, beam=V ** (K - 1))
    got = ((x - rvq.decode(beam)) ** 2).sum(-1)
    assert np.allclose(got, best, atol=1e-4)
    greedy = ((x - rvq.decode(rvq.encode(x))) ** 2).sum(-1)
    assert (greedy >= best - 1e-4).all() and (greedy > best + 1e-4).any()  # greedy misses some
