import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TOPICS = {
    "cats": [
        "Cats are small carnivorous mammals.",
        "They are often kept as house pets.",
        "Cats sleep for most of the day.",
        "A cat can see well in dim light.",
    ],
    "rivers": [
        "A river is a natural stream of water.",
        "Rivers flow toward an ocean or a lake.",
        "Many cities were built along rivers.",
        "Floods happen when rivers overflow their banks.",
    ],
    "music": [
        "Music is the art of arranging sounds.",
        "Melody and rhythm are basic elements of music.",
        "Orchestras play music with many instruments.",
        "Some songs are passed down for generations.",
    ],
    "stars": [
        "A star is a luminous ball of plasma.",
        "The Sun is the nearest star to Earth.",
        "Stars are born in clouds of gas and dust.",
        "Some stars end their lives as supernovae.",
    ],
}


def make_docs(n_docs: int = 24) -> list[dict]:
    docs = []
    names = sorted(TOPICS)
    for i in range(n_docs):
        topic = names[i % len(names)]
        sents = TOPICS[topic][i % 2 :] + TOPICS[names[(i + 1) % len(names)]][:2]
        docs.append({"id": f"d{i}", "title": f"{topic} {i}", "text": " ".join(sents)})
    return docs


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A folder holding the artifacts of `next-speed run --preset tiny` (steps 01-07)."""
    from next_speed.core.config import resolve
    from next_speed.pipeline import RunConfig, run_pipeline

    d = tmp_path_factory.mktemp("tinyrun")
    old = os.getcwd()
    os.chdir(d)
    try:
        lines = []
        env = {k: v for k, v in os.environ.items() if k not in ("LANG",)}
        run_pipeline(resolve(RunConfig, environ={"PRESET": "tiny"}), environ=env, echo=lines.append)
    finally:
        os.chdir(old)
    return d


# The generation settings of the tests on the tiny preset: REPEAT_COS off (the random-init stand-in
# encoder puts every sentence near every other) and one plan per step (tests of several plans ask).
TINY_GEN_ENV = {
    "EMB_MODEL": "cache/tiny/encoder",
    "DEVICE": "cpu",
    "MAX_NEW_TOKENS": "10",
    "N_CAND": "3",
    "REPEAT_COS": "1.01",
    "PLANS": "1",
    "UNPLANNED": "0",
}


def tiny_generator(run_dir: Path, **env: str):
    """A SentenceGenerator over the tiny run's artifacts, TINY_GEN_ENV with `env` on top."""
    from next_speed.core.config import resolve
    from next_speed.generation.generate import GenerateConfig, SentenceGenerator

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run_dir)
        return SentenceGenerator(resolve(GenerateConfig, environ={**TINY_GEN_ENV, **env}))


@pytest.fixture(scope="module")
def tiny_gen(tiny_run):
    """One generator per test module (loading takes seconds); tests change it through monkeypatch only."""
    return tiny_generator(tiny_run)


@pytest.fixture()
def in_run(tiny_run, monkeypatch):
    """Run in the tiny run's folder (its relative paths: out/, data/, cache/)."""
    monkeypatch.chdir(tiny_run)
    return tiny_run


@pytest.fixture()
def gen(in_run, tiny_gen):
    return tiny_gen


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    from next_speed.models.tiny import build_tiny_encoder

    return build_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny-encoder")


@pytest.fixture()
def docs_file(tmp_path) -> Path:
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps(d) + "\n" for d in make_docs()))
    return p


@pytest.fixture()
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in a fresh folder with none of the spec's variables set from outside."""
    monkeypatch.chdir(tmp_path)
    for var in (
        "SEED",
        "K",
        "V",
        "BS",
        "OUT_DIR",
        "OUT_PATH",
        "OUT_META",
        "LANG",
        "MAX_DOCS",
        "DOCS_JSONL",
        "CORPUS",
        "HF_DATASET",
        "STEPS",
        "LR",
        "MODEL",
        "CODE_MODE",
    ):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def run_script(script: str, *args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600):
    """Run one of the spec's scripts (or `-m next_speed.cli`, or `-c CODE`) in a subprocess; return CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items()}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + str(ROOT)
    if script == "-c":
        cmd = [sys.executable, "-c", *args]
    else:
        cmd = (
            [sys.executable, str(ROOT / script), *args]
            if script.endswith(".py")
            else [sys.executable, "-m", script, *args]
        )
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A loopback port nobody listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc=None, timeout: float = 240) -> int | None:
    """Poll `base`/health until it answers 200 (or `proc` exits, or `timeout`); the last status."""
    import time
    import urllib.error
    import urllib.request

    deadline, status = time.time() + timeout, None
    while time.time() < deadline and (proc is None or proc.poll() is None):
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.5)
    return status


def no_eos(gen, monkeypatch):
    """The random-init tiny decoder says end-of-sequence first; ban it so sentences have words."""
    import torch

    monkeypatch.setattr(gen.engine, "bad", torch.cat([gen.engine.bad, torch.tensor([gen.tok.eos_token_id])]))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random-init Llama-style causal LM with a BPE tokenizer trained on the topic sentences."""
    from next_speed.models.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(
        tmp_path_factory.mktemp("llm") / "tiny-llama", [s for v in TOPICS.values() for s in v] * 3
    )


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    """A tiny random-init T5-style seq2seq model."""
    from next_speed.models.tiny import build_tiny_seq2seq

    return build_tiny_seq2seq(tmp_path_factory.mktemp("t5") / "tiny-t5", [s for v in TOPICS.values() for s in v] * 3)
