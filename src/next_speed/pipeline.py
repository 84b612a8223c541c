"""The main job: steps 01-07 in one command, skipping stages that are already up to date.

A stage is up to date when its stamp (`out/.stamps/<stage>.json`) records the same resolved config
and the same input hashes as now, and its outputs still have the hashes recorded there. A changed
knob or input reruns that stage, and since its outputs change, the stages after it too.
Presets are plain per-stage config defaults; the spec's environment variables and then flags
still win over them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from next_speed.core.artifacts import read_jsonl, sha256_path, write_json
from next_speed.core.config import knob, resolve, to_dict
from next_speed.core.errors import ConfigError, NextSpeedError
from next_speed.evals.planner_eval import baselines
from next_speed.models.planner import load_rows
from next_speed.models.tiny import build_tiny_causal_lm, build_tiny_encoder
from next_speed.stages import PIPELINE, clean_outputs

log = logging.getLogger(__name__)

STAGES = tuple(s.step for s in PIPELINE)
TINY_ENCODER = "cache/tiny/encoder"
TINY_DECODER = "cache/tiny/decoder"

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Sized for 2 CPU cores: the whole run in about 10-15 minutes, most of it for the decoder.
    "cpu": {
        "sentences": {"max_docs": 4000},
        "embed": {"bs": 64},
        "rvq": {"k": 6, "v": 256, "niter": 20},
        "trainsets": {"context_sents": 8, "val_frac": 0.05},
        "planner": {"d_model": 128, "n_layers": 2, "n_heads": 4, "drop": 0.3, "steps": 800, "log_every": 100, "bs": 64},
        # The plan reaches the decoder as its code tokens plus the two training sentences that match
        # it best, written into the prompt (docs/design.md, "How the plan reaches the text").
        "decoder": {
            "code_mode": "special",
            "exemplars": 2,
            "time_budget": 7.0,
            "train_layers": "4",
            "train_bs": 8,
            "lr": 3e-4,
            "eval_every": 40,
            "val_rows": 64,
            "max_in": 160,
            "max_out": 48,
        },
        "generate": {"gen_steps": 3, "n_cand": 4},
    },
    # Seconds, with random-init stand-in models built on the spot: for tests and smoke checks.
    "tiny": {
        "sentences": {"max_docs": 80, "num_proc": 1},
        "embed": {"emb_model": TINY_ENCODER, "bs": 32},
        "rvq": {"k": 2, "v": 8, "niter": 5},
        "trainsets": {"context_sents": 3, "val_frac": 0.2},
        "planner": {"d_model": 32, "n_heads": 2, "n_layers": 1, "steps": 30, "log_every": 10, "warmup": 5},
        "decoder": {
            "model": TINY_DECODER,
            "code_mode": "special",
            "exemplars": 2,
            "max_steps": 4,
            "eval_every": 2,
            "val_rows": 8,
            "train_bs": 4,
            "max_in": 64,
            "max_out": 24,
            "train_layers": "all",
            "lr": 1e-3,
        },
        # The random-init stand-in encoder puts every sentence near every other: no semantic repeat rule.
        "generate": {"gen_steps": 2, "n_cand": 2, "max_new_tokens": 12, "emb_model": TINY_ENCODER, "repeat_cos": 1.01},
    },
    # The spec's full-size settings, for a GPU.
    "full": {
        "sentences": {},
        "embed": {"bs": 256},
        "rvq": {"k": 6, "v": 256, "niter": 25},
        "trainsets": {"context_sents": 8, "val_frac": 0.05},
        "planner": {
            "d_model": 512,
            "n_heads": 8,
            "n_layers": 8,
            "steps": 20000,
            "log_every": 500,
            "bs": 256,
            "lr": 6e-4,
            "amp": "auto",
        },
        "decoder": {
            "code_mode": "special",
            "exemplars": 2,
            "num_epochs": 1.0,
            "train_layers": "all",
            "train_bs": 32,
            "lr": 1e-4,
            "eval_every": 500,
            "val_rows": 500,
            "max_in": 192,
        },
        "generate": {"gen_steps": 5, "n_cand": 8},
    },
}

# Output formats newer than the stamps of older runs: step 04's planner rows carry `sid` since the
# planner reads sentence embeddings (a stamp without the entry is stale).
ROWS_FORMAT = {"trainsets": 2}

# Environment variables that name different things in different stages: in one process they
# would silently apply to both, so `next-speed run` refuses them.
AMBIGUOUS = {
    "BS": "02 (embedding batch) and 05 (planner batch)",
    "LR": "05 and 06",
    "OUT_DIR": "05 and 06",
    "WARMUP": "05 and 06",
    "OUT_PATH": "the export tool and 07",
    "OUT_META": "the export tool and 02",
}


@dataclass
class RunConfig:
    """`next-speed run` knobs."""

    preset: str = knob(
        "cpu", env="PRESET", choices=tuple(PRESETS), help="cpu (2 cores, 10-15 min), tiny (about a minute), full (GPU)"
    )
    from_stage: str | None = knob(
        None, env="FROM_STAGE", choices=STAGES, flag="--from", help="rerun from this stage on"
    )
    force: bool = knob(False, env="FORCE", help="rerun every stage")
    stamps: str = knob("out/.stamps", env="STAMPS_DIR", help="where stage stamps live")


def _stage_table() -> dict[str, tuple]:
    """The main job's stages in order: step name -> (config class, entry, inputs of, outputs of)."""
    return {s.step: (*s.load(), s.inputs, s.outputs) for s in PIPELINE}


