"""Which files make up the data set: from the image folder or a CSV manifest, one row per file.

Two inputs (params `data`):
- the folder `data.images_dir/<class>/...` (default): the class is the first folder below it;
- a CSV manifest `data.manifest` with columns `path,label[,split]`, paths relative to
  `data.images_dir`. The CSV must lie inside `data.images_dir`, so DVC's dependency on that
  folder covers both the CSV and the images it lists (dvc.yaml deps cannot be conditional).

`build_manifest` inspects every listed file (streaming: one image in memory at a time) and marks
repeated content, giving the table written to data/manifest.csv.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from stages.lib.core.errors import PipelineError
from stages.lib.core.parallel import ordered_map
from stages.lib.data.corrections import Correction, apply_corrections
from stages.lib.data.images import MANIFEST_COLUMNS, ManifestRow, inspect_image, is_within, read_labelled_csv
from stages.lib.data.signatures import as_array, near_copies

log = logging.getLogger(__name__)

OS_LITTER = {".DS_Store", "Thumbs.db", "ehthumbs.db", "desktop.ini", "Icon\r"}
OS_LITTER_DIRS = {"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information"}
SPLIT_NAMES = ("train", "val", "test")


class DataSourceError(PipelineError, ValueError):
    """The image folder or the CSV manifest cannot be read as a data set."""


def scan_image_folder(images_dir: str | Path) -> list[ManifestRow]:
    """Every file below images_dir, sorted; the class is the first folder below images_dir.

    Hidden files, OS litter and files with no class folder are listed as excluded, so the
    report accounts for every file. Symlinks are followed; a folder reached a second time (a
    symlink loop) and a folder that cannot be listed each get an excluded row of their own.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DataSourceError(f"data.images_dir: {images_dir} is not a folder (put images in {images_dir}/<class>/)")
    rows, seen_dirs = [], {}

    def unreadable(error: OSError) -> None:
        rows.append(
            ManifestRow(path=Path(error.filename).as_posix(), label="").exclude(
                f"unreadable folder: {(error.strerror or str(error)).lower()}"
            )
        )

    for folder, dirnames, filenames in os.walk(images_dir, followlinks=True, onerror=unreadable):
        real = os.path.realpath(folder)
        if real in seen_dirs:
            rows.append(
                ManifestRow(path=Path(folder).as_posix(), label="").exclude(
                    f"symlink loop: same folder as {seen_dirs[real]}, scanned once"
                )
            )
            dirnames[:] = []
            continue
        seen_dirs[real] = posix_folder = Path(folder).as_posix()
        dirnames.sort()
        below = os.path.relpath(
            folder, images_dir
        )  # per file, string operations: pathlib parsing is a sizeable share of a small image
        folder_parts = () if below == os.curdir else tuple(below.split(os.sep))
        prefix = "" if posix_folder == "." else posix_folder + "/"
        for name in sorted(filenames):
            parts = (*folder_parts, name)
            row = ManifestRow(path=prefix + name, label=parts[0] if len(parts) > 1 else "")
            if name in OS_LITTER or any(part.startswith(".") or part in OS_LITTER_DIRS for part in parts):
                row.exclude("hidden or OS file")
            elif len(parts) == 1:
                row.exclude("not in a class folder: put it in a folder named after its class")
            rows.append(row)
    return sorted(rows, key=lambda row: row.path)


