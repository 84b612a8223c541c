"""The one registry of stages: what the CLI offers, what the knob reference documents and what
the main job runs, each stage once.

A stage is a config class (its knobs) and a pure entry function over it, in one module. The CLI
makes a subcommand of every stage with `command`, the knob reference (`python -m next_speed.docs`)
a section of every stage with a `title`, and the main job (`next-speed run`) runs the stages with
a `step`, in order, with the inputs and outputs it hashes for its stamps.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from next_speed.core.artifacts import clean_stale_temporaries


def _planner_inputs(c) -> list[str]:
    # imported here: the registry stays light (the CLI's --help reads it and loads no model code)
    from next_speed.training.train_planner import extra_folders

    return [c.out_lm, c.out_lm_val] + [str(Path(f) / "embeddings.npy") for f in extra_folders(c)]


@dataclass(frozen=True)
class Stage:
    name: str  # the CLI subcommand
    module: str
    config: str | None  # the config class in `module` (None: the front end parses its own flags)
    entry: str  # the entry function in `module`: entry(config) -> result, or main(argv) for a front end
    help: str
    title: str | None = None  # its section of the knob reference (docs/configuration.md)
    step: str | None = None  # its name in the main job, which runs these stages in registry order
    inputs: Callable[[Any], list[str]] | None = None  # files the main job hashes before running it
    outputs: Callable[[Any], list[str]] | None = None  # and after
    front_end: bool = False  # chat and serve: `entry` is main(argv)

    def load(self) -> tuple[type | None, Callable]:
        mod = importlib.import_module(self.module)
        return (getattr(mod, self.config) if self.config else None), getattr(mod, self.entry)


STAGES: tuple[Stage, ...] = (
    Stage("run", "next_speed.pipeline", "RunConfig", "run_pipeline",
          "the main job: steps 01-07 with a preset, skipping up-to-date stages",
          "Main job (`run.sh`, `next-speed run`)"),
    Stage("export", "next_speed.data.corpus", "ExportConfig", "export_docs",
          "stream a Wikipedia dump from the Hugging Face hub into data/raw/docs.jsonl (needs network)",
          "Export tool (`tools/export_wikimedia_wikipedia.py`, `next-speed export`)"),
    Stage("sentences", "next_speed.data.sentences", "SentencesConfig", "make_sentences",
          "step 01: split the corpus into sentences", "01 sentences (`01_make_sentences.py`, `next-speed sentences`)",
          "sentences", lambda c: [c.docs_jsonl] if c.docs_jsonl else [], lambda c: [c.sent_path, c.sent_meta]),
    Stage("embed", "next_speed.data.embed", "EmbedConfig", "embed_sentences",
          "step 02: embed sentences with the sentence encoder",
          "02 embeddings (`02_embed_sentences.py`, `next-speed embed`)",
          "embed", lambda c: [c.sent_path], lambda c: [c.out_emb, c.out_meta]),
    Stage("rvq", "next_speed.quant.rvq", "RVQConfig", "fit_rvq",
          "step 03: fit RVQ codebooks and encode every sentence", "03 RVQ (`03_fit_rvq.py`, `next-speed rvq`)",
          "rvq", lambda c: [c.emb_path], lambda c: [c.rvq_path, c.codes_path, c.rvq_meta]),
    Stage("trainsets", "next_speed.data.trainsets", "TrainSetsConfig", "build_training_sets",
          "step 04: planner and decoder training sets, split by document",
          "04 training sets (`04_build_training_sets.py`, `next-speed trainsets`)",
          "trainsets", lambda c: [c.sent_path, c.codes_path],
          lambda c: [c.out_lm, c.out_lm_val, c.out_dec, c.out_dec_val, c.train_meta]),
    Stage("train-planner", "next_speed.training.train_planner", "PlannerTrainConfig", "train_planner",
          "step 05: train the Sentence-LM planner",
          "05 planner (`05_train_sentence_lm.py`, `next-speed train-planner`)",
          "planner", _planner_inputs, lambda c: [c.out_dir]),
    Stage("train-decoder", "next_speed.training.train_decoder", "DecoderTrainConfig", "train_decoder",
          "step 06: train the decoder (context + codes -> sentence)",
          "06 decoder (`06_train_decoder.py`, `next-speed train-decoder`)",
          "decoder", lambda c: [c.out_dec, c.out_dec_val], lambda c: [c.out_dir]),
    Stage("generate", "next_speed.generation.generate", "GenerateConfig", "run_generate",
          "step 07: generate sentence by sentence and write a JSON log",
          "07 generation (`07_generate.py`, `next-speed generate`; also 08, 09 and the API)",
          "generate", lambda c: [c.planner_dir, c.decoder_dir, c.rvq_path], lambda c: []),
    Stage("chat", "next_speed.serving.chat", None, "main", "08: interactive chat REPL (-p TEXT for one shot)",
          front_end=True),
    Stage("serve", "next_speed.serving.server", "ServerConfig", "main",
          "09: HTTP server (POST /generate, the OpenAI-compatible API, GET /health)",
          "09 server (`09_server.py`, `next-speed serve`), on top of the generation knobs", front_end=True),
    Stage("rvq-eval", "next_speed.quant.rvq", "RVQEvalConfig", "rvq_report",
          "RVQ reconstruction error, codebook usage and tuple sharing", "`rvq_recon_error.py` (`next-speed rvq-eval`)"),
    Stage("eval-planner", "next_speed.evals.planner_eval", "PlannerEvalConfig", "eval_planner",
          "planner accuracy against baselines on the validation split",
          "`sent_lm_eval.py` (`next-speed eval-planner`)"),
    Stage("eval-decoder", "next_speed.training.train_decoder", "DecoderEvalConfig", "eval_decoder",
          "decoder validation loss with true codes, shuffled codes, and a no-codes decoder",
          "`decoder_eval.py` (`next-speed eval-decoder`)"),
    Stage("code-agreement", "next_speed.evals.agreement", "AgreementConfig", "code_agreement",
          "planned vs realized codes, rerank off/on, several N_CAND",
          "`code_agreement_eval.py` (`next-speed code-agreement`), on top of the generation knobs"),
    Stage("report", "next_speed.evals.report", "ReportConfig", "make_report",
          "run the evaluations and write out/report/report.md with plots", "Report (`next-speed report`)"),
)  # fmt: skip

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
PIPELINE: tuple[Stage, ...] = tuple(s for s in STAGES if s.step)


def clean_outputs(paths: list[str]) -> int:
    """Before a stage runs: remove the temporaries of its outputs left by a run that was killed
    (a killed decoder save leaves a half-written folder of up to 540 MB). Returns how many."""
    return sum(clean_stale_temporaries(p) for p in paths if p)
