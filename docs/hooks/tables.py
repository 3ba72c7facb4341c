"""mkdocs hook: generated tables.

A line that holds only a marker is replaced, before the page is converted, by a Markdown table:

    {{ table("benchmarks/measured/fusion_probe.csv") }}
    {{ table("benchmarks/measured/fusion_finetune_digits.csv", group_by="mode", mean_std=["finetuned_val"]) }}
    {{ stage("finetune") }}

`table` renders committed rows of measurements (arguments as in `scripts.tables.render`), `stage` what
`dvc.yaml` declares for a stage. Markers inside fenced code blocks are left alone. A marker that cannot be
rendered (unknown file, column, stage, argument) fails the build. `python -m scripts.tables` prints the same
tables in a terminal.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts import tables  # noqa: E402

MARKER = re.compile(r"^\s*\{\{\s*(table|stage)\((.*)\)\s*\}\}\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def _call(kind: str, arguments: str, where: str) -> str:
    try:
        call = ast.parse(f"f({arguments})", mode="eval").body
        args = [ast.literal_eval(arg) for arg in call.args]
        kwargs = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
        return tables.render(*args, **kwargs) if kind == "table" else tables.stage(*args, **kwargs)
    except (SyntaxError, ValueError, TypeError, tables.TableError) as error:
        raise RuntimeError(f"{where}: cannot render {kind}({arguments}): {error}") from error


def render_markers(markdown: str, where: str = "<page>") -> str:
    """Every marker line of `markdown` (outside fenced code) replaced by its table."""
    out, fenced = [], False
    for line in markdown.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
        match = None if fenced else MARKER.match(line)
        out.append(_call(match.group(1), match.group(2), where) if match else line)
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files):  # mkdocs' hook signature
    return render_markers(markdown, page.file.src_uri)
