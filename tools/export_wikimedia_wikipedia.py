"""Spec tool: a thin wrapper over `next-speed export` (streams a Wikipedia dump; needs network)."""

from next_speed.cli import script_main

if __name__ == "__main__":
    script_main("export")
