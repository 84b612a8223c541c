"""The `next-speed` command: one subcommand per stage, each a thin wrapper over a stage function.

Every subcommand takes its stage's knobs as flags; the same knobs come from the spec's
environment variables, and flags win. The numbered scripts of the spec call `script_main`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from next_speed.core import config as C
from next_speed.core.console import setup_logging
from next_speed.core.errors import NextSpeedError
from next_speed.stages import BY_NAME, STAGES, clean_outputs


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
    from next_speed.quant.rvq import format_report  # here, not at the top: `next-speed --help` loads no model code

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
    from next_speed.evals.planner_eval import (
        format_eval,  # here, not at the top: `next-speed --help` loads no model code
    )

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
        f"decoder {info['base_model']} ({info['train']['code_mode']} codes): {info['steps']} steps in "
        f"{info['seconds']}s "
        f"(stopped by {info['stopped_by']}), {sel['trainable_params']:,} of {sel['total_params']:,} parameters "
        "trained; "
        f"val loss {info['val_loss_before']:.3f} -> {b['val_loss']:.3f} (best step {b['step']})"
    )
    print(f"wrote {info['train']['out_dir']}/ (safetensors, tokenizer, config.json, curve.png)")


def _print_decoder_eval(res: dict) -> None:
    from next_speed.training.train_decoder import (
        format_decoder_eval,  # here, not at the top: `next-speed --help` loads no model code
    )

    print(format_decoder_eval(res))


def _print_agreement(r: dict) -> None:
    from next_speed.evals.agreement import (
        format_agreement,  # here, not at the top: `next-speed --help` loads no model code
    )

    print(format_agreement(r))


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# How each stage's result is shown on the command line (the registry itself: `stages.STAGES`).
PRINTERS: dict[str, Callable[[Any], None]] = {
    "export": _print_counts,
    "sentences": _print_counts,
    "embed": _print_counts,
    "rvq": _print_rvq,
    "rvq-eval": _print_rvq_report,
    "train-planner": _print_planner,
    "eval-planner": _print_planner_eval,
    "train-decoder": _print_decoder,
    "eval-decoder": _print_decoder_eval,
    "generate": print_generation,
    "code-agreement": _print_agreement,
    "report": lambda r: print(f"wrote {r['report']}"),
    "trainsets": _print_counts,
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: the stages' names and one-line help only (a stage's own flags are read
    by `run_command`, so `next-speed --help` loads no model code)."""
    p = argparse.ArgumentParser(prog="next-speed", description="Sentence-step text generation with RVQ codes.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for st in STAGES:
        sub.add_parser(st.name, help=st.help, add_help=False)
    return p


def run_command(name: str, argv: list[str] | None = None) -> Any:
    """Parse `argv` for one stage, resolve its config and run it (errors propagate)."""
    st = BY_NAME[name]
    cls, fn = st.load()
    parser = argparse.ArgumentParser(prog=name, description=st.help)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    C.add_arguments(parser, cls)
    ns = parser.parse_args(argv)
    setup_logging(ns.verbose)
    cfg = C.resolve(cls, C.from_namespace(ns, cls))
    if st.outputs is not None:
        clean_outputs(st.outputs(cfg))
    result = fn(cfg)
    show = PRINTERS.get(name)
    if show is not None and result is not None:
        show(result)
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
    st = BY_NAME.get(argv[0])
    if st is None:
        parser.parse_args(argv)  # prints the usage error and exits 2
        return 2
    if st.front_end:
        return st.load()[1](argv[1:])
    return guarded(lambda: run_command(st.name, argv[1:]))


def script_main(name: str) -> None:
    """Entry point of the spec's numbered scripts (e.g. 01_make_sentences.py)."""
    sys.exit(guarded(lambda: run_command(name, sys.argv[1:])))


if __name__ == "__main__":
    sys.exit(main())
