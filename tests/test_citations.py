"""Every repository path and library module that params.yaml, the code's docstrings and comments, the README and
the docs cite exists: a move of a file cannot leave a stale pointer behind."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

CODE = ("stages", "scripts", "team", "benchmarks", "docs")  # tests/ name the files of the projects they make
# a path into one of the code folders (`stages/lib/model/fusion.py`, `benchmarks/measured`)
PATH = re.compile(r"(?<![\w./-])((?:stages|scripts|team|benchmarks|tests|docs|ci)/[\w./-]*\w)(?![\w./<*-])")
# a dotted module of the pipeline's library (`stages.lib.model.fusion`), optionally with a name in it
MODULE = re.compile(r"(?<![\w.])(stages\.lib(?:\.\w+)+)")
GENERATED = ("benchmarks/results/",)  # written by `make bench`, not committed


def cited_files():
    files = [REPO / "params.yaml", REPO / "dvc.yaml", REPO / "README.md", REPO / "Makefile", REPO / "pyproject.toml"]
    for folder in CODE:
        files += sorted((REPO / folder).rglob("*.py")) + sorted((REPO / folder).rglob("*.md"))
    return [path for path in files if "__pycache__" not in path.parts]


def module_exists(dotted: str) -> bool:
    """The longest prefix of `dotted` is a module or package of this repository, and a name after it (a class,
    function or constant) is defined in it."""
    parts = dotted.split(".")
    for end in range(len(parts), 1, -1):
        base = REPO.joinpath(*parts[:end])
        source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if source.is_file():
            rest = parts[end:]
            defined = rf"^\s*(?:class |def |async def )?{re.escape(rest[0])}\b" if rest else None
            return defined is None or re.search(defined, source.read_text(), re.M) is not None
    return False


@pytest.mark.parametrize("path", cited_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_cited_path_and_module_exists(path):
    text = path.read_text()
    paths = {p for p in PATH.findall(text) if not p.startswith(GENERATED)}
    # a docs page may link relative to its own folder (docs/stages/index.md -> stages/features.md)
    missing = sorted(p for p in paths if not (REPO / p).exists() and not (path.parent / p).exists())
    modules = sorted(m for m in set(MODULE.findall(text)) if not module_exists(m))
    assert not missing and not modules, f"stale pointers: {missing + modules}"