def _hashes(paths: list[str]) -> dict[str, str | None]:
    return {p: (sha256_path(p) if Path(p).exists() else None) for p in paths}


def _stamp_ok(stamp: Path, config: dict, inputs: list[str], outputs: list[str]) -> bool:
    if not stamp.is_file():
        return False
    try:
        rec = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if rec.get("config") != json.loads(json.dumps(config, default=str)):
        return False
    if rec.get("inputs") != _hashes(inputs):
        return False
    now = _hashes(outputs)
    return all(v is not None for v in now.values()) and rec.get("outputs") == now


def _summary(stage: str, res: Any, cfg: Any) -> str:
    if stage == "sentences":
        c = res["counts"]
        return f"{c['sentences']} sentences from {c['docs_with_sentences']} documents"
    if stage == "embed":
        return f"{res['counts']['rows']} x {res['dim']} embeddings ({res['sentences_per_s']} sentences/s)"
    if stage == "rvq":
        lv = res["levels"][-1]
        return f"K={res['K']} V={res['V']}: relative error {lv['rel_error']:.3f}, cosine {lv['cosine']:.3f}"
    if stage == "trainsets":
        c = res["counts"]
        return f"{c['train_rows']} train / {c['val_rows']} val rows ({c['val_docs']} of {c['docs']} documents held out)"
    if stage == "planner":
        b = res["best"]
        acc = b.get("val_acc", [float("nan")])[0]
        try:
            base = baselines(load_rows(cfg.out_lm), load_rows(cfg.out_lm_val), res["K"], res["V"])
            best_name, best_base = max(((n, m["acc"][0]) for n, m in base.items()), key=lambda t: t[1])
            vs = f" vs best baseline ({best_name}) {best_base:.3f}"
        except (NextSpeedError, ValueError):
            vs = ""
        return f"level-0 accuracy {acc:.3f}{vs}; val loss {b['val_loss']:.3f} (step {b['step']})"
    if stage == "decoder":
        return (
            f"val loss {res['val_loss_before']:.3f} -> {res['best']['val_loss']:.3f} in {res['steps']} steps "
            f"({res['selection']['trainable_params']:,} parameters trained)"
        )
    return ""


def run_pipeline(rcfg: RunConfig, environ: dict[str, str] | None = None, echo: Callable[[str], None] = print) -> dict:
    """Run steps 01-07 with the preset, skipping up-to-date stages. Returns per-stage results."""
    environ = dict(os.environ if environ is None else environ)
    for var, where in AMBIGUOUS.items():
        if var in environ:
            raise ConfigError(
                f"{var} is set, but it means different knobs in stages {where}; `next-speed run` cannot "
                f"tell which you mean: unset it and use the stage scripts (or a stage flag) instead"
            )
    preset = PRESETS[rcfg.preset]
    table = _stage_table()
    cfgs = {name: resolve(cls, environ=environ, base=preset.get(name, {})) for name, (cls, *_rest) in table.items()}
    stamps = Path(rcfg.stamps)
    start = STAGES.index(rcfg.from_stage) if rcfg.from_stage else len(STAGES)
    results: dict[str, Any] = {}
    t_all = time.perf_counter()
    for i, name in enumerate(STAGES):
        cls, fn, inputs_of, outputs_of = table[name]
        cfg = cfgs[name]
        if rcfg.preset == "tiny":
            _build_tiny(name, cfgs)
        conf = to_dict(cfg)
        if name in ROWS_FORMAT:  # a stage whose outputs changed shape reruns once over old stamps
            conf["_rows_format"] = ROWS_FORMAT[name]
        inputs, outputs = [p for p in inputs_of(cfg) if p], outputs_of(cfg)
        stamp = stamps / f"{name}.json"
        # Stale config or inputs rerun a stage; inputs carry hashes, so a rerun upstream reruns
        # exactly the stages that read its outputs (the decoder does not wait on the planner).
        fresh = name != "generate" and not rcfg.force and i < start and _stamp_ok(stamp, conf, inputs, outputs)
        if fresh:
            echo(f"[{i + 1}/7] {name}: up to date, skipped")
            results[name] = {"skipped": True}
            continue
        t0 = time.perf_counter()
        clean_outputs(outputs)
        res = fn(cfg)
        dt = time.perf_counter() - t0
        results[name] = res
        if name == "generate":
            echo(f"[{i + 1}/7] generate: {len(res['runs'])} prompts in {dt:.1f}s -> {res['out_path']}")
            for r in res["runs"]:
                echo(f"  > {r['prompt']}")
                echo(f"    {r['text'] or '(nothing generated)'}")
            continue
        write_json(
            stamp,
            {
                "stage": name,
                "config": conf,
                "inputs": _hashes(inputs),
                "outputs": _hashes(outputs),
                "seconds": round(dt, 1),
            },
        )
        echo(f"[{i + 1}/7] {name}: {_summary(name, res, cfg)} ({dt:.1f}s)")
    echo(f"done in {time.perf_counter() - t_all:.1f}s")
    return results


def _build_tiny(stage: str, cfgs: dict) -> None:
    """Build the tiny preset's random-init models the first time a stage needs them."""

    if stage == "embed":
        build_tiny_encoder(TINY_ENCODER)
    elif stage == "decoder" and not (Path(TINY_DECODER) / "config.json").is_file():
        texts = [r["text"] for r in read_jsonl(cfgs["sentences"].sent_path)][:2000]
        build_tiny_causal_lm(TINY_DECODER, texts)
