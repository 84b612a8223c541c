"""Artifacts that describe themselves: atomic writes, content hashes and metadata JSON.

Every stage writes its data files atomically (temporary file, then rename) and its metadata JSON
last. The metadata records the sha256 of each output, so an output replaced or left over from an
interrupted run never matches its metadata and the next stage refuses it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from importlib import metadata as _im
from pathlib import Path
from typing import Any

import numpy as np

from next_speed.core.errors import NextSpeedError, StaleInputError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)
_LIBS = ("next-speed", "numpy", "torch", "transformers", "sentence-transformers", "faiss-cpu", "pysbd", "datasets")

# Which command produces each artifact, for "rerun step X" messages.
STEP_HINT = {
    "docs": "the export tool (tools/export_wikimedia_wikipedia.py)",
    "sentences": "step 01 (01_make_sentences.py / next-speed sentences)",
    "embeddings": "step 02 (02_embed_sentences.py / next-speed embed)",
    "rvq": "step 03 (03_fit_rvq.py / next-speed rvq)",
    "trainsets": "step 04 (04_build_training_sets.py / next-speed trainsets)",
    "planner": "step 05 (05_train_sentence_lm.py / next-speed train-planner)",
    "decoder": "step 06 (06_train_decoder.py / next-speed train-decoder)",
}


# --------------------------------------------------------------------------- atomic writes


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(path: str | Path) -> int:
    """Delete the temporaries of `path` left by a writer that died (SIGKILL, power loss): siblings
    named `<name>.tmp-<pid>-*` or `<name>.old-<pid>-*` whose process is gone. Returns how many."""
    path = Path(path)
    n = 0
    if not path.parent.is_dir():
        return 0
    for kind in ("tmp", "old"):
        for p in path.parent.glob(f"{path.name}.{kind}-*"):
            pid = p.name[len(path.name) + len(kind) + 2 :].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                log.info("removed %s, left by an interrupted run", p)
                n += 1
    return n


def _fsync(path: Path) -> None:
    """Flush a file (or a folder entry) to disk, so a rename never publishes an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`, else
    delete it. Temporaries of earlier writers that died are removed first."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NextSpeedError(f"cannot create output folder {path.parent}: {e.strerror}") from None
    clean_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise NextSpeedError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success its files are fsynced and it replaces
    `path` as a whole. Temporaries of earlier writers that died are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
        old = None
        if path.exists():
            old = path.with_name(f"{path.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> Iterator[dict]:
    """Yield the rows of a JSONL file; a malformed line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise NextSpeedError(f"{path}: file not found")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise NextSpeedError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise NextSpeedError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if key not in row:
                    raise NextSpeedError(f"{path}:{lineno}: missing field {key!r}")
            yield row


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NextSpeedError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise NextSpeedError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    """Hash a file, or a folder as the sorted (relative name, file hash) list of its files."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and q.name != "meta.json"):
        h.update(str(p.relative_to(path)).encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------- metadata


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in _LIBS:
        with contextlib.suppress(_im.PackageNotFoundError):
            out[lib] = _im.version(lib)
    return out


def make_meta(
    kind: str,
    config: dict[str, Any],
    *,
    inputs: dict[str, str | Path] | None = None,
    outputs: dict[str, str | Path] | None = None,
    counts: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Metadata for an artifact: config, seed, versions, input/output paths with sha256, counts."""
    return {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "config": config,
        "seed": config.get("seed"),
        "versions": versions(),
        "inputs": {str(p): {"sha256": sha256_path(p)} for p in (inputs or {}).values()},
        "input_roles": {role: str(p) for role, p in (inputs or {}).items()},
        "outputs": {str(p): {"sha256": sha256_path(p)} for p in (outputs or {}).values()},
        "counts": counts or {},
        **extra,
    }


def write_checkpoint_meta(
    folder: Path, kind: str, config: dict[str, Any], inputs: dict[str, str | Path], **extra: Any
) -> dict[str, Any]:
    """`meta.json` of a checkpoint folder (planner, decoder), in the form every other artifact's
    metadata has (format version, config, seed, versions, inputs with their roles and hashes); its
    outputs are the folder's files by name with their hashes. Called on the temporary folder,
    after every other file is written."""
    folder = Path(folder)
    meta = make_meta(kind, config, inputs=inputs, **extra)
    meta["outputs"] = {
        f.name: {"sha256": sha256_path(f)} for f in sorted(folder.iterdir()) if f.is_file() and f.name != "meta.json"
    }
    write_json(folder / "meta.json", meta)
    return meta


def load_meta(meta_path: str | Path, kind: str, data_path: str | Path | None = None) -> dict[str, Any]:
    """Read the metadata of an input artifact and check it describes `data_path` as it is now.

    Raises `StaleInputError` naming the step to rerun when the file or its metadata is missing,
    from another kind of stage, from a newer format, or when the data no longer matches its hash.
    """
    hint = STEP_HINT.get(kind, kind)
    meta_path = Path(meta_path)
    if data_path is not None and not Path(data_path).exists():
        raise StaleInputError(f"{data_path} is missing: run {hint} first")
    if not meta_path.is_file():
        raise StaleInputError(f"{meta_path} is missing (no metadata for {data_path or kind}): run {hint}")
    meta = read_json(meta_path)
    if meta.get("kind") != kind:
        raise StaleInputError(f"{meta_path} describes a {meta.get('kind')!r} artifact, expected {kind!r}: rerun {hint}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise StaleInputError(
            f"{meta_path} has format version {meta.get('format_version')}, newer than this "
            f"next-speed understands ({FORMAT_VERSION}): upgrade, or rerun {hint}"
        )
    if data_path is not None:
        rec = meta.get("outputs", {}).get(str(data_path))
        if rec is None:
            # The file may have been addressed by another relative spelling: match on resolved path.
            for p, r in meta.get("outputs", {}).items():
                if Path(p).resolve() == Path(data_path).resolve():
                    rec = r
        if rec is None:
            raise StaleInputError(f"{meta_path} does not describe {data_path}: rerun {hint}")
        if rec["sha256"] != sha256_path(data_path):
            raise StaleInputError(
                f"{data_path} does not match its metadata {meta_path} (changed or half-written): rerun {hint}"
            )
    return meta


class NpyRows:
    """Rows of a 2-d `.npy` read with plain file reads, `chunk` rows at a time.

    Unlike a memory map, whose pages stay resident (and count in the process's RSS) once touched,
    reading this way keeps memory at one chunk however large the file: steps 03 and 04 stream
    corpora of millions of rows through it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(fh)
                self.offset = fh.tell()
        except (OSError, ValueError) as e:
            raise NextSpeedError(f"{path}: not a readable .npy file ({e})") from None
        if fortran or len(shape) != 2:
            raise NextSpeedError(f"{path}: expected a C-ordered 2-d array, got shape {shape}")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as an array of their own."""
        stop = min(stop, self.shape[0])
        row = self.shape[1] * self.dtype.itemsize
        out = np.empty((max(stop - start, 0), self.shape[1]), dtype=self.dtype)
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + start * row)
            fh.readinto(memoryview(out).cast("B"))
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (sorted indices), read one contiguous run at a time."""
        rows = np.asarray(rows)
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        row = self.shape[1] * self.dtype.itemsize
        with open(self.path, "rb") as fh:
            for j, r in enumerate(rows):
                fh.seek(self.offset + int(r) * row)
                fh.readinto(memoryview(out[j]).cast("B"))
        return out

    def chunks(self, chunk: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """(start, rows) for consecutive chunks of the whole file."""
        for start in range(0, self.shape[0], chunk):
            yield start, self.read(start, start + chunk)
