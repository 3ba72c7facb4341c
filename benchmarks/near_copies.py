"""How precisely validate's near-copy groups pair the true copies, on two sets with known copies.

    python benchmarks/near_copies.py [--fonts 174] [--similarity 0.95 0.97 0.98]

Two sets, neither in the tests, each with near copies made as users end up with them (cropped by 1-4 px per
side, resized to 48-96 px, brighter or darker by up to 20 %, re-encoded as JPEG at quality 60-90):
- letters in fonts (benchmarks/letters.py): 130 copies among the letters A-J rendered in every font found;
  alike but distinct: the same letter in two similar fonts;
- bursts: photo-like scenes, each shot three times in a burst (the frame moved by 2-6 px, the objects by up
  to 4 px, fresh noise, the light a little different), and 60 copies of single frames; alike but distinct:
  two frames of one burst.
Each goes through validate's own `build_manifest` with `validate.near_duplicates` at the params' defaults,
and once more per `--similarity` value; `--code` names what ran (default: the commit). Per set and
setting: the true copy pairs grouped (recall), the pairs of images sharing a group that are true copy pairs
(pair precision), the share of the images in a group against the share that are copies or originals of
copies, the grouped pairs that are not copies (on the bursts: two frames of one burst), and on the letters
(where a wrong label is the same letter in another font) the correctly labelled images left out as label
conflicts; then the split at the default params: its val and test shares in images, and the copy pairs
it left in two splits. Appends the rows to benchmarks/measured/near_copies.csv.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageEnhance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from letters import write_letters  # noqa: E402  (benchmarks/letters.py, beside this script)
from machine import append_measured  # noqa: E402

from stages.lib.core.params import Split, load_params  # noqa: E402
from stages.lib.data.manifest import build_manifest, scan_image_folder  # noqa: E402
from stages.lib.data.splits import SPLITS, split_manifest  # noqa: E402

MEASURED = ROOT / "benchmarks" / "measured" / "near_copies.csv"


def copy_of(image: Image.Image, rng: np.random.Generator) -> bytes:
    """A near copy: cropped 1-4 px per side, shorter side resized to 48-96 px, brighter or darker, JPEG 60-90."""
    left, top, right, bottom = (int(value) for value in rng.integers(1, 5, size=4))
    cropped = image.crop((left, top, image.width - right, image.height - bottom))
    side = int(rng.integers(48, 97))
    scale = side / min(cropped.size)
    resized = cropped.resize((round(cropped.width * scale), round(cropped.height * scale)), Image.Resampling.BILINEAR)
    shaded = ImageEnhance.Brightness(resized).enhance(
        float(rng.choice([rng.uniform(0.8, 0.92), rng.uniform(1.08, 1.2)]))
    )
    buffer = io.BytesIO()
    shaded.save(buffer, format="JPEG", quality=int(rng.integers(60, 91)))
    return buffer.getvalue()


def write_bursts(out: Path, scenes: int = 150, frames: int = 3, copies: int = 60, seed: int = 0) -> pd.DataFrame:
    """Bursts of photo-like 160x120 frames under out/<class>/ and copies of some frames; returns the truth
    table: path (relative to out), burst, copy_of (the copied frame's path, or empty)."""
    rng = np.random.default_rng(seed)
    rows = []
    for scene in range(scenes):
        label = f"class_{scene % 5}"
        (out / label).mkdir(parents=True, exist_ok=True)
        coarse = rng.uniform(0, 255, size=(5, 6, 3)).astype(np.uint8)
        backdrop = Image.fromarray(coarse).resize((176, 136), Image.Resampling.BICUBIC)
        shapes = [
            (
                rng.integers(0, 150, size=2),
                rng.integers(16, 60, size=2),
                tuple(int(c) for c in rng.integers(0, 256, 3)),
                rng.random() < 0.5,
            )
            for _ in range(int(rng.integers(2, 6)))
        ]
        for frame in range(frames):
            canvas = backdrop.copy()
            draw = ImageDraw.Draw(canvas)
            for (x, y), (w, h), colour, round_ in shapes:
                dx, dy = rng.integers(-4, 5, size=2)
                (draw.ellipse if round_ else draw.rectangle)((x + dx, y + dy, x + dx + w, y + dy + h), fill=colour)
            sx, sy = (int(v) for v in rng.integers(2, 7, size=2) * rng.choice([-1, 1], size=2) + 8)
            view = np.asarray(canvas.crop((sx, sy, sx + 160, sy + 120)), dtype=np.float32)
            view = view * rng.uniform(0.95, 1.05) + rng.normal(0, 6, size=view.shape)
            path = f"{label}/scene{scene:03d}_frame{frame}.png"
            Image.fromarray(np.clip(view, 0, 255).astype(np.uint8)).save(out / path)
            rows.append({"path": path, "burst": scene, "copy_of": ""})
    for index in sorted(rng.choice(len(rows), size=copies, replace=False).tolist()):
        source = rows[index]
        path = source["path"].replace(".png", "_copy.jpg")
        with Image.open(out / source["path"]) as image:
            (out / path).write_bytes(copy_of(image.convert("RGB"), rng))
        rows.append({"path": path, "burst": source["burst"], "copy_of": source["path"]})
    return pd.DataFrame(rows)


def measure(folder: Path, truth: pd.DataFrame, settings) -> dict:
    """Group the folder with `settings` and score the groups against the truth table."""
    started = time.perf_counter()
    manifest = build_manifest(scan_image_folder(folder), 8, 40_000_000, workers=None, near_duplicates=settings)
    seconds = time.perf_counter() - started
    for column in ("path", "likely_copy_of"):  # relative to the folder, as the truth table names them
        manifest[column] = [Path(path).relative_to(folder).as_posix() if path else "" for path in manifest[column]]
    group = manifest.set_index("path")["group"]
    copies = truth[truth["copy_of"] != ""]
    true_pairs = {frozenset(pair) for pair in zip(copies["path"], copies["copy_of"])}
    grouped = [
        frozenset(pair)
        for _, members in manifest[manifest["group"] != ""].groupby("group")
        for pair in combinations(members["path"], 2)
    ]
    false = [pair for pair in grouped if pair not in true_pairs]
    found = sum(bool(group[c]) and group[c] == group[o] for c, o in zip(copies["path"], copies["copy_of"]))
    result = {
        "copy pairs grouped (recall)": found / len(copies),
        "grouped pairs that are copies (precision)": (len(grouped) - len(false)) / max(len(grouped), 1),
        "images in a group": float((manifest["group"] != "").mean()),
        "images that are copies or their originals": len({p for pair in true_pairs for p in pair}) / len(manifest),
        "grouped pairs that are not copies": len(false),
    }
    if "burst" in truth:
        burst = truth.set_index("path")["burst"]
        result["of which two frames of one burst"] = sum(len({burst[p] for p in pair}) == 1 for pair in false)
    if "kind" in truth:  # letters: a wrong label is the same letter in another font, in another class's folder
        conflicts = set(manifest.loc[manifest["reason"].str.startswith("label conflict"), "path"])
        result["right labels left out as conflicts"] = len(conflicts - set(truth.loc[truth["kind"] == "wrong", "path"]))
    splits = split_manifest(manifest, Split(), seed=42)
    where = {path: name for name in SPLITS for path in splits[name]["path"]}
    usable = len(where)
    result["copy pairs across splits"] = sum(
        where[c] != where[o] for c, o in zip(copies["path"], copies["copy_of"]) if c in where and o in where
    )
    result["val share (goal 0.15 +- 0.03)"] = len(splits["val"]) / usable
    result["test share (goal 0.15 +- 0.03)"] = len(splits["test"]) / usable
    return result | {"seconds (validate, all cores)": seconds}


def commit() -> str:
    """The checked-out commit, with a + when tracked files differ from it."""
    import subprocess

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
    return head.strip() + ("+" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fonts", type=int, default=174)
    parser.add_argument("--similarity", type=float, nargs="*", default=[], help="min_similarity values to try too")
    parser.add_argument("--code", default="", help="what code ran (default: the commit, + when files changed)")
    args = parser.parse_args()
    default = load_params(ROOT / "params.yaml").validate_.near_duplicates
    code = args.code or commit()
    tried = [default] + [default.model_copy(update={"min_similarity": value}) for value in args.similarity]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-near-copies-") as temporary:
        letters, bursts = Path(temporary) / "letters", Path(temporary) / "bursts"
        sets = {
            "letters": (letters, write_letters(letters, fonts=args.fonts)),
            "bursts": (bursts, write_bursts(bursts)),
        }
        for name, (folder, truth) in sets.items():
            for settings in tried:
                for measure_name, value in measure(folder, truth, settings).items():
                    rows.append(
                        {
                            "code": code,
                            "dataset": name,
                            "images": len(truth),
                            "method": settings.method,
                            "min_similarity": settings.min_similarity,
                            "measure": measure_name,
                            "value": round(float(value), 3),
                        }
                    )
    for item in append_measured(MEASURED, rows):
        print(f"{item['dataset']:8} {item['min_similarity']:5} {item['measure']:45} {item['value']:>8}")


if __name__ == "__main__":
    main()
