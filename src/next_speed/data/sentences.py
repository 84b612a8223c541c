"""Step 01: split the corpus into sentences (pysbd), filter by length, keep document and position."""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing as mp
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from next_speed.core.artifacts import atomic_path, make_meta, write_json
from next_speed.core.config import knob, seed_knob, to_dict
from next_speed.core.console import progress
from next_speed.core.errors import ConfigError, NextSpeedError
from next_speed.data.corpus import OFFLINE_HINT, iter_docs

log = logging.getLogger(__name__)

_WS = re.compile(r"\s+")


@dataclass
class SentencesConfig:
    """Step 01 knobs."""

    corpus: str = knob(
        "wiki",
        env="CORPUS",
        choices=("wiki", "sotu", "hf"),
        help="built-in offline corpus (wiki, sotu) or hf for HF_DATASET",
    )
    docs_jsonl: str | None = knob(
        None, env="DOCS_JSONL", help="local docs JSONL (one {'text':...} per line); wins when set"
    )
    hf_dataset: str = knob("wikitext", env="HF_DATASET", help="Hugging Face dataset (with CORPUS=hf; needs network)")
    hf_config: str | None = knob("wikitext-2-raw-v1", env="HF_CONFIG", help="Hugging Face dataset config")
    hf_split: str = knob("train", env="HF_SPLIT", help="Hugging Face dataset split")
    max_docs: int | None = knob(None, env="MAX_DOCS", min=1, help="use at most this many documents")
    sent_path: str = knob("data/sentences.jsonl", env="SENT_PATH", help="output sentences JSONL")
    sent_meta: str = knob("data/sentences.meta.json", env="SENT_META", help="output metadata JSON")
    min_len: int = knob(20, env="MIN_LEN", min=1, help="drop sentences shorter than this many characters")
    max_len: int = knob(400, env="MAX_LEN", min=1, help="drop sentences longer than this many characters")
    lang: str = knob(
        "en",
        env="LANG",
        help="pysbd language code; a locale value such as en_US.UTF-8 means en, C/POSIX mean the default",
    )
    num_proc: int = knob(0, env="NUM_PROC", min=0, help="worker processes for splitting (0 = all cores)")
    seed: int = seed_knob("random seed (recorded; splitting is deterministic)")

    def check(self) -> None:
        if self.min_len > self.max_len:
            raise ConfigError(f"MIN_LEN={self.min_len} is larger than MAX_LEN={self.max_len}")
        # LANG doubles as the shell's locale variable: read `en_US.UTF-8` as `en`, `C.UTF-8` as unset.
        lang = re.split(r"[_.@]", self.lang.strip())[0].lower()
        self.lang = "en" if lang in ("", "c", "posix") else lang
        explicit = getattr(self, "_explicit", frozenset())
        hub = sorted(k.upper() for k in explicit & {"hf_dataset", "hf_config", "hf_split"})
        if hub and "corpus" not in explicit:
            self.corpus = (
                "hf"  # naming a dataset, config or split means using the hub, never silently the default corpus
            )
        elif hub and self.corpus != "hf" and not self.docs_jsonl:
            raise ConfigError(f"{hub[0]} is set but CORPUS={self.corpus}: the HF_* knobs apply to CORPUS=hf only")


_SEGMENTER = None


def _init_worker(lang: str) -> None:
    global _SEGMENTER
    import pysbd

    _SEGMENTER = pysbd.Segmenter(language=lang, clean=False)


def split_text(text: str) -> list[str]:
    """Split one document into whitespace-normalized sentences, paragraph by paragraph."""
    out = []
    for para in text.split("\n"):
        para = para.strip()
        if not para:
            continue
        for s in _SEGMENTER.segment(para):
            s = _WS.sub(" ", s).strip()
            if s:
                out.append(s)
    return out


def _split_doc(text: str) -> list[str]:
    return split_text(text)


