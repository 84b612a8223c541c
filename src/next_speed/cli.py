"""The `next-speed` command: one subcommand per stage, each a thin wrapper over a stage function.

Every subcommand takes its stage's knobs as flags; the same knobs come from the spec's
environment variables, and flags win. The numbered scripts of the spec call `script_main`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from next_speed.core import config as C
from next_speed.core.errors import NextSpeedError


@dataclass(frozen=True)
class Command:
    name: str
    module: str
    config: str  # config class name in `module`
    run: str  # entry function name in `module`
    help: str
    show: Callable[[Any], None] | None = None
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None


def print_generation(log_obj: dict) -> None:
    for r in log_obj["runs"]:
        print(f"> {r['prompt']}")
        print(r["text"] if r["text"] else "(nothing generated)")
        t = r["timings"]
        print(
            f"  [{len(r['sentences'])} sentences, stop: {r['stop_reason']}; planner {t['planner']:.2f}s, "
            f"decoder {t['decoder']:.2f}s, rerank {t['rerank']:.2f}s, total {t['total']:.2f}s]"
        )
    print(f"log: {log_obj['out_path']}")


def _print_counts(meta: dict) -> None:
    outs = ", ".join(meta.get("outputs", {}))
    counts = ", ".join(f"{k}={v}" for k, v in meta.get("counts", {}).items())
    print(f"wrote {outs} ({counts})")


def _print_rvq(meta: dict) -> None:
    _print_counts(meta)
    lv = meta["levels"][-1]
    print(
        f"K={meta['K']} V={meta['V']}: relative error {lv['rel_error']:.4f}, cosine {lv['cosine']:.4f} "
        f"after {meta['K']} levels; fit {meta['fit_seconds']}s"
    )


def _print_rvq_report(rep: dict) -> None:
    from next_speed.quant.rvq import format_report

    print(format_report(rep))


def _print_planner(info: dict) -> None:
    b = info["best"]
    acc = b.get("val_acc")
    print(
        f"planner ({info['num_params']:,} parameters) trained {info['train']['steps']} steps in {info['seconds']}s "
        f"({info['train_seq_per_s']} seq/s); best step {b['step']}: val loss {b['val_loss']:.3f}"
        + (f", level-0 accuracy {acc[0]:.3f}, exact tuple {b['val_exact']:.3f}" if acc else "")
    )
    print(f"wrote {info['train']['out_dir']}/sentence_lm.pt, config.json, curve.png")


def _print_planner_eval(rep: dict) -> None:
    from next_speed.evals.planner_eval import format_eval

    print(format_eval(rep))


def _print_decoder(info: dict) -> None:
    if info.get("pretokenize_only"):
        c = info["cache"]
        print(
            f"tokenized {info['train_rows']} train / {info['val_rows']} val rows"
            + (
                f"; cache {'reused' if c['hit'] else 'written'}: {c['cache']}"
                if c.get("cache")
                else " (CACHE_TOKENIZED=0: nothing kept)"
            )
        )
        return
    b, sel = info["best"], info["selection"]
    print(
        f"decoder {info['base_model']} ({info['train']['code_mode']} codes): {info['steps']} steps in {info['seconds']}s "
        f"(stopped by {info['stopped_by']}), {sel['trainable_params']:,} of {sel['total_params']:,} parameters trained; "
        f"val loss {info['val_loss_before']:.3f} -> {b['val_loss']:.3f} (best step {b['step']})"
    )
    print(f"wrote {info['train']['out_dir']}/ (safetensors, tokenizer, config.json, curve.png)")


def _print_decoder_eval(res: dict) -> None:
    from next_speed.training.train_decoder import format_decoder_eval

    print(format_decoder_eval(res))


def _print_generate(r: dict) -> None:
    print_generation(r)


def _print_agreement(r: dict) -> None:
    from next_speed.evals.agreement import format_agreement

    print(format_agreement(r))


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in [
        Command(
            "export",
            "next_speed.data.corpus",
            "ExportConfig",
            "export_docs",
            "stream a Wikipedia dump from the Hugging Face hub into data/raw/docs.jsonl (needs network)",
            _print_counts,
        ),
        Command(
            "sentences",
            "next_speed.data.sentences",
            "SentencesConfig",
            "make_sentences",
            "step 01: split the corpus into sentences",
            _print_counts,
        ),
        Command(
            "embed",
            "next_speed.data.embed",
            "EmbedConfig",
            "embed_sentences",
            "step 02: embed sentences with the sentence encoder",
            _print_counts,
        ),
        Command(
            "rvq",
            "next_speed.quant.rvq",
            "RVQConfig",
            "fit_rvq",
            "step 03: fit RVQ codebooks and encode every sentence",
            _print_rvq,
        ),
        Command(
            "rvq-eval",
            "next_speed.quant.rvq",
            "RVQEvalConfig",
            "rvq_report",
            "RVQ reconstruction error, codebook usage and tuple sharing",
            _print_rvq_report,
        ),
        Command(
            "train-planner",
            "next_speed.training.train_planner",
            "PlannerTrainConfig",
            "train_planner",
            "step 05: train the Sentence-LM planner",
            lambda i: _print_planner(i),
        ),
        Command(
            "eval-planner",
            "next_speed.evals.planner_eval",
            "PlannerEvalConfig",
            "eval_planner",
            "planner accuracy against baselines on the validation split",
            lambda r: _print_planner_eval(r),
        ),
        Command(
            "train-decoder",
            "next_speed.training.train_decoder",
            "DecoderTrainConfig",
            "train_decoder",
            "step 06: train the decoder (context + codes -> sentence)",
            lambda i: _print_decoder(i),
        ),
        Command(
            "eval-decoder",
            "next_speed.training.train_decoder",
            "DecoderEvalConfig",
            "eval_decoder",
            "decoder validation loss with true codes, shuffled codes, and a no-codes decoder",
            lambda r: _print_decoder_eval(r),
        ),
        Command(
            "generate",
            "next_speed.generation.generate",
            "GenerateConfig",
            "run_generate",
            "step 07: generate sentence by sentence and write a JSON log",
            lambda r: _print_generate(r),
        ),
        Command(
            "code-agreement",
            "next_speed.evals.agreement",
            "AgreementConfig",
            "code_agreement",
            "planned vs realized codes, rerank off/on, several N_CAND",
            lambda r: _print_agreement(r),
        ),
        Command(
            "run",
            "next_speed.pipeline",
            "RunConfig",
            "run_pipeline",
            "the main job: steps 01-07 with a preset, skipping up-to-date stages",
            None,
        ),
        Command(
            "report",
            "next_speed.evals.report",
            "ReportConfig",
            "make_report",
            "run the evaluations and write out/report/report.md with plots",
            lambda r: print(f"wrote {r['report']}"),
        ),
        Command(
            "trainsets",
            "next_speed.data.trainsets",
            "TrainSetsConfig",
            "build_training_sets",
            "step 04: planner and decoder training sets, split by document",
            _print_counts,
        ),
    ]
}


def register(cmd: Command) -> None:
    COMMANDS[cmd.name] = cmd


def _load(cmd: Command) -> tuple[type, Callable]:
    mod = importlib.import_module(cmd.module)
    return getattr(mod, cmd.config), getattr(mod, cmd.run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="next-speed", description="Sentence-step text generation with RVQ codes.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    order = [
        "run",
        "export",
        "sentences",
        "embed",
        "rvq",
        "trainsets",
        "train-planner",
        "train-decoder",
        "generate",
        "rvq-eval",
        "eval-planner",
        "eval-decoder",
        "code-agreement",
        "report",
    ]
    for cmd in sorted(COMMANDS.values(), key=lambda c: order.index(c.name) if c.name in order else len(order)):
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cls, _ = _load(cmd)
        C.add_arguments(sp, cls)
        if cmd.extra_args:
            cmd.extra_args(sp)
    sub.add_parser("chat", help="08: interactive chat REPL (-p TEXT for one shot)", add_help=False)
    sub.add_parser("serve", help="09: HTTP server (POST /generate, GET /health)", add_help=False)
    return p


def run_command(name: str, argv: list[str] | None = None) -> Any:
    """Parse `argv` for one subcommand, resolve its config and run it (errors propagate)."""
    cmd = COMMANDS[name]
    cls, fn = _load(cmd)
    parser = argparse.ArgumentParser(prog=name, description=cmd.help)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    C.add_arguments(parser, cls)
    if cmd.extra_args:
        cmd.extra_args(parser)
    ns = parser.parse_args(argv)
    return _execute(cmd, cls, fn, ns)


def _execute(cmd: Command, cls: type, fn: Callable, ns: argparse.Namespace) -> Any:
    from next_speed.core.runtime import setup_logging

    setup_logging(getattr(ns, "verbose", False))
    cfg = C.resolve(cls, C.from_namespace(ns, cls))
    from next_speed.pipeline import clean_stage

    clean_stage(fn, cfg)
    extra = {k: v for k, v in vars(ns).items() if k.startswith("x_")}
    result = fn(cfg, **{k[2:]: v for k, v in extra.items()}) if extra else fn(cfg)
    if cmd.show is not None and result is not None:
        cmd.show(result)
    return result


def guarded(fn: Callable[[], Any]) -> int:
    """Run `fn`, turning user errors into one line on stderr and a non-zero exit status."""
    try:
        fn()
        return 0
    except NextSpeedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no partial output was kept", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as e:
        if os.environ.get("NEXT_SPEED_DEBUG"):
            raise
        name = getattr(e, "filename", None)
        where = f" ({name})" if name else ""
        print(f"error: {type(e).__name__}{where}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - last resort: still one line, with a way to get the traceback
        if os.environ.get("NEXT_SPEED_DEBUG"):
            raise
        msg = (str(e).splitlines() or [""])[0][:300]
        print(
            f"error: unexpected {type(e).__name__}: {msg} (set NEXT_SPEED_DEBUG=1 for the traceback)", file=sys.stderr
        )
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "chat":
        from next_speed.serving.chat import main as chat_main

        return chat_main(argv[1:])
    if argv[0] == "serve":
        from next_speed.serving.server import main as serve_main

        return serve_main(argv[1:])
    name = argv[0] if argv[0] in COMMANDS else None
    if name is None:
        parser.parse_args(argv)  # prints the usage error and exits 2
        return 2
    return guarded(lambda: run_command(name, argv[1:]))


def script_main(name: str) -> None:
    """Entry point of the spec's numbered scripts (e.g. 01_make_sentences.py)."""
    sys.exit(guarded(lambda: run_command(name, sys.argv[1:])))


if __name__ == "__main__":
    sys.exit(main())
