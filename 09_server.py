"""Spec script: the HTTP server (`next-speed serve`); HOST and PORT choose the address."""

import sys

from next_speed.serving.server import main

if __name__ == "__main__":
    sys.exit(main())
