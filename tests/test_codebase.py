"""The code base's own rules: the knob reference matches the code, no long functions, the
package is laid out in subpackages, and the documents speak of the project, not of its making."""

import ast
import re
from pathlib import Path

from next_speed import docs

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "next_speed"
MAX_FUNCTION_LINES = 80


def test_configuration_reference_is_in_sync_with_the_knobs():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert text == docs.reference(), "docs/configuration.md is stale: run `uv run python -m next_speed.docs --write`"
    # every knob's variable of every stage is in it
    from next_speed.core.config import describe
    from next_speed.stages import STAGES

    for st in STAGES:
        if st.title:
            for r in describe(st.load()[0]):
                assert r["flag"] in text


def test_docs_check_fails_on_a_stale_file(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text(docs.reference().replace("| `SEED` |", "| `SEED_OLD` |", 1))
    assert docs.main(["--check", "--path", str(stale)]) == 1
    assert docs.main(["--write", "--path", str(stale)]) == 0
    assert docs.main(["--check", "--path", str(stale)]) == 0
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert docs.main(["--write", "--path", str(blocked / "configuration.md")]) == 2  # its folder is a file


def test_no_function_in_src_is_longer_than_80_lines():
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 80 lines: " + "; ".join(long)


def test_the_package_is_laid_out_in_subpackages():
    subs = {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert {"core", "data", "quant", "models", "training", "generation", "serving", "evals"} <= subs
    flat = sorted(p.name for p in SRC.glob("*.py"))
    assert flat == ["__init__.py", "cli.py", "docs.py", "pipeline.py", "stages.py"], flat


def test_readme_is_a_front_page_and_nothing_narrates_its_making():
    assert len((ROOT / "README.md").read_text(encoding="utf-8")) <= 25_000
    phrases = re.compile(
        r"this stop|latest session|later session|this session|no gpu (has been )?lent|issue \d+\b", re.I
    )
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    for sub in ("src", "tests", "bench"):
        files += [p for p in (ROOT / sub).rglob("*") if p.suffix in (".py", ".md", ".sh", ".html")]
    found = [
        f"{p.relative_to(ROOT)}: {m.group()}"
        for p in files
        if p != Path(__file__).resolve()
        for m in phrases.finditer(p.read_text(encoding="utf-8"))
    ]
    assert not found, found
