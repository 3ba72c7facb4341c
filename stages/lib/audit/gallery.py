"""Gallery PNGs of the audit's findings, drawn from the prepared cache (already decoded pixels)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from stages.lib.data.prepared import load_split


def gallery(
    items: pd.DataFrame, positions: pd.DataFrame, prepared: Path, title: str, out: Path, columns: int = 6
) -> None:
    """A grid of `items` (rows with path, label and a `caption`), in their order, to a PNG.

    positions: the audit table (path -> split, row in the prepared cache). An empty table draws a note.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = {}
    where = positions.set_index("path")[["split", "row"]]
    rows = max(1, math.ceil(len(items) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.7, rows * 1.9 + 0.5), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, item in zip(axes.ravel(), items.itertuples()):
        split, row = where.loc[item.path]
        if split not in arrays:
            arrays[split] = load_split(prepared, split)[0]
        axis.imshow(arrays[split][int(row)])
        axis.set_title(item.caption, fontsize=6)
    if items.empty:
        axes[0, 0].text(0, 0.5, "nothing found", fontsize=10)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def captions(found, limit: int) -> dict[str, pd.DataFrame]:
    """The worst `limit` of each finding, with the caption each image gets: file name, given and suggested."""

    def name(path: str) -> str:
        return path.rsplit("/", 1)[-1][:18]

    labels = found.label_issues.head(limit)
    labels = labels.assign(
        caption=[
            f"{name(r.path)}\ngiven {r.label} -> {r.suggested}\n{r.split} {r.score:.2f}" for r in labels.itertuples()
        ]
    )
    near = found.near_duplicates.sort_values(["found_by", "group", "path"]).head(limit)
    near = near.assign(
        caption=[f"{name(r.path)}\n{r.group[-14:]}\n{r.label} {r.split} d={r.distance:.2f}" for r in near.itertuples()]
    )
    outliers = found.outliers.head(limit)
    outliers = outliers.assign(
        caption=[f"{name(r.path)}\ngiven {r.label}\n{r.split} {r.score:.3f}" for r in outliers.itertuples()]
    )
    return {"label_issues": labels, "near_duplicates": near, "outliers": outliers}
