"""Print what the last pipeline run produced: baseline vs fine-tuned test accuracy, where
the MLflow store is and how to open it. `make demo` ends with this."""

from __future__ import annotations

import json
from pathlib import Path

from stages.lib.tracking import repo_root, tracking_uri


def main() -> None:
    evaluate = Path("metrics/evaluate.json")
    if not evaluate.exists():
        raise SystemExit("no metrics/evaluate.json yet: run `dvc repro` first")
    results = json.loads(evaluate.read_text())
    finetune = json.loads(Path("metrics/finetune.json").read_text())
    registry = json.loads(Path("reports/evaluate/registry.json").read_text())
    uri = tracking_uri(repo_root())
    print("\n== transfer-learning pipeline: test split ==")
    print(f"{'model':<28}{'accuracy':>10}{'macro F1':>10}{'ECE':>8}")
    for name, label in (("baseline", "linear probe (frozen)"), ("finetuned", "fine-tuned (staged)")):
        row = results[name]
        print(f"{label:<28}{row['accuracy']:>10.4f}{row['macro_f1']:>10.4f}{row['ece']:>8.4f}")
    print(f"\nfine-tuning: best epoch {finetune['best_epoch']} of {finetune['epochs']}, {finetune['train_seconds']} s")
    alias = "champion" if registry["champion"] else "challenger"
    print(f"registered: models:/{registry['registered_model']}/{registry['version']} (@{alias})")
    print(f"MLflow store: {uri}")
    if uri.startswith("sqlite:"):
        print(f"open the UI:  .venv/bin/mlflow ui --backend-store-uri {uri}")
    else:
        print(f"open the UI:  {uri}")


if __name__ == "__main__":
    main()
