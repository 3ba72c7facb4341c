"""Print what the last pipeline run produced: baseline vs fine-tuned on the test split, the registry's
aliases, and where to look in MLflow. `make demo` ends with this (`make summary`).

    python -m stages.summary --evaluate reports/evaluate/metrics.json --finetune metrics/finetune.json \
        --card models/finetuned/config.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def registry_line(name: str) -> str:
    """`models:/<name>@champion` and @challenger with their versions, from the tracking store."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client, parts = MlflowClient(), []
    for alias in ("champion", "challenger"):
        try:
            parts.append(f"@{alias} = version {client.get_model_version_by_alias(name, alias).version}")
        except MlflowException:
            continue
    return f"registered: models:/{name} ({', '.join(parts) or 'no aliases yet'})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluate", type=Path, required=True, help="evaluate's full report (JSON)")
    parser.add_argument("--finetune", type=Path, required=True, help="finetune's metrics file")
    parser.add_argument("--card", type=Path, required=True, help="the fine-tuned model's card (its temperature)")
    parser.add_argument("--ui-port", type=int, default=5000, help="the port `make ui` serves on")
    args = parser.parse_args(argv)
    if not args.evaluate.is_file():
        print(f"no {args.evaluate} yet: run `dvc repro` (or `make demo`) first", file=sys.stderr)
        return 1

    import mlflow

    # after argument parsing: --help answers at once
    from stages.lib.core.params import load_params
    from stages.lib.core.store import tracking_uri

    results, finetune = json.loads(args.evaluate.read_text()), json.loads(args.finetune.read_text())
    temperature = json.loads(args.card.read_text())["temperature"]
    params = load_params(timm_names=False)
    print("\n== transfer-learning pipeline: test split (reported only; choices were made on val) ==")
    print(f"{'model':<28}{'accuracy':>10}{'macro F1':>10}{'ECE':>8}")
    for name, label in (("baseline", "linear probe (frozen)"), ("finetuned", "fine-tuned (calibrated)")):
        row = results[name]["test"]
        ece = f"{row['ece']:>8.4f}" if "ece" in row else f"{'':>8}"
        print(f"{label:<28}{row['accuracy']:>10.4f}{row['macro_f1']:>10.4f}{ece}")
    val_accuracy = results["finetuned"]["val"]["accuracy"]
    print(
        f"\nfine-tuning: kept epoch {finetune['kept_epoch']}, val accuracy {val_accuracy:.4f}, "
        f"temperature {temperature:.3f}"
    )
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    print(registry_line(params.mlflow.registered_model))
    experiment = mlflow.get_experiment_by_name(params.mlflow.experiment)
    print(f"MLflow store: {uri}")
    if uri.startswith("sqlite:") and experiment is not None:
        print(
            f"open the UI:  make ui   then  http://127.0.0.1:{args.ui_port}/#/experiments/"
            f"{experiment.experiment_id}/runs"
        )
    elif experiment is not None:
        print(f"runs:         {uri.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
