"""Spec script: the chat REPL (`next-speed chat`); `-p TEXT` generates once and exits."""

import sys

from next_speed.serving.chat import main

if __name__ == "__main__":
    sys.exit(main())
