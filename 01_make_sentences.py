"""Spec script: a thin wrapper over `next-speed sentences` (same knobs as environment variables or flags)."""

from next_speed.cli import script_main

if __name__ == "__main__":
    script_main("sentences")