def read_manifest_csv(csv_path: str | Path, images_dir: str | Path) -> list[ManifestRow]:
    """One row per CSV line: `path` (relative to images_dir, or absolute), `label`, optional `split`.

    Rows without a label, with a split other than train/val/test, or pointing outside
    images_dir are kept as excluded rows with that reason.
    """
    csv_path, images_dir = Path(csv_path), Path(images_dir)
    if not is_within(csv_path, images_dir):
        raise DataSourceError(
            f"data.manifest: {csv_path} must lie inside data.images_dir ({images_dir}) so that "
            f"DVC's dependency on that folder tracks it; move it, e.g. to {images_dir}/labels.csv"
        )
    try:
        table = read_labelled_csv(csv_path)
    except FileNotFoundError:
        raise DataSourceError(f"data.manifest: {csv_path} not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataSourceError(f"data.manifest: {csv_path} is not a readable CSV ({error})") from None
    missing = [column for column in ("path", "label") if column not in table]
    if missing:
        raise DataSourceError(
            f"data.manifest: {csv_path} has no column {', '.join(missing)} "
            f"(expected path,label[,split]; found {', '.join(table.columns)})"
        )
    rows = []
    for line, record in enumerate(table.to_dict("records"), start=2):
        written = record["path"].strip().replace("\\", "/")  # paths written on Windows
        path = Path(written) if os.path.isabs(written) else images_dir / written
        row = ManifestRow(
            path=path.as_posix(), label=record["label"].strip(), split=str(record.get("split", "")).strip().lower()
        )
        if not written:
            row.exclude(f"missing: no path on line {line}")
        elif not is_within(path, images_dir):
            row.exclude(f"outside images folder: not under {images_dir} (line {line})")
        elif not row.label:
            row.exclude(f"no label: line {line}")
        elif row.split not in ("", *SPLIT_NAMES):
            row.exclude(f"bad split: '{row.split}' on line {line} is not train, val or test")
        rows.append(row)
    return rows


def list_files(data) -> list[ManifestRow]:
    """The rows to inspect for the `data` params: the CSV manifest when set, else the folder scan."""
    if data.manifest:
        return read_manifest_csv(data.manifest, data.images_dir)
    return scan_image_folder(data.images_dir)


def mark_duplicates(rows: list[ManifestRow]) -> None:
    """Exclude repeated content: copies within a class keep the first file; the same content
    under two or more classes is a label conflict, and every copy is left out."""
    by_hash: dict[str, list[ManifestRow]] = {}
    for row in rows:
        if row.status == "ok":
            by_hash.setdefault(row.sha256, []).append(row)
    for copies in by_hash.values():
        labels = sorted({row.label for row in copies})
        if len(labels) > 1:
            for row in copies:
                others = ", ".join(other.path for other in copies if other is not row)
                row.exclude(f"label conflict: same image in classes {', '.join(labels)} (also {others})")
            continue
        for row in copies[1:]:
            row.exclude(
                "duplicate: listed twice"
                if row.path == copies[0].path
                else f"duplicate: same content as {copies[0].path}"
            )


def mark_near_copies(rows: list[ManifestRow], settings) -> None:
    """Group the usable rows' near copies (`signatures.near_copy_groups`; `settings`: the
    `validate.near_duplicates` params): every member gets the group's id, the sha256 of its first member.
    Two images verified as near copies of each other under different classes are a label conflict, like
    the same bytes under two classes: both are left out (the rest of their group is kept, grouped). A row
    whose best match is outside its group gets that match's path in `likely_copy_of` (the split keeps the
    two together where it can; no conflict rule reads it)."""
    usable = [row for row in rows if row.status == "ok" and row.signature]
    sides = [min(row.width, row.height) for row in usable]
    found = near_copies(as_array([row.signature for row in usable]), settings, sides)
    groups = found.groups
    for group in groups:
        members = [usable[index] for index in group.members]
        for row in members:
            row.group = members[0].sha256[:16]
        conflicting: dict[int, set[int]] = {}
        for i, j in group.links:
            if usable[i].label != usable[j].label:
                conflicting.setdefault(i, set()).add(j)
                conflicting.setdefault(j, set()).add(i)
        for index, others in conflicting.items():
            row = usable[index]
            labels = sorted({row.label} | {usable[other].label for other in others})
            also = ", ".join(usable[other].path for other in sorted(others))
            row.exclude(
                f"label conflict: near copy in classes {', '.join(labels)} (also {also}; "
                f"similarity at least {group.similarity})"
            )
    for row, match in zip(usable, found.best_match):
        if match >= 0 and (not row.group or usable[match].group != row.group):
            row.likely_copy_of = usable[match].path
    if groups:
        log.info("%d near-copy groups (%d images)", len(groups), sum(len(group.members) for group in groups))


def build_manifest(
    rows: Iterable[ManifestRow],
    min_side: int,
    max_pixels: int,
    workers: int | None = 1,
    chunksize: int = 32,
    near_duplicates=None,
    corrections: list[Correction] = (),
    images_dir: str | Path = "",
) -> pd.DataFrame:
    """Inspect each listed file (see `inspect_image`), apply the user's corrections, mark repeated content
    and near-copy groups; one row per file.

    workers: processes inspecting files (None/0: every available core); the table is the same for any
    number, in the order of `rows`. Files are streamed: a worker holds one file's bytes at a time (and
    keeps a 1 KB signature per usable file). near_duplicates: the `validate.near_duplicates` params (None or
    method none: no signatures, no groups).
    """
    rows = list(rows)
    signature = near_duplicates is not None and near_duplicates.method != "none"
    pending = [index for index, row in enumerate(rows) if row.status == "ok"]
    inspect = functools.partial(inspect_image, min_side=min_side, max_pixels=max_pixels, signature=signature)
    inspected = ordered_map(inspect, (rows[index] for index in pending), workers, chunksize)
    for index, row in zip(pending, tqdm(inspected, total=len(pending), desc="validate", unit="file", mininterval=2)):
        rows[index] = row
    apply_corrections(rows, list(corrections), images_dir)
    mark_duplicates(rows)
    if signature:
        mark_near_copies(rows, near_duplicates)
    return pd.DataFrame({column: [getattr(row, column) for row in rows] for column in MANIFEST_COLUMNS})
