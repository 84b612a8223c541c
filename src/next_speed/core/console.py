"""What the front ends show: log lines and progress bars (the library itself only logs)."""

from __future__ import annotations

import logging
import os

from tqdm.auto import tqdm


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "sentence_transformers", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Offline, the hub client logs each failed request; our own one-line error says what to do.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def progress(iterable=None, **kw):
    """tqdm that shows only on an interactive terminal (or when NEXT_SPEED_PROGRESS=1)."""
    force = os.environ.get("NEXT_SPEED_PROGRESS")
    if force is not None:
        kw["disable"] = force in ("0", "false")
    kw.setdefault("disable", None)
    return tqdm(iterable, dynamic_ncols=True, **kw)
