"""The repository stands alone: every Markdown file that a tracked text file names is in the
repository, every "docs/science.md section N" points at a section that exists, and every Markdown
table renders."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = (".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".sh")
GENERATED = {"report.md"}  # written by tools/compare.py and tools/theory_lab.py into their output folder
MD_NAME = re.compile(r"(?<![\w/.-])([\w./-]*[A-Za-z0-9_-]\.md)\b")
SCIENCE_REF = re.compile(r"science\.md\)?,? sections? (\d+)(?: and (\d+))?")


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / f for f in out.split() if f.endswith(TEXT) or f.endswith("Makefile")]


def _lines():
    for path in _tracked_text_files():
        if path.exists():
            for no, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
                yield path, no, line


def test_every_cited_markdown_file_is_in_the_repository():
    missing = []
    for path, no, line in _lines():
        for name in MD_NAME.findall(line):
            base = name.rsplit("/", 1)[-1]
            if name.startswith(("http", "www.")) or base in GENERATED:
                continue
            if not any((d / name).exists() for d in (ROOT, path.parent, ROOT / "docs")):
                missing.append(f"{path.relative_to(ROOT)}:{no}: {name}")
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)


def test_science_section_references_exist():
    text = (ROOT / "docs" / "science.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", text, flags=re.M)}
    assert sections == set(range(1, 9))  # numbers are cited from code and configs: keep them fixed
    refs = []
    for path, no, line in _lines():
        for m in SCIENCE_REF.finditer(line):
            refs += [(path, no, int(n)) for n in m.groups() if n]
    assert len(refs) >= 8  # README, configs, tools, theory code, docs
    bad = [f"{p.relative_to(ROOT)}:{no}: section {n}" for p, no, n in refs if n not in sections]
    assert not bad, bad


def _cells(row: str) -> int:
    """Number of cells in a Markdown table row (GitHub's rule: an unescaped | splits, also inside `code`)."""
    return len(re.split(r"(?<!\\)\|", row.strip().strip("|")))


def test_markdown_tables_have_a_separator_row_and_rows_of_the_header_width():
    """A table whose header is not followed by a |---| row renders as a paragraph of pipes, and a
    row of another width (another table's header written under it) is cut or padded."""
    separator = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+$")
    bad = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        lines, fenced = path.read_text().splitlines(), False
        header = None  # (line number, cells) of the table being read
        for no, line in enumerate(lines, 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
            if fenced or not line.startswith("|"):
                header = None
                continue
            where = f"{path.relative_to(ROOT)}:{no}"
            if header is None:
                header = (no, _cells(line))
                after = lines[no] if no < len(lines) else ""
                if not separator.match(after.strip()):
                    bad.append(f"{where}: table header without a |---| row under it")
            elif _cells(line) != header[1]:
                bad.append(f"{where}: {_cells(line)} cells under a {header[1]}-cell header (line {header[0]})")
    assert not bad, "\n".join(bad)


def test_readme_layout_names_every_module_and_tool():
    text = (ROOT / "README.md").read_text()
    layout = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    names = [f"{p.name}" for p in sorted((ROOT / "lit_covrl").glob("*.py")) if p.name != "__init__.py"]
    names += [f"{p.name}/" for p in sorted((ROOT / "lit_covrl").iterdir()) if (p / "__init__.py").exists()]
    names += [p.stem for p in sorted((ROOT / "tools").glob("*.py")) if p.name != "__init__.py"]
    names += [p.name for p in sorted((ROOT / "tools").glob("*.sh"))]
    missing = [n for n in names if not re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", layout)]
    assert not missing, f"README.md's Layout section does not name: {missing}"
