"""gate: fail CI when the model got worse. Compares the current metrics files with a reference.

    python -m stages.gate --against main                       # metrics committed on a branch
    python -m stages.gate --against ci/reference_metrics.json  # a committed reference file
    python -m stages.gate --write-reference ci/reference_metrics.json

The checks and thresholds are the `gate` section of params.yaml. Prints a Markdown table
(reference, current, delta, verdict per checked metric; `--report` also writes it to a file, for
a pull-request comment). Exit status: 0 pass, 1 a regression, 2 the gate could not compare.
Not a DVC stage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages.lib import PipelineError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--against", metavar="REF", help="a git revision, a metrics file or folder, or a reference file")
    action.add_argument("--write-reference", type=Path, metavar="FILE",
                        help="save the current metrics as a combined reference file, then exit")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--report", type=Path, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)

    from stages.lib.gate import judge_all, markdown, read_folder, read_reference, stems_of, write_reference
    from stages.lib.params import load_params

    try:
        settings = load_params(args.params, timm_names=False).gate  # starts fast: no torch
        if not settings.checks:
            raise PipelineError(f"{args.params}: gate.checks is empty: nothing to check")
        folder, stems = Path(settings.metrics_dir), stems_of(settings.checks)
        if args.write_reference:
            write_reference(args.write_reference, folder, stems)
            print(f"wrote {args.write_reference} from {folder}/{{{','.join(stems)}}}.json")
            return 0
        current = read_folder(folder, stems)
        reference = read_reference(args.against, folder, stems)
    except PipelineError as error:
        print(f"gate: error: {error}", file=sys.stderr)
        return 2
    verdicts = judge_all(settings.checks, current, reference)
    report = markdown(verdicts, args.against)
    print(report)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report)
    return 0 if all(verdict.passed for verdict in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
