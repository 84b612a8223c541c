"""The evaluation report: RVQ error, planner against baselines, code agreement (and the decoder's
codes-value losses when a no-codes decoder exists), as Markdown with PNG plots in out/report/."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from next_speed.core.config import device_knob, knob, resolve
from next_speed.core.errors import NextSpeedError
from next_speed.evals.agreement import AgreementConfig, code_agreement, format_agreement
from next_speed.evals.planner_eval import PlannerEvalConfig, eval_planner, format_eval
from next_speed.quant.rvq import RVQEvalConfig, format_report, rvq_report
from next_speed.training.train_decoder import DecoderEvalConfig, eval_decoder, format_decoder_eval

log = logging.getLogger(__name__)


@dataclass
class ReportConfig:
    """`next-speed report` knobs (the evaluations' own knobs apply too)."""

    out_dir: str = knob("out/report", env="REPORT_DIR", help="folder for report.md and its plots")
    eval_positions: int = knob(200, env="EVAL_POSITIONS", min=1, help="validation positions for code agreement")
    decoder_rows: int = knob(300, env="VAL_ROWS", min=1, help="validation rows for the decoder losses")
    device: str = device_knob()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def make_report(cfg: ReportConfig, environ: dict | None = None) -> dict:
    """Run the evaluations and write out/report/report.md with its plots."""
    env = dict(os.environ if environ is None else environ)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    md = ["# next-speed evaluation report", ""]
    rvq = _rvq_section(env, out, plt, md)
    plan = _planner_section(cfg, env, out, plt, md)
    dec = _decoder_section(cfg, env, out, plt, md)
    agr = _agreement_section(cfg, env, out, plt, md)
    (out / "report.md").write_text("\n".join(md) + "\n")
    return {"report": str(out / "report.md"), "rvq": rvq, "planner": plan, "decoder": dec, "agreement": agr}


def _rvq_section(env: dict, out: Path, plt, md: list[str]) -> dict:
    rvq = rvq_report(resolve(RVQEvalConfig, environ=env))
    lv = rvq["levels"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([r["level"] + 1 for r in lv], [r["rel_error"] for r in lv], marker="o", label="relative error")
    ax[0].plot([r["level"] + 1 for r in lv], [r["cosine"] for r in lv], marker="s", label="cosine")
    ax[0].set_xlabel("levels used")
    ax[0].set_title("RVQ reconstruction")
    ax[0].legend()
    ax[1].bar([r["level"] for r in lv], [r["perplexity"] for r in lv], label="perplexity")
    ax[1].plot([r["level"] for r in lv], [r["used"] for r in lv], "k.", label="codewords used")
    ax[1].set_xlabel("level")
    ax[1].set_title("codebook usage")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out / "rvq.png", dpi=100)
    plt.close(fig)
    md += ["## RVQ", "", "```", format_report(rvq), "```", "", "![RVQ error and codebook usage](rvq.png)", ""]

    return rvq


def _planner_section(cfg: ReportConfig, env: dict, out: Path, plt, md: list[str]) -> dict:
    plan = eval_planner(resolve(PlannerEvalConfig, {"device": cfg.device}, environ=env))
    md += ["## Planner against baselines (validation split)", "", "```", format_eval(plan), "```", ""]
    measures = [
        ("level-0 top-1", lambda m: m["acc"][0]),
        ("level-0 top-5", lambda m: m["top5"][0]),
        ("cosine to next", lambda m: m["cos_next"]),
        ("contrastive acc.", lambda m: m["contrastive_acc"]),
    ]
    models = list(plan["results"])
    fig, ax = plt.subplots(figsize=(9, 3.5))
    width = 0.8 / len(models)
    for j, name in enumerate(models):
        ax.bar(
            [i + j * width for i in range(len(measures))],
            [get(plan["results"][name]) for _, get in measures],
            width,
            label=name,
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(measures))], [n for n, _ in measures])
    ax.set_title("planner against baselines (LCM measures: the plan's RVQ reconstruction vs the true next sentence)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "planner.png", dpi=100)
    plt.close(fig)
    md += ["![planner and baselines on every measure](planner.png)", ""]
    for name, src in (
        ("planner_curve.png", Path(plan.get("out_dir", "out/sentence_lm")) / "curve.png"),
        ("decoder_curve.png", Path("out/decoder/curve.png")),
    ):
        if src.is_file():
            shutil.copyfile(src, out / name)
            md += [f"![{name[:-4]}]({name})", ""]

    return plan


def _decoder_section(cfg: ReportConfig, env: dict, out: Path, plt, md: list[str]) -> dict | None:
    try:
        dec = eval_decoder(
            resolve(DecoderEvalConfig, {"val_rows": cfg.decoder_rows, "device": cfg.device}, environ=env)
        )
        md += ["## What codes buy the decoder", "", "```", format_decoder_eval(dec), "```", ""]
        names = [
            ("true codes", "loss_true", "tab:green"),
            ("shuffled codes", "loss_shuffled", "tab:orange"),
            ("no-codes decoder", "loss_none", "tab:gray"),
            ("oracle exemplars", "loss_oracle_exemplars", "tab:blue"),
        ]
        vals = [(n, dec["summary"][k], c) for n, k, c in names if dec["summary"].get(k) is not None]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([n for n, _, _ in vals], [v for _, v, _ in vals], color=[c for _, _, c in vals])
        for i, (_, v, _) in enumerate(vals):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom")
        ax.set_ylabel("validation loss per token (nats)")
        ax.set_ylim(min(v for _, v, _ in vals) * 0.8, max(v for _, v, _ in vals) * 1.05)
        ax.set_title(f"decoder ({dec['code_mode']}), {dec['rows']} rows")
        fig.tight_layout()
        fig.savefig(out / "decoder.png", dpi=100)
        plt.close(fig)
        md += ["![decoder loss with true, shuffled and no codes](decoder.png)", ""]
    except NextSpeedError as e:
        dec = None
        md += ["## What codes buy the decoder", "", f"skipped: {e}", ""]

    return dec


def _agreement_section(cfg: ReportConfig, env: dict, out: Path, plt, md: list[str]) -> dict:
    agr = code_agreement(
        resolve(AgreementConfig, {"eval_positions": cfg.eval_positions, "device": cfg.device}, environ=env)
    )
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for mode, style in (("off", "--"), ("on", "-")):
        rows = [r for r in agr["results"] if r["rerank"] == mode]
        ns = [r["n_cand"] for r in rows]
        ax[0].plot(ns, [r["per_level"][0] for r in rows], style, marker="o", label=f"level 0, rerank {mode}")
        ax[0].plot(ns, [r["prefix"] / agr["K"] for r in rows], style, marker="s", label=f"prefix / K, rerank {mode}")
        ax[1].plot(ns, [r["cos_plan"] for r in rows], style, marker="o", label=f"to the plan, rerank {mode}")
        ax[1].plot(ns, [r["cos_next"] for r in rows], style, marker="s", label=f"to the true next, rerank {mode}")
    ax[1].axhline(agr["summary"]["cos_plan_vs_next"], color="gray", lw=0.8, label="plan vs true next")
    for a, title, ylab in (
        (ax[0], "code agreement", "share of positions"),
        (ax[1], "round trip (LCM): cosine of the chosen sentence", "cosine"),
    ):
        a.set_xscale("log", base=2)
        a.set_xlabel("N_CAND")
        a.set_ylabel(ylab)
        a.set_title(title)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "agreement.png", dpi=100)
    plt.close(fig)
    md += [
        "## Code agreement: planned vs realized tuples",
        "",
        "```",
        format_agreement(agr),
        "```",
        "",
        "![agreement and round-trip cosine against N_CAND](agreement.png)",
        "",
    ]
    return agr
