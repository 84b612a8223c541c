"""Print the knob tables of every stage as Markdown (used to write the README's knob reference).

uv run python -m next_speed.docs
"""

from __future__ import annotations

import importlib

from next_speed.core.config import describe

SECTIONS = [
    (
        "Export tool (`tools/export_wikimedia_wikipedia.py`, `next-speed export`)",
        "next_speed.data.corpus",
        "ExportConfig",
    ),
    ("01 sentences (`01_make_sentences.py`, `next-speed sentences`)", "next_speed.data.sentences", "SentencesConfig"),
    ("02 embeddings (`02_embed_sentences.py`, `next-speed embed`)", "next_speed.data.embed", "EmbedConfig"),
    ("03 RVQ (`03_fit_rvq.py`, `next-speed rvq`)", "next_speed.quant.rvq", "RVQConfig"),
    (
        "04 training sets (`04_build_training_sets.py`, `next-speed trainsets`)",
        "next_speed.data.trainsets",
        "TrainSetsConfig",
    ),
    (
        "05 planner (`05_train_sentence_lm.py`, `next-speed train-planner`)",
        "next_speed.training.train_planner",
        "PlannerTrainConfig",
    ),
    (
        "06 decoder (`06_train_decoder.py`, `next-speed train-decoder`)",
        "next_speed.training.train_decoder",
        "DecoderTrainConfig",
    ),
    (
        "07 generation (`07_generate.py`, `next-speed generate`; also 08, 09 and the API)",
        "next_speed.generation.generate",
        "GenerateConfig",
    ),
    (
        "09 server (`09_server.py`, `next-speed serve`), on top of the generation knobs",
        "next_speed.serving.server",
        "ServerConfig",
    ),
    ("`rvq_recon_error.py` (`next-speed rvq-eval`)", "next_speed.quant.rvq", "RVQEvalConfig"),
    ("`sent_lm_eval.py` (`next-speed eval-planner`)", "next_speed.evals.planner_eval", "PlannerEvalConfig"),
    ("`decoder_eval.py` (`next-speed eval-decoder`)", "next_speed.training.train_decoder", "DecoderEvalConfig"),
    (
        "`code_agreement_eval.py` (`next-speed code-agreement`), on top of the generation knobs",
        "next_speed.evals.agreement",
        "AgreementConfig",
    ),
    ("Main job (`run.sh`, `next-speed run`)", "next_speed.pipeline", "RunConfig"),
    ("Report (`next-speed report`)", "next_speed.evals.report", "ReportConfig"),
]


def main() -> None:
    seen_generate = set()
    for title, mod, cls_name in SECTIONS:
        cls = getattr(importlib.import_module(mod), cls_name)
        rows = describe(cls)
        if cls_name == "GenerateConfig":
            seen_generate = {r["field"] for r in rows}
        elif cls_name == "AgreementConfig":
            rows = [r for r in rows if r["field"] not in seen_generate]
        print(f"#### {title}\n")
        print("| env | flag | default | meaning |\n|---|---|---|---|")
        for r in rows:
            d = r["default"]
            d = "unset" if d is None else ("1" if d is True else "0" if d is False else d)
            print(f"| {'`' + r['env'] + '`' if r['env'] else ''} | `{r['flag']}` | `{d}` | {r['help']} |")
        print()


if __name__ == "__main__":
    main()
