"""Hugging Face libraries, quietened: our own log lines say what matters."""

from __future__ import annotations

import transformers


def quiet_hf() -> None:
    """Silence transformers' own progress bars and advisory warnings (we log what matters)."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
