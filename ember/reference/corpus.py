"""The reference model's text: documentation that ships with Python itself.

Two sources, read without importing any standard-library module beyond ``pydoc_data``:
``pydoc_data.topics.topics`` (the language reference's help topics, one document per topic) and the
docstrings of the standard library's ``.py`` sources, read with ``ast`` (module, class and function
docstrings in source order, one document per module). Test suites and demo packages are left out.

The held-out split is by document name: a document is held out when the first 8 hex digits of
sha256(name) fall in the first ``heldout_fraction`` of the range, so the split never depends on
the order or number of documents, and a module is wholly in one split or the other.
"""
from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

from ember.errors import InputError

SKIPPED_PACKAGES = frozenset({"test", "idlelib", "lib2to3", "turtledemo"})
DEFAULT_HELDOUT_FRACTION = 0.05


@dataclass(frozen=True)
class Document:
    name: str  # "topic:<name>" or "module:<dotted.name>"
    text: str


@dataclass(frozen=True)
class Corpus:
    train: list[Document]
    heldout: list[Document]
    sha256: str  # over every document's name and text, in order
    python_version: str

    def describe(self) -> dict:
        return {"train_documents": len(self.train), "heldout_documents": len(self.heldout),
                "train_chars": sum(len(d.text) for d in self.train),
                "heldout_chars": sum(len(d.text) for d in self.heldout),
                "sha256": self.sha256, "python_version": self.python_version}


def is_heldout(name: str, fraction: float = DEFAULT_HELDOUT_FRACTION) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) < fraction * 0x1_0000_0000


def topic_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(f"topic:{name}", topics[name].strip()) for name in sorted(topics) if topics[name].strip()]


def stdlib_sources(stdlib_dir: Path | None = None) -> list[tuple[str, Path]]:
    """(dotted module name, path) of the standard library's ``.py`` files, sorted by name; only
    top-level names in ``sys.stdlib_module_names``, without test suites and SKIPPED_PACKAGES."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise InputError(f"standard-library folder {root} does not exist; pass the folder holding os.py")
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        top = rel.parts[0].removesuffix(".py")
        if (top not in sys.stdlib_module_names or top in SKIPPED_PACKAGES
                or any(p in ("test", "tests") for p in rel.parts[:-1])):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found.append((".".join(parts), path))
    return sorted(found)


def module_docstrings(source: bytes) -> list[str]:
    """The docstrings of a module, its classes and functions, in source order ([] if it does not parse)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old sources
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return []
    docs: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                docs.append(doc.strip())
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return docs


def stdlib_documents(stdlib_dir: Path | None = None, max_modules: int | None = None) -> list[Document]:
    docs = []
    for name, path in stdlib_sources(stdlib_dir)[:max_modules]:
        strings = module_docstrings(path.read_bytes())
        if strings:
            docs.append(Document(f"module:{name}", "\n\n".join(strings)))
    return docs


def build_corpus(heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, stdlib_dir: Path | None = None,
                 max_modules: int | None = None, include_topics: bool = True) -> Corpus:
    """Every document, split into train and held-out by name. ``max_modules``: only the first N
    standard-library modules by name (small corpora for tests)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise InputError(f"heldout_fraction={heldout_fraction!r} must be between 0 and 1 (exclusive); e.g. 0.05")
    docs = (topic_documents() if include_topics else []) + stdlib_documents(stdlib_dir, max_modules)
    digest = hashlib.sha256()
    for d in docs:
        digest.update(d.name.encode() + b"\0" + d.text.encode() + b"\0")
    train = [d for d in docs if not is_heldout(d.name, heldout_fraction)]
    heldout = [d for d in docs if is_heldout(d.name, heldout_fraction)]
    if not train or not heldout:
        raise InputError(f"corpus of {len(docs)} documents leaves an empty split at heldout_fraction="
                         f"{heldout_fraction}; use more modules or a fraction nearer 0.5")
    return Corpus(train, heldout, digest.hexdigest(), sys.version.split()[0])
