"""The code browser: what a code means, shown by the training sentences that carry it.

A code (level l, index i) is codeword i of the l-th RVQ codebook. Level 0 partitions the
sentence space; deeper levels refine the residual left by the levels above, so a deep code is
only meaningful beside its prefix. For any code the browser lists how many training sentences
carry it, the carriers nearest to the codeword (ranked by the cosine between the carrier's
level-l residual and the codeword: the most typical carriers first), and the codewords of the
same level nearest to it, each with one typical sentence. Served by `GET /v1/codes/{level}/{index}`,
the REPL's `/code L I` and `SentenceGenerator.browser()`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from next_speed.core.artifacts import read_jsonl
from next_speed.core.errors import ConfigError, NextSpeedError
from next_speed.data.embed import open_embeddings

log = logging.getLogger(__name__)


class CodeBrowser:
    """Training sentences, their embeddings and codes, indexed by code."""

    def __init__(self, texts: list[str], codes: np.ndarray, emb: np.ndarray, rvq):
        if not (len(texts) == len(codes) == len(emb)):
            raise NextSpeedError(
                f"code browser: {len(texts)} sentences, {len(codes)} code rows and {len(emb)} embeddings "
                "do not match: rerun steps 02-03"
            )
        self.texts, self.codes, self.emb, self.rvq = texts, np.asarray(codes), emb, rvq
        self.counts = np.stack([np.bincount(self.codes[:, k], minlength=rvq.V) for k in range(rvq.K)])  # (K, V)
        # rows carrying each code, without scanning the corpus per lookup: rows sorted by code, per level
        self.by_code = np.stack([np.argsort(self.codes[:, k], kind="stable") for k in range(rvq.K)])  # (K, N)
        self.starts = np.concatenate([np.zeros((rvq.K, 1), dtype=np.int64), np.cumsum(self.counts, 1)], 1)  # (K, V+1)

    @classmethod
    def from_rvq_meta(cls, rvq_meta_path: str, rvq) -> CodeBrowser:
        """Find the sentences, embeddings and codes of step 03 through its metadata."""
        try:
            cfg = json.loads(Path(rvq_meta_path).read_text())["config"]
            emb_cfg = json.loads(Path(cfg["emb_meta"]).read_text())["config"]
            paths = {"sentences": emb_cfg["sent_path"], "embeddings": cfg["emb_path"], "codes": cfg["codes_path"]}
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise NextSpeedError(
                f"code browser: cannot find the training sentences through {rvq_meta_path} ({e})"
            ) from e
        for role, path in paths.items():
            if not Path(path).is_file():
                raise NextSpeedError(f"code browser: {path} ({role}) not found: rerun steps 01-03 here")
        texts = [row["text"] for row in read_jsonl(paths["sentences"], required=("text",))]
        codes = np.load(paths["codes"])
        emb, _ = open_embeddings(paths["embeddings"], cfg["emb_meta"], what="code browser")
        return cls(texts, codes, emb, rvq)

    def check(self, level: int, index: int) -> None:
        if not 0 <= level < self.rvq.K:
            raise ConfigError(f"level: {level} is not a level: expected 0 to {self.rvq.K - 1}")
        if not 0 <= index < self.rvq.V:
            raise ConfigError(f"index: {index} is not a code: expected 0 to {self.rvq.V - 1}")

    MAX_RANKED = 2000  # carriers ranked per lookup at most (evenly spaced over the corpus beyond that)

    def _typical(self, level: int, index: int, n: int) -> list[dict]:
        """The carriers of (level, index) whose level-`level` residual is nearest the codeword."""
        rows = self.by_code[level, self.starts[level, index] : self.starts[level, index + 1]]
        if not len(rows):
            return []
        if len(rows) > self.MAX_RANKED:
            rows = rows[np.linspace(0, len(rows) - 1, self.MAX_RANKED).astype(np.int64)]
        books = self.rvq.codebooks
        x = np.asarray(self.emb[rows], dtype=np.float32)
        for k in range(level):  # the residual this level quantized
            x = x - books[k][self.codes[rows, k]]
        word = books[level][index]
        cos = (x @ word) / (np.linalg.norm(x, axis=1) * np.linalg.norm(word) + 1e-12)
        best = np.argsort(-cos, kind="stable")[:n]
        return [
            {
                "id": int(rows[i]),
                "text": self.texts[rows[i]],
                "codes": self.codes[rows[i]].tolist(),
                "cosine": round(float(cos[i]), 4),
            }
            for i in best
        ]

    def lookup(self, level: int, index: int, n: int = 8, neighbours: int = 5) -> dict:
        """What code (level, index) means: its use, typical carriers and nearest codewords."""
        self.check(level, index)
        book = self.rvq.codebooks[level]
        unit = book / (np.linalg.norm(book, axis=1, keepdims=True) + 1e-12)
        sims = unit @ unit[index]
        order = [int(j) for j in np.argsort(-sims, kind="stable") if j != index][:neighbours]
        total = len(self.codes)
        return {
            "level": level,
            "index": index,
            "count": int(self.counts[level, index]),
            "share": round(float(self.counts[level, index]) / max(total, 1), 6),
            "sentences_total": total,
            "examples": self._typical(level, index, n),
            "neighbours": [
                {
                    "index": j,
                    "cosine": round(float(sims[j]), 4),
                    "count": int(self.counts[level, j]),
                    "example": (self._typical(level, j, 1) or [{"text": None}])[0]["text"],
                }
                for j in order
            ],
        }
