"""08: an interactive chat REPL over SentenceGenerator; `-p/--prompt` for one-shot use."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import TextIO

from .errors import NextSpeedError

HELP = """commands:
  /help              this help
  /show              current settings
  /set NAME=VALUE    change a setting (e.g. /set n_cand=8, /set rerank=0)
  /reset             forget the conversation
  /quit              leave (Ctrl-D and Ctrl-C work too)
anything else continues the text: your sentences, then the generator's."""


def chat_loop(gen, inp: TextIO = sys.stdin, out: TextIO = sys.stdout, interactive: bool | None = None) -> int:
    """Read lines until /quit or EOF; each line extends the conversation, which is the prompt."""
    from .generate import update_params

    interactive = inp.isatty() if interactive is None else interactive
    history: list[str] = []
    params = gen.params
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
            res = gen.run(" ".join(history), **asdict(params))
        except KeyboardInterrupt:
            print("\n(interrupted)", file=out)
            continue
        except NextSpeedError as e:
            history.pop()
            print(f"error: {e}", file=out)
            continue
        text = res.text or "(nothing generated)"
        if res.sentences:
            history.append(res.text)
        print(("bot> " if interactive else "") + text, file=out, flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .cli import guarded
    from .config import add_arguments, from_namespace, resolve
    from .generate import GenerateConfig, SentenceGenerator
    from .runtime import setup_logging

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