def _batched(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def check_lang(lang: str) -> None:
    try:
        import pysbd

        pysbd.Segmenter(language=lang, clean=False)
    except ValueError:
        from pysbd.languages import LANGUAGE_CODES

        raise ConfigError(
            f"LANG={lang!r} is not a pysbd language: choose one of {', '.join(sorted(LANGUAGE_CODES))}"
        ) from None


def segment_docs(docs: Iterable[dict], lang: str, num_proc: int, chunk: int = 2048) -> Iterator[tuple[dict, list[str]]]:
    """Yield (document, sentences) in document order, splitting in `num_proc` processes. Documents
    are read `chunk` at a time, so memory holds one chunk however large the corpus (a pool's
    `imap` alone would queue the whole input)."""
    n = num_proc or os.cpu_count() or 1
    batches = _batched(docs, chunk)
    first = next(batches, [])
    second = next(batches, None)
    if n <= 1 or (second is None and len(first) < 64):
        _init_worker(lang)
        for batch in itertools.chain([first], [second] if second else [], batches):
            for d in batch:
                yield d, split_text(d["text"])
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(n, initializer=_init_worker, initargs=(lang,)) as pool:
        for batch in itertools.chain([first], [second] if second else [], batches):
            yield from zip(batch, pool.imap(_split_doc, [d["text"] for d in batch], chunksize=16))


def make_sentences(cfg: SentencesConfig) -> dict:
    """Run step 01: corpus -> `SENT_PATH` rows `{id, doc, doc_id, pos, text}` + `SENT_META`."""
    check_lang(cfg.lang)
    t0 = time.perf_counter()
    docs = iter_docs(cfg.corpus, cfg.docs_jsonl, cfg.hf_dataset, cfg.hf_config, cfg.hf_split)
    if cfg.max_docs:
        docs = itertools.islice(docs, cfg.max_docs)
    source = cfg.docs_jsonl or (
        f"hf:{cfg.hf_dataset}/{cfg.hf_config}/{cfg.hf_split}" if cfg.corpus == "hf" else cfg.corpus
    )
    counts = {
        "docs": 0,
        "sentences_raw": 0,
        "dropped_short": 0,
        "dropped_long": 0,
        "sentences": 0,
        "docs_with_sentences": 0,
    }
    with atomic_path(cfg.sent_path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        doc_out = 0
        # streamed: documents in, sentences out, one chunk of documents in memory
        for doc, sents in progress(
            segment_docs(docs, cfg.lang, cfg.num_proc), total=cfg.max_docs, desc="01 split", unit="doc"
        ):
            counts["docs"] += 1
            pos = 0
            for s in sents:
                counts["sentences_raw"] += 1
                if len(s) < cfg.min_len:
                    counts["dropped_short"] += 1
                    continue
                if len(s) > cfg.max_len:
                    counts["dropped_long"] += 1
                    continue
                fh.write(
                    json.dumps(
                        {"id": counts["sentences"], "doc": doc_out, "doc_id": doc["id"], "pos": pos, "text": s},
                        ensure_ascii=False,
                    )
                    + "\n"
                )
                counts["sentences"] += 1
                pos += 1
            if pos:
                doc_out += 1
        counts["docs_with_sentences"] = doc_out
        if counts["docs"] == 0:
            raise NextSpeedError(f"the corpus {source} has no documents with text")
        if counts["sentences"] == 0:
            raise NextSpeedError(
                f"no sentences left from {source}: {counts['sentences_raw']} split, {counts['dropped_short']} shorter "
                f"than MIN_LEN={cfg.min_len}, {counts['dropped_long']} longer than MAX_LEN={cfg.max_len}"
            )
    inputs = {"docs": cfg.docs_jsonl} if cfg.docs_jsonl else {}
    elapsed = time.perf_counter() - t0
    meta = make_meta(
        "sentences",
        to_dict(cfg),
        inputs=inputs,
        outputs={"sentences": cfg.sent_path},
        counts=counts,
        source=source,
        seconds=round(elapsed, 2),
    )
    write_json(cfg.sent_meta, meta)
    log.info("01: %d sentences from %d documents in %.1fs -> %s", counts["sentences"], doc_out, elapsed, cfg.sent_path)
    return meta


__all__ = ["SentencesConfig", "make_sentences", "split_text", "OFFLINE_HINT"]
