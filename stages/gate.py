"""gate: fail CI when the model got worse beyond noise. Paired test against a reference's predictions.

    python -m stages.gate                                         # against the champion, else gate.reference
    python -m stages.gate --against ci/reference_predictions.csv  # a predictions file (evaluate's format)
    python -m stages.gate --write-reference ci/reference_predictions.csv

Compares the fine-tuned model's per-image test predictions (`gate.predictions`, written by evaluate)
with the reference's on the same images (McNemar's exact test and paired bootstrap intervals for
accuracy and macro-F1) and checks the absolute floors of `gate.checks`; prints a Markdown report
(`--report` also writes it, for a pull-request comment). Exit status: 0 pass, 1 a significant drop
beyond the margin or a failed floor, 2 the gate could not compare (other test images, missing files).
Not a DVC stage.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from stages.lib.core.errors import PipelineError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--against",
        default="auto",
        metavar="FILE",
        help="a reference predictions file, or auto (default): the registry champion's, else gate.reference",
    )
    action.add_argument(
        "--write-reference",
        type=Path,
        metavar="FILE",
        help="save the current predictions as the reference file (commit it), then exit",
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--report", type=Path, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)

    # after argument parsing: --help answers at once, and the gate itself never imports torch
    from stages.lib.core.params import load_params
    from stages.lib.evaluation.gate import absolute_checks, markdown, statistical_checks
    from stages.lib.registry.champion import gate_reference

    try:
        params = load_params(args.params, timm_names=False)  # starts fast: no torch
        settings = params.gate
        if args.write_reference:
            args.write_reference.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(settings.predictions, args.write_reference)
            print(f"wrote {args.write_reference} from {settings.predictions}")
            return 0
        with tempfile.TemporaryDirectory() as scratch:
            reference, name = gate_reference(args.against, settings, params.mlflow.registered_model, Path(scratch))
            differences, images = statistical_checks(settings, reference, name, params.base.seed)
        checks = absolute_checks(settings.checks, Path(settings.metrics_dir))
    except (PipelineError, FileNotFoundError) as error:
        print(f"gate: error: {error}", file=sys.stderr)
        return 2
    report, passed = markdown(differences, settings.margin.model_dump(), checks, name, images)
    print(report)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
