"""08: an interactive chat REPL over SentenceGenerator; `-p/--prompt` for one-shot use."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import TextIO

from next_speed.cli import guarded
from next_speed.core.config import add_arguments, from_namespace, resolve
from next_speed.core.console import setup_logging
from next_speed.core.errors import ConfigError, NextSpeedError
from next_speed.generation.generate import GenerateConfig, SentenceGenerator, check_plan, update_params

HELP = """commands:
  /help              this help
  /show              current settings
  /set NAME=VALUE    change a setting (e.g. /set n_cand=8, /set rerank=0)
  /reset             forget the conversation
  /pin C0 C1 ...     pin the codes (first levels) of the next sentence; several: /pin 12 40 ; - ; 7
                     ('-' leaves that sentence to the planner); pins apply to the next turn only
  /steer [levels=L] TEXT   steer the next sentence by an example: its codes (first L levels) become the plan
  /plan              the pins waiting for the next turn; /unpin clears them
  /code LEVEL INDEX  what a code means: the training sentences that carry it, its nearest codes
  /codes TEXT        the code tuple of a sentence
  /quit              leave (Ctrl-D and Ctrl-C work too)
anything else continues the text: your sentences, then the generator's."""


def chat_loop(gen, inp: TextIO = sys.stdin, out: TextIO = sys.stdout, interactive: bool | None = None) -> int:
    """Read lines until /quit or EOF; each line extends the conversation, which is the prompt."""

    interactive = inp.isatty() if interactive is None else interactive
    history: list[str] = []
    params = gen.params
    pins: list = []  # plan control for the next turn (generate.check_plan entries)
    if interactive:
        print("next-speed chat: type text to continue it, /help for commands.", file=out)
    while True:
        if interactive:
            print("you> ", end="", file=out, flush=True)
        try:
            line = inp.readline()
        except KeyboardInterrupt:
            print("", file=out)
            return 0
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line[1:].partition(" ")
            if cmd in ("quit", "exit", "q"):
                return 0
            if cmd == "help":
                print(HELP, file=out)
            elif cmd == "show":
                print(" ".join(f"{k}={v}" for k, v in asdict(params).items()), file=out)
            elif cmd == "reset":
                history.clear()
                print("(conversation cleared)", file=out)
            elif cmd in ("pin", "steer", "plan", "unpin", "code", "codes"):
                try:
                    plan_command(gen, cmd, arg.strip(), pins, out)
                except NextSpeedError as e:
                    print(f"error: {e}", file=out)
            elif cmd == "set":
                name, eq, value = arg.partition("=")
                if not eq:
                    print("usage: /set NAME=VALUE", file=out)
                    continue
                try:
                    params = update_params(params, {name.strip(): value.strip()})
                    print(f"{name.strip()}={getattr(params, name.strip())}", file=out)
                except NextSpeedError as e:
                    print(f"error: {e}", file=out)
            else:
                print(f"unknown command /{cmd}: try /help", file=out)
            continue
        history.append(line)
        try:
            res = gen.run(" ".join(history), plan=list(pins) or None, **asdict(params))
        except KeyboardInterrupt:
            print("\n(interrupted)", file=out)
            continue
        except NextSpeedError as e:
            history.pop()
            print(f"error: {e}", file=out)
            continue
        if pins:  # show how the pinned plan came out
            for st in res.steps:
                if st.chosen is not None:
                    print(f"  plan {st.planned} (pinned {st.pinned}) -> realized {st.realized}", file=out)
            pins.clear()
        text = res.text or "(nothing generated)"
        if res.sentences:
            history.append(res.text)
        print(("bot> " if interactive else "") + text, file=out, flush=True)


def plan_command(gen, cmd: str, arg: str, pins: list, out: TextIO) -> None:
    """The REPL's plan-control and code-browser commands (errors raise NextSpeedError)."""

    K, V = gen.rvq.K, gen.rvq.V
    if cmd == "pin":
        if not arg:
            raise ConfigError("usage: /pin C0 C1 ... (the first levels' codes); several sentences: /pin 12 40 ; - ; 7")
        new = []
        for part in arg.split(";"):
            part = part.strip()
            if part in ("", "-"):
                new.append(None)
                continue
            try:
                new.append([int(x) for x in part.replace(",", " ").split()])
            except ValueError:
                raise ConfigError(f"/pin: {part!r} is not a list of codes (whole numbers)") from None
        check_plan(pins + new, K, V, "pin")
        pins.extend(new)
        print(f"pinned for the next turn: {pins}", file=out)
    elif cmd == "steer":
        levels, text = K, arg
        if arg.startswith("levels="):
            head, _, text = arg.partition(" ")
            try:
                levels = int(head.removeprefix("levels="))
            except ValueError:
                raise ConfigError(f"/steer: {head!r}: levels must be a whole number from 1 to {K}") from None
        entry = {"example": text.strip(), "levels": levels}
        check_plan(pins + [entry], K, V, "steer")
        pins.append(entry)
        print(
            f"steering sentence {len(pins)} by the example's first {levels} levels: "
            f"{gen.codes_of(entry['example'], levels)}",
            file=out,
        )
    elif cmd == "plan":
        print(f"pinned for the next turn: {pins}" if pins else "(no pins: the planner chooses)", file=out)
    elif cmd == "unpin":
        pins.clear()
        print("(pins cleared)", file=out)
    elif cmd == "codes":
        if not arg:
            raise ConfigError("usage: /codes TEXT")
        print(gen.codes_of(arg), file=out)
    else:  # code
        try:
            level, index = (int(x) for x in arg.split())
        except ValueError:
            raise ConfigError("usage: /code LEVEL INDEX (two whole numbers)") from None
        info = gen.browser().lookup(level, index, n=5, neighbours=3)
        print(f"level {level}, code {index}: {info['count']} of {info['sentences_total']} training sentences", file=out)
        for ex in info["examples"]:
            print(f"  {ex['text']}  {ex['codes']}", file=out)
        for nb in info["neighbours"]:
            print(
                f"  near: code {nb['index']} (cos {nb['cosine']}, {nb['count']} sentences): {nb['example']}", file=out
            )


def main(argv: list[str] | None = None) -> int:

    ap = argparse.ArgumentParser(prog="08_chat.py", description="Chat with the sentence-step generator.")
    ap.add_argument("-p", dest="once", default=None, help="generate once for this text and exit (same as --prompt)")
    add_arguments(ap, GenerateConfig)
    ns = ap.parse_args(argv)
    if ns.once is None and ns.prompt is not None:
        ns.once = ns.prompt
    code = 0

    def go():
        nonlocal code
        setup_logging(False)
        cli = from_namespace(ns, GenerateConfig)
        cli.pop("prompt", None)
        gen = SentenceGenerator(resolve(GenerateConfig, cli))
        if ns.once is not None:
            print(gen.generate(ns.once))
        else:
            code = chat_loop(gen)

    rc = guarded(go)
    return rc or code
