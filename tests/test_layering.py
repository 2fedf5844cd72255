"""The import rule between Ember's layers, read from the source (every ``import``, also those
inside functions): the engine format (``ember.engine_format``) and the ONNX Runtime session
helpers (``ember.ort``) sit below both the compiler side (``compiler``, ``export``, ``passes``)
and the runtime, which never import each other. Top-level modules (``ember.cli``,
``ember.check``, ``ember.diffusion_cli``), ``bench``, ``server`` and ``reference`` may import
any layer.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ember"
COMPILER_SIDE = ("ember.compiler", "ember.export", "ember.passes")
# package -> the packages it must never import
FORBIDDEN = {
    "ember.runtime": COMPILER_SIDE,
    "ember.compiler": ("ember.runtime",),
    "ember.export": ("ember.runtime",),
    "ember.passes": ("ember.runtime",),
    "ember.engine_format": ("ember.runtime", *COMPILER_SIDE, "ember.ort"),
    "ember.ort": ("ember.runtime", *COMPILER_SIDE),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of every import in ``tree``; relative imports resolved against ``module``;
    ``from PKG import NAME`` gives ``PKG.NAME`` (NAME may be a module: ``from ember import runtime``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, f"{base}.{a.name}" if a.name != "*" else base) for a in node.names]
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def forbidden_edges(root: Path = ROOT) -> list[str]:
    """One line per import statement that crosses the rule: ``module (file:line) imports target``."""
    bad: dict[tuple[str, int], str] = {}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        rules = [banned for pkg, banned in FORBIDDEN.items() if within(module, pkg)]
        if not rules:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for line, target in imported_modules(tree, module, path.name == "__init__.py"):
            if any(within(target, banned) for banned in rules[0]):
                bad.setdefault((module, line), f"{module} ({path.relative_to(root.parent)}:{line}) imports {target}")
    return sorted(bad.values())


def test_no_layer_imports_across():
    bad = forbidden_edges()
    assert not bad, "imports that cross Ember's layers (tests/test_layering.py says which may):\n" + "\n".join(bad)


@pytest.mark.parametrize("source, module, expected", [
    ("from ember.runtime.session import StepSession, make_session", "ember.compiler.check", ["ember.compiler.check"]),
    ("def f():\n    import ember.runtime.loader\n", "ember.export.gqa", ["ember.export.gqa"]),
    ("from ember import runtime", "ember.passes.x", ["ember.passes.x"]),
    ("from ..compiler import manifest", "ember.runtime.loader", ["ember.runtime.loader"]),
    ("from ember.engine_format.manifest import Manifest", "ember.runtime.loader", []),
    ("from .kv_pool import KVPool", "ember.runtime.executor", []),
])
def test_the_checker_sees_every_kind_of_import(tmp_path, source, module, expected):
    """Module-level, function-level, ``from ember import pkg`` and relative imports all count."""
    parts = module.split(".")
    path = tmp_path.joinpath(*parts[:-1], parts[-1] + ".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    bad = forbidden_edges(tmp_path / "ember")
    assert [b.split(" ")[0] for b in bad] == expected
