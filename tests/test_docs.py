"""Citations of the design document: every ``docs/design.md §n`` in the repository names a
section that docs/design.md has, and nothing cites a design file outside the repository
(the old ``DESIGN.md`` / ``DESIGN §n``)."""
from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".cfg", ".ini", ".sh", ".yml", ".yaml", ".json", ".jinja"}
SKIP_DIRS = {"__pycache__", "artifacts", "build", "dist", "node_modules"}

# "design.md §3.1", "design.md) §5" (a markdown link), "design.md §3.4 and §4", "design.md §3–4"
_NUM = r"\d+(?:\.\d+)*"
CITATION = re.compile(rf"design\.md\)?\s*((?:§\s*{_NUM}(?:\s*[–-]\s*{_NUM})?(?:\s*(?:,|and|or)\s*)?)+)")
SECTION_NUMBER = re.compile(_NUM)
# a design file that is not docs/design.md: "DESIGN.md", "DESIGN §5", "../DESIGN.md §2"
FOREIGN = re.compile(r"DESIGN(?:\.md|\s*§)")
HEADING = re.compile(rf"^#{{2,6}}\s+({_NUM})\.?\s", re.MULTILINE)


def _skipped(name: str) -> bool:
    return name in SKIP_DIRS or name.endswith(".egg-info") or (name.startswith(".") and name != ".ci")


def repository_text_files(root: Path = ROOT) -> list[Path]:
    """Text files of the working tree, without VCS, virtualenv, cache and build folders."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not _skipped(d)]  # never descend into .git or a virtualenv
        here = Path(folder)
        found += [here / f for f in files if Path(f).suffix in TEXT_SUFFIXES or here.name == ".ci"]
    return found


def design_sections(text: str) -> set[str]:
    """Section numbers of the design document's headings ("1", "3.2", ...)."""
    return set(HEADING.findall(text))


def cited_sections(text: str) -> list[tuple[int, str]]:
    """(line number, section) for every section a text cites in the design document;
    a range "§3–4" cites both ends."""
    out = []
    for m in CITATION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out += [(line, n) for n in SECTION_NUMBER.findall(m.group(1))]
    return out


def citation_problems(files: list[Path], sections: set[str], root: Path = ROOT) -> list[str]:
    problems = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        rel = path.relative_to(root).as_posix()
        for line, n in cited_sections(text):
            if n not in sections:
                problems.append(f"{rel}:{line}: cites docs/design.md §{n}, which docs/design.md has no heading for")
        for m in FOREIGN.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            problems.append(f"{rel}:{line}: cites {m.group(0)!r}, a file outside the repository: "
                            "cite docs/design.md §n instead")
    return problems


def test_design_document_has_numbered_sections():
    sections = design_sections(DESIGN.read_text(encoding="utf-8"))
    assert {str(n) for n in range(1, 9)} <= sections
    assert {"3.1", "3.2", "3.3", "3.4", "4.1", "4.4", "5.2", "5.3"} <= sections


def test_every_design_citation_names_an_existing_section():
    this_file = Path(__file__).resolve()  # its examples of bad citations are meant to be bad
    files = [p for p in repository_text_files() if p.resolve() != this_file]
    assert any(p.name == "scheduler.py" for p in files)  # the walk reaches the package
    sections = design_sections(DESIGN.read_text(encoding="utf-8"))
    problems = citation_problems(files, sections)
    assert not problems, "\n".join(problems)


def test_the_check_catches_bad_citations(tmp_path):
    (tmp_path / "pkg").mkdir()
    good = tmp_path / "pkg" / "good.py"
    good.write_text('"""Step graph (docs/design.md §3.1), see [docs/design.md](design.md) §3.4 and §4."""\n')
    bad = tmp_path / "pkg" / "bad.py"
    bad.write_text('"""KV pool (docs/design.md §9.9).\n\nAlso DESIGN §3 and `DESIGN.md` §5.\n"""\n')
    hidden = tmp_path / ".venv" / "lib.py"
    hidden.parent.mkdir()
    hidden.write_text("# DESIGN §3\n")
    files = repository_text_files(tmp_path)
    assert hidden not in files
    problems = citation_problems(files, {"3", "3.1", "3.4", "4"}, tmp_path)
    assert len(problems) == 3, problems
    assert all(p.startswith("pkg/bad.py:") for p in problems)
    assert "pkg/bad.py:1: cites docs/design.md §9.9" in problems[0]


def test_citation_parsing():
    assert cited_sections("see docs/design.md §3–4 and docs/design.md §5.2's J") == [(1, "3"), (1, "4"), (1, "5.2")]
    assert cited_sections("docs/design.md §3.4 and §4") == [(1, "3.4"), (1, "4")]
    assert design_sections("# Title\n## 1. Layout\n### 1.4 What\n## 10. More\n") == {"1", "1.4", "10"}
