"""The documentation: its commands work verbatim, it cites files that exist, the site builds strictly, and its
tables of measured numbers are generated from committed rows, never typed.

The cheap commands of the `bash` blocks of `docs/**/*.md` run exactly as the README's do (tests/test_readme.py:
the same prefixes, the same fresh shell, a copy of the tiny pipeline); a page with a `mlflow models serve -p PORT`
line and a `curl` line is served and asked. The site build and the table tests need only mkdocs-material and
PyYAML, not the project's pipeline.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from test_readme import (
    CHEAP,
    CITED,
    README,
    check_serving,
    commands,
    demo,  # noqa: F401  (the fixture: a copy of the tiny pipeline with .venv linked)
    run_cheap,
)

DOCS = REPO / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
MEASURED = REPO / "benchmarks" / "measured"
MARKER = re.compile(r"^\s*\{\{\s*table\(\s*[\"']([^\"']+)[\"']", re.M)


def page_id(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


def docs_commands() -> list[tuple[str, str]]:
    """(page, command) for every cheap command of the docs' bash blocks that the README's test does not run."""
    seen, found = set(commands()), []
    for page in PAGES:
        for command in commands(page.read_text()):
            if command.startswith(CHEAP) and command not in seen:
                seen.add(command)
                found.append((page_id(page), command))
    return found


def serving_pairs() -> list[tuple[str, str, str]]:
    """(page, serve, curl) for every page that has both."""
    pairs = []
    for page in PAGES:
        lines = commands(page.read_text())
        serve = [c for c in lines if "mlflow models serve" in c and re.search(r"-p \d+", c)]
        curl = [c for c in lines if c.startswith("curl")]
        if serve and curl:
            pairs.append((page_id(page), serve[0], curl[0]))
    return pairs


def load_hook():
    spec = importlib.util.spec_from_file_location("docs_tables_hook", DOCS / "hooks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the README stays a manual ------------------------------------------------------------------------------


def test_the_readme_stays_a_manual_of_at_most_250_lines():
    assert len(README.splitlines()) <= 250, "depth belongs in docs/: the README is the manual a new user reads"


def test_the_readme_links_into_docs_resolve():
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)]*)?\)", README)
    assert links, "the README links into docs/"
    missing = sorted(link for link in set(links) if not (REPO / link).is_file())
    assert not missing


# --- the docs' commands and citations ------------------------------------------------------------------------


def test_the_docs_cite_only_files_that_exist():
    missing = sorted(
        {
            f"{page_id(page)}: {path}"
            for page in PAGES
            for path in re.findall(CITED, page.read_text())
            if not (REPO / path).exists()
        }
    )
    assert not missing


def test_the_docs_commands_assume_the_activated_environment():
    offending = [
        f"{page_id(page)}: {c}"
        for page in PAGES
        for c in commands(page.read_text())
        if ".venv/bin/" in c and not c.startswith("source")
    ]
    assert not offending, "one convention: commands assume the activated environment"


@pytest.mark.parametrize("page,command", docs_commands(), ids=[f"{p}: {c}" for p, c in docs_commands()])
def test_a_cheap_docs_command_works_verbatim(demo, page, command):  # noqa: F811
    run_cheap(demo, command)


@pytest.mark.parametrize("page,serve,request_", serving_pairs(), ids=[p for p, _, _ in serving_pairs()])
def test_a_docs_serving_example_answers(demo, page, serve, request_):  # noqa: F811
    check_serving(demo, serve, request_)


# --- the site -------------------------------------------------------------------------------------------------


def test_mkdocs_yml_is_strict_and_registers_the_tables_hook():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert config["strict"] is True and config["theme"]["name"] == "material"
    assert "docs/hooks/tables.py" in config["hooks"]
    assert (REPO / "docs/cluster.md").is_file()


def test_the_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material is not installed here (pip install -e '.[docs]', part of make install)")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(site)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "NO_MKDOCS_2_WARNING": "1", "LANG": "C.UTF-8"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pages = {page.relative_to(site).as_posix(): page.read_text() for page in site.rglob("*.html")}
    assert "index.html" in pages and "cluster.html" in pages
    left = [name for name, html in pages.items() if re.search(r"<p>\s*\{\{\s*(table|stage)\(", html)]
    assert not left, f"markers the hook did not render: {left}"
    assert "<table>" in pages["fusion.html"] and "fusion_finetune_digits.csv" in pages["fusion.html"]
    assert "models/finetuned" in pages["stages/finetune.html"]  # the stage's outs, from dvc.yaml


# --- generated tables -----------------------------------------------------------------------------------------


def test_the_table_hook_renders_a_known_csv(tmp_path):
    rows = tmp_path / "known.csv"
    rows.write_text(
        "mode,seed,finetuned_test,seconds,source\nnone,42,0.99,70,run A\nnone,1,0.97,80,run A\nconcat,42,1.0,75,run B\n"
    )
    hook = load_hook()
    page = f'before\n{{{{ table("{rows}") }}}}\nafter\n```\n{{{{ table("{rows}") }}}}\n```\n'
    rendered = hook.render_markers(page)
    assert rendered.split("\n")[:8] == [
        "before",
        "| mode | seed | finetuned_test | seconds |",
        "|---|---:|---:|---:|",
        "| none | 42 | 0.99 | 70 |",
        "| none | 1 | 0.97 | 80 |",
        "| concat | 42 | 1.0 | 75 |",
        "",
        f"<small>Rows: `{rows.as_posix()}`; run A; run B.</small>",
    ]
    assert rendered.endswith(f'after\n```\n{{{{ table("{rows}") }}}}\n```\n'), "a marker in code is left alone"

    grouped = hook.render_markers(
        f'{{{{ table("{rows}", group_by="mode", mean_std=["finetuned_test"], '
        f'mean=["seconds"], percent=True, caption=False) }}}}'
    )
    assert grouped.split("\n") == [
        "| mode | n | finetuned_test_pct | seconds |",
        "|---|---:|---|---:|",
        "| none | 2 | 98.00 ± 1.41 | 75 |",
        "| concat | 1 | 100.00 | 75 |",
    ]
    with pytest.raises(RuntimeError, match="no column 'accuracy'"):
        hook.render_markers(f'{{{{ table("{rows}", columns=["accuracy"]) }}}}')


def test_the_cli_prints_the_table_the_site_shows():
    sys.path.insert(0, str(REPO))
    from scripts import tables

    path = "benchmarks/measured/seeds_default_cpu_isa.csv"
    printed = subprocess.run(
        [sys.executable, "-m", "scripts.tables", path], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert printed.strip() == tables.render(path).strip()
    assert "| avx2 | 2 | 2 | 99.26 |" in printed


def test_stage_tables_come_from_dvc_yaml():
    sys.path.insert(0, str(REPO))
    from scripts import tables

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, spec in stages.items():
        table = tables.stage(name)
        assert f"python -m stages.{name}" in table
        for out in spec.get("outs", []):
            assert f"`{out if isinstance(out, str) else next(iter(out))}`" in table


def test_every_measured_csv_has_a_header_and_is_shown_in_the_docs():
    shown = {path for page in PAGES for path in MARKER.findall(page.read_text())}
    for path in shown:
        assert (REPO / path).is_file(), f"a docs table cites {path}, which does not exist"
    for file in sorted(MEASURED.glob("*.csv")):
        with open(file, newline="") as handle:
            header = next(csv.reader(handle))
        assert header and all(re.fullmatch(r"[a-z][a-z0-9_]*", name) for name in header), f"{file.name}: {header}"
        assert file.relative_to(REPO).as_posix() in shown, f"{file.name} is shown on no docs page"


NUMBER = re.compile(r"[~≈<>≤≥+−-]?\d[\d.,]*\s*(%|s|ms|min|px|×|x|MB|img/s)?(\s*±\s*\d[\d.,]*\s*%?)?")


@pytest.mark.parametrize("page", [REPO / "README.md", *PAGES], ids=page_id)
def test_no_table_of_measured_numbers_is_typed(page):
    """A Markdown table row in a page's source with a cell that is a number: it belongs in benchmarks/measured/."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    typed = []
    for line in text.splitlines():
        if line.lstrip().startswith("|") and not re.fullmatch(r"\s*\|[\s|:-]+\|\s*", line):
            cells = [cell.strip().strip("*").strip() for cell in line.strip().strip("|").split("|")]
            if any(NUMBER.fullmatch(cell) for cell in cells):
                typed.append(line.strip())
    assert not typed, "typed numbers in a table: commit the rows to benchmarks/measured/ and use {{ table(...) }}"
