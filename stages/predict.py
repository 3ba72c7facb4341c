"""predict: classify image files or folders with the fine-tuned or a registered model -> CSV.

    python -m stages.predict photos/ extra.jpg --model models:/image-classifier@champion --top-k 3

One row per file: path, error, abstained, reason, ood_score, then pred_1, prob_1, ... pred_k, prob_k.
`abstained` is true where the model should not be trusted (reason `unknown input` or `low confidence`:
docs/unknown.md); `--no-abstain` gives the bare answer; `--explain DIR` writes a Grad-CAM overlay per
file. A file that cannot be read or decoded gets a row with the reason in `error` and does not stop the
others. Exit status 1 when no file at all could be classified. Not a DVC stage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from stages.lib.core.stage import setup_stage

log = logging.getLogger("predict")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument(
        "--model",
        default="models/finetuned",
        help="a model folder written by finetune (default), or an MLflow model URI such as models:/<name>@champion",
    )
    parser.add_argument("--top-k", type=int, default=3, help="classes per image, most probable first")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write ('-': stdout)")
    parser.add_argument("--no-abstain", action="store_true", help="the bare answer: never abstain (docs/unknown.md)")
    parser.add_argument("--explain", type=Path, help="also write a Grad-CAM overlay of each file into this folder")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    setup_stage()

    from stages.lib.inference.predict import image_files, load_predictor, predict_files  # torch: not for --help

    files = image_files(args.paths)
    if not files:
        log.error("no files found under %s", ", ".join(args.paths))
        return 1
    predict, classes = load_predictor(args.model, abstain=not args.no_abstain)
    table = predict_files(files, predict, classes, args.top_k)
    if str(args.out) == "-":
        table.to_csv(sys.stdout, index=False)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    if args.explain:
        from stages.lib.inference.explain import explain_files

        log.info("%d heatmaps -> %s", len(explain_files(args.model, files, args.explain)), args.explain)
    failed = table[table["error"] != ""]
    for _, row in failed.iterrows():
        log.warning("%s: %s", row["path"], row["error"])
    log.info("%d of %d files classified with %s -> %s", len(table) - len(failed), len(table), args.model, args.out)
    return 0 if len(failed) < len(table) else 1


if __name__ == "__main__":
    sys.exit(main())
